"""Credentials never printed: a real `vaepipe encode` process whose error names a tracking URI with a
password and runs with storage options holding a key and a secret; malformed storage options; an
unexpected exception's traceback and log lines; and the params and tags of a real MLflow run trained
through `http://user:PASSWORD@127.0.0.1:PORT`."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.jobs.credentials import KEY, OPTIONS, PW, SECRET

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_encode_process_error_shows_no_password_or_storage_secret(digits_parquet, tmp_path):
    with socket.socket() as sock:           # a free port that nothing listens on: the model lookup fails
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "VAEPIPE_LOG": "INFO"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vaepipe"), "encode",
                        "--model", "models:/digits@production", "--input", digits_parquet,
                        "--output", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                        "--tracking-uri", f"http://vaepipe:{PW}@127.0.0.1:{port}", "--storage-options", OPTIONS],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 5 and "the registry at" in p.stderr, out   # RegistryError: the store failed, not the model
    # the error names the server it could not reach, without its password
    assert f"http://vaepipe:***@127.0.0.1:{port}" in p.stderr, p.stderr
    for s in (PW, KEY, SECRET):
        assert s not in out, out


def test_malformed_storage_options_are_not_echoed(capsys, tmp_path):
    from jobs.cli import main

    broken = f'{{"key": "{KEY}", "secret": "{SECRET}"'          # the closing brace is missing
    rc = main(["encode", "--model", "models:/digits@production", "--input", str(tmp_path), "--output",
               str(tmp_path / "out"), "--workdir", str(tmp_path), "--storage-options", broken])
    err = capsys.readouterr().err
    assert rc == 2 and "storage_options" in err, err
    assert KEY not in err and SECRET not in err, err


def test_unexpected_error_traceback_and_log_lines_are_redacted(capsys, monkeypatch, tmp_path):
    import jobs.query
    from jobs.cli import main

    def run(cfg):
        log = logging.getLogger("pipeline.search.query")
        log.warning("reading with %s", json.loads(cfg_options))
        print(f"connecting to {cfg.tracking_uri}")
        raise RuntimeError(f"fsspec failed: {cfg_options}")

    cfg_options = OPTIONS
    monkeypatch.setattr(jobs.query, "run", run)
    root = logging.getLogger()
    handler = logging.StreamHandler()        # stands for whatever handler a job's logging goes to
    root.addHandler(handler)
    try:
        rc = main(["query", "--latents", str(tmp_path), "--id", "1", "--workdir", str(tmp_path),
                   "--tracking-uri", f"http://u:{PW}@127.0.0.1:5000"])
    finally:
        root.removeHandler(handler)
    cap = capsys.readouterr()
    assert rc == 1
    assert "RuntimeError: fsspec failed:" in cap.err and "connecting to http://u:***@127.0.0.1:5000" in cap.out
    for s in (PW, KEY, SECRET):
        assert s not in cap.out + cap.err, cap
    assert sys.stdout is not None and not type(sys.stderr).__name__ == "RedactingStream"   # restored


@pytest.mark.slow
def test_mlflow_run_through_a_password_uri_records_no_password(mlflow_server, http_trained):
    from mlflow import MlflowClient

    r, _ = http_trained   # trained through http://vaepipe:PW@… with a key and a secret in its storage options
    c = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    run = c.get_run(r.run_id)
    mv = c.get_model_version("digits-http", r.version)
    recorded = json.dumps([run.data.params, run.data.tags, mv.tags, mv.source, run.info.artifact_uri])
    assert run.data.params["epochs"] == "1" and "vaepipe.input_uri" in run.data.tags
    for s in (PW, KEY, SECRET):
        assert s not in recorded, s
