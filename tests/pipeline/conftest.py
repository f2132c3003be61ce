"""An S3-speaking server for the batch-job tests: moto's ThreadedMotoServer on 127.0.0.1 (a free
port), real HTTP, reached by s3fs in the test process and in Ray actors through storage options."""
from __future__ import annotations

import json
import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """Yields {endpoint, storage_options (dict), storage_options_json, fs (an s3fs on it)}.
    Credentials are dummies (moto accepts any); nothing leaves 127.0.0.1."""
    import s3fs
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**opts)
    try:
        yield {"endpoint": endpoint, "storage_options": opts, "storage_options_json": json.dumps(opts), "fs": fs}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket per test: returns its name."""
    import boto3

    name = f"vaepipe-{uuid.uuid4().hex[:10]}"
    # boto3, not s3fs.mkdir: s3fs sends a us-east-1 LocationConstraint, which S3 (and moto) refuse
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    s3_server["fs"].invalidate_cache()
    return name
