"""Encode, decode and nightly against an S3-speaking server (moto on 127.0.0.1): the driver and the
Ray Data actors both reach it through `storage_options`; output equals the local run."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.models import registry
from pipeline.batch.decode import DecodeConfig, run_decode
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ManifestError
from pipeline.batch.nightly import NightlyConfig, run_nightly

from committed_io import committed, manifest, mu

MODEL = "models:/digits@production"


def upload_days(fs, digits_parquet: str, prefix: str, days: list[int]) -> None:
    """Digits file N uploaded as the hive partition PREFIX/day=N/part.parquet."""
    files = sorted(p for p in os.listdir(digits_parquet) if p.endswith(".parquet"))
    for i in days:
        fs.put_file(os.path.join(digits_parquet, files[i]), f"{prefix}/day={i}/part.parquet")
    fs.invalidate_cache()


@pytest.fixture
def s3_digits(s3_server, s3_bucket, digits_parquet):
    """The digits' 3 Parquet files uploaded as hive partitions s3://BUCKET/in/day=N/part.parquet."""
    upload_days(s3_server["fs"], digits_parquet, f"{s3_bucket}/in", [0, 1, 2])
    return f"s3://{s3_bucket}"


def test_s3_encode_equals_local_and_decodes_back_on_s3(trained_digits, digits_parquet, workdir, tmp_path, s3_server, s3_digits):
    so = s3_server["storage_options_json"]
    local = str(tmp_path / "local")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=local, keep=["id"], dtype="float16",
                            concurrency=1, workdir=workdir))
    r = run_encode(EncodeConfig(model=MODEL, input=f"{s3_digits}/in", output=f"{s3_digits}/lat", keep=["id"],
                                dtype="float16", concurrency=2, storage_options=so, workdir=workdir))
    assert (r.rows_in, r.rows_out) == (1797, 1797)
    fs = s3_server["fs"]
    listed = fs.ls(f"{s3_digits}/lat".removeprefix("s3://"))
    assert sorted(os.path.basename(p) for p in listed) == ["_SUCCESS", "day=0", "day=1", "day=2"]   # data only
    a = committed(f"{s3_digits}/lat", **s3_server["storage_options"]).sort_by("id")
    b = committed(local).sort_by("id")
    assert a.column("id").equals(b.column("id")) and sorted(set(a.column("day").to_pylist())) == ["0", "1", "2"]
    assert np.array_equal(mu(a), mu(b))                       # float16 bytes identical to the local run
    m = run_decode(DecodeConfig(model=MODEL, input=f"{s3_digits}/lat", output=f"{s3_digits}/rec",
                                concurrency=1, storage_options=so, workdir=workdir))
    rec = committed(f"{s3_digits}/rec", **s3_server["storage_options"])
    assert m["rows"] == rec.num_rows == 1797 and set(rec.column("id").to_pylist()) == set(range(1797))
    assert not fs.exists(f"{s3_digits}/_lat.vaepipe/staging".removeprefix("s3://"))
    assert fs.exists(f"{s3_digits}/_lat.vaepipe/manifest.json".removeprefix("s3://"))


def test_s3_nightly_encodes_new_partitions_only_and_state_lives_beside_the_output(trained_digits, workdir, digits_parquet,
                                                                                  s3_server, s3_bucket):
    fs, so = s3_server["fs"], s3_server["storage_options_json"]
    upload_days(fs, digits_parquet, f"{s3_bucket}/in", [0, 1])
    cfg = NightlyConfig(model=MODEL, input=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/nightly", concurrency=1,
                        storage_options=so, workdir=workdir)
    first = run_nightly(cfg)
    assert [p for p, _ in first["encoded"]] == ["day=0", "day=1"] and first["current"] == []
    assert run_nightly(cfg)["encoded"] == []
    upload_days(fs, digits_parquet, f"{s3_bucket}/in", [2])                   # arrives the next night
    third = run_nightly(cfg)
    assert [p for p, _ in third["encoded"]] == ["day=2"] and third["current"] == ["day=0", "day=1"]
    state = json.loads(fs.cat(f"{s3_bucket}/_nightly.vaepipe/state.json"))
    assert sum(v["rows"] for v in state["partitions"].values()) == 1797
    assert {v["model_version"] for v in state["partitions"].values()} == {str(trained_digits.version)}
    # a new version behind the alias (re-registered from the same artifacts): every partition is re-encoded
    tracking = cfg.resolved_tracking_uri()
    v1 = registry.client(tracking).get_model_version("digits", trained_digits.version)
    v2 = registry.register(v1.source, "digits", tracking, v1.run_id)
    registry.set_alias_when_ready("digits", "production", str(v2.version), tracking)
    try:
        fourth = run_nightly(cfg)
    finally:
        registry.set_alias_when_ready("digits", "production", str(trained_digits.version), tracking)
    assert [p for p, _ in fourth["encoded"]] == ["day=0", "day=1", "day=2"] and fourth["current"] == []
    state = json.loads(fs.cat(f"{s3_bucket}/_nightly.vaepipe/state.json"))
    assert {v["model_version"] for v in state["partitions"].values()} == {str(v2.version)}
    meta = pq.read_schema(fs.open(f"{s3_bucket}/nightly/day=2/" + manifest(
        f"s3://{s3_bucket}/nightly/day=2", **s3_server["storage_options"])["files"][0]["path"], "rb")).metadata
    assert meta[b"vaepipe.model_version"].decode() == str(v2.version) != str(trained_digits.version)
    whole = committed(f"s3://{s3_bucket}/nightly", **s3_server["storage_options"])   # every partition's manifest
    assert sorted(set(whole.column("day").to_pylist())) == ["0", "1", "2"] and whole.num_rows == 1797
    assert "day" not in pq.read_schema(fs.open(f"{s3_bucket}/nightly/day=2/" + manifest(
        f"s3://{s3_bucket}/nightly/day=2", **s3_server["storage_options"])["files"][0]["path"], "rb")).names


@pytest.mark.parametrize("path", ["/OTHER/canary.parquet", "../../OTHER/canary.parquet", "s3://OTHER/canary.parquet"])
def test_s3_a_crafted_manifest_pointing_into_another_bucket_is_refused_and_touches_nothing(
        trained_digits, workdir, s3_server, s3_digits, path):
    """The manifest is read from storage: a path into another bucket (absolute, '..', or a URI) is a
    clear error before anything is read, moved or deleted; the other bucket's object survives."""
    fs, so = s3_server["fs"], s3_server["storage_options_json"]
    import boto3

    other = s3_digits.removeprefix("s3://") + "-other"
    boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=other)
    fs.pipe_file(f"{other}/canary.parquet", b"keep me")
    cfg = EncodeConfig(model=MODEL, input=f"{s3_digits}/in", output=f"{s3_digits}/lat", concurrency=1,
                       storage_options=so, workdir=workdir)
    run_encode(cfg)
    crafted = {"run_id": "x", "files": [{"path": path.replace("OTHER", other), "rows": 1}],
               "pending_files": [path.replace("OTHER", other)]}
    fs.pipe_file(f"{s3_digits}/_lat.vaepipe/manifest.json".removeprefix("s3://"), json.dumps(crafted).encode())
    before = sorted(fs.find(f"{s3_digits}/lat".removeprefix("s3://")))
    with pytest.raises(ManifestError, match="not a plain relative path"):
        run_encode(cfg)
    fs.invalidate_cache()
    assert fs.cat(f"{other}/canary.parquet") == b"keep me"
    assert sorted(fs.find(f"{s3_digits}/lat".removeprefix("s3://"))) == before


def test_s3_two_writers_one_lease_conditional_put(s3_server, s3_bucket):
    """The lease's exclusive create is a conditional PUT (If-None-Match: *) the S3 server enforces."""
    from pipeline.table.commit import control_of
    from pipeline.runtime.errors import LeaseHeldError
    from pipeline.table.lease import create_new, hold_lease
    from pipeline.table.uris import resolve

    out = resolve(f"s3://{s3_bucket}/out", **s3_server["storage_options"])
    assert create_new(out, f"{s3_bucket}/x.json", b"1") and not create_new(out, f"{s3_bucket}/x.json", b"2")
    assert s3_server["fs"].cat(f"{s3_bucket}/x.json") == b"1"
    with hold_lease(control_of(out), out.uri, "encode", ttl_s=30):
        with pytest.raises(LeaseHeldError, match="encode run"):
            hold_lease(control_of(out), out.uri, "nightly", ttl_s=30)
