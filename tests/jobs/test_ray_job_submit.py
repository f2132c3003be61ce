"""The job modules run unchanged as Ray jobs: train then encode submitted with the Jobs SDK to a real
Ray head (`ray start --head` on loopback), with the repo uploaded as the working_dir. The drivers must
join that cluster through the RAY_ADDRESS Ray sets for them, not start a Ray of their own."""
from __future__ import annotations

import pathlib
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.parquet_io import read_manifest
from pipeline.uris import resolve

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

EXCLUDES = [".venv", ".git", "vaepipe-work", "mlflow.db", "mlruns", "mlartifacts", "*.egg-info",
            "**/__pycache__", ".pytest_cache", "tests", "docs", "infra"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_and_wait(client, entrypoint: str, timeout_s: float = 300) -> tuple[str, str, object]:
    """Submit, wait (bounded) for a terminal status; returns (status, logs, job info)."""
    from ray.job_submission import JobStatus

    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while str(status.value if isinstance(status, JobStatus) else status) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(2)
        status = client.get_job_status(job_id)
    return str(status.value), client.get_job_logs(job_id), client.get_job_info(job_id)


def test_train_then_encode_as_ray_jobs(ray_head, digits_parquet, tmp_path):
    from ray.job_submission import JobSubmissionClient

    work = tmp_path / "work"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "latents"
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.headers)

    status, logs, info = submit_and_wait(client, (
        f"python -m jobs.train --input {digits_parquet} --features image --hidden 8,16 --latent-dim 2 "
        f"--epochs 1 --workers 1 --batch-size 128 --model-name digits-job --promote force "
        f"--tracking-uri {tracking} --workdir {work}"))
    assert status == "SUCCEEDED", f"train job {status}:\n{logs[-6000:]}"
    assert "trained 1 epoch(s)" in logs and "registered models:/digits-job/1 (promoted: True)" in logs, logs[-4000:]
    # the driver joined this head (Ray set RAY_ADDRESS for it) instead of starting a local Ray
    joined = f"Connecting to existing Ray cluster at address: {ray_head.address}"
    assert joined in logs and "Started a local Ray instance" not in logs, logs[-4000:]
    assert info.driver_info is not None and info.driver_info.node_ip_address == "127.0.0.1"  # on this head

    status, logs, info = submit_and_wait(client, (
        f"python -m jobs.encode --model models:/digits-job@production --input {digits_parquet} "
        f"--output {out} --keep id,label --tracking-uri {tracking} --workdir {work}"))
    assert status == "SUCCEEDED", f"encode job {status}:\n{logs[-6000:]}"
    assert "encoded 1,797 of 1,797 records (0 skipped)" in logs, logs[-4000:]
    assert joined in logs and "Started a local Ray instance" not in logs, logs[-4000:]
    assert info.driver_info is not None

    # the committed output: every input id once, a finite 2-d μ each, the version recorded
    assert (out / "_SUCCESS").exists() and read_manifest(resolve(str(out)))["rows"] == 1797
    got = pq.read_table(str(out), partitioning=None)
    want = pq.read_table(str(digits_parquet), columns=["id", "label"], partitioning=None)
    assert got.num_rows == want.num_rows == 1797
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    mu = np.asarray(got.column("mu").to_pylist(), dtype=np.float32)
    assert mu.shape == (1797, 2) and np.isfinite(mu).all()
    md = pq.read_schema(next(p for p in out.glob("*.parquet"))).metadata or {}
    assert md.get(b"vaepipe.model_uri") == b"models:/digits-job/1"

    # the jobs are listed on the head, both succeeded
    statuses = {j.entrypoint.split()[2]: str(j.status.value) for j in client.list_jobs()}
    assert statuses == {"jobs.train": "SUCCEEDED", "jobs.encode": "SUCCEEDED"}
