"""Module-scoped fixtures over harness.py: one S3 server, one MLflow server and one 3-node Ray cluster
(0-CPU head + node_a + node_b, 1 CPU each) shared by a test module."""
from __future__ import annotations

import pytest

import harness


@pytest.fixture(scope="module")
def s3():
    with harness.s3_server() as s:
        yield s


@pytest.fixture(scope="module")
def mlflow_url(s3, tmp_path_factory):
    with harness.mlflow_server(s3, tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with harness.local_cluster(tmp_path_factory.mktemp("cluster"), {"node_a": 1, "node_b": 1}) as c:
        yield c
