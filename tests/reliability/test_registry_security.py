"""Cases 13–15: aliases only on READY versions; pickled objects refused; user URIs confined."""
from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from jobs.cli import main as cli_main
from pipeline.models import registry
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import InputError, ModelNotFoundError
from pipeline.table.uris import check_uri
from vae.checkpoint import FORMAT, CheckpointError, load_checkpoint


def test_13_alias_moves_only_to_a_ready_version(trained_digits, workdir):
    """The SQLite store creates versions READY at once, so a PENDING_REGISTRATION version is made the
    way an async store (Databricks/Unity) leaves one: the same row with status PENDING_REGISTRATION,
    written through the store's own SQL schema. set_alias_when_ready must refuse it."""
    import sqlalchemy as sa

    tracking = f"sqlite:///{workdir}/mlflow.db"
    c = registry.client(tracking)
    prod = c.get_model_version_by_alias("digits", "production")
    # a second version of the same artifacts, through vaepipe's own register (a raw
    # MlflowClient.create_model_version of a models:/m-… source resolves the logged model through
    # MLflow's *global* tracking URI and fails against a per-client SQLite store)
    pending = registry.register(prod.source, "digits", tracking, prod.run_id)
    assert pending.status == "READY"
    eng = sa.create_engine(tracking)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE model_versions SET status='PENDING_REGISTRATION' WHERE name='digits' "
                             "AND version=:v"), {"v": int(pending.version)})
    eng.dispose()
    assert c.get_model_version("digits", pending.version).status == "PENDING_REGISTRATION"
    with pytest.raises(ModelNotFoundError) as e:
        registry.set_alias_when_ready("digits", "production", pending.version, tracking)
    assert "PENDING_REGISTRATION" in str(e.value)
    assert c.get_model_version_by_alias("digits", "production").version == prod.version   # alias unmoved
    # once READY, the same call moves the alias
    eng = sa.create_engine(tracking)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE model_versions SET status='READY' WHERE name='digits' AND version=:v"),
                     {"v": int(pending.version)})
    eng.dispose()
    try:
        registry.set_alias_when_ready("digits", "production", pending.version, tracking)
        assert c.get_model_version_by_alias("digits", "production").version == pending.version
    finally:
        c.set_registered_model_alias("digits", "production", prod.version)


class Evil:
    """Unpickling this runs a shell command: a weights-only loader must never call it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: str, marker: str) -> None:
    torch.save({"format": FORMAT, "config": {}, "model": {}, "epoch": 0, "extra": {"x": Evil(marker)}}, path)


def test_14_pickled_object_in_checkpoint_or_registered_model_is_refused(trained_digits, workdir, tmp_path):
    marker = str(tmp_path / "PWNED")
    ck = str(tmp_path / "checkpoint.pt")
    _evil_checkpoint(ck, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck)
    assert "checkpoint.pt" in str(e.value) and not os.path.exists(marker)

    # a registered version whose checkpoint.pt was swapped for a malicious pickle
    import mlflow

    tracking = f"sqlite:///{workdir}/mlflow.db"
    c = registry.client(tracking)
    prod = c.get_model_version_by_alias("digits", "production")
    with registry.using_tracking(tracking):   # models:/m-… sources resolve through the global URI
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/digits/{prod.version}",
                                                    dst_path=str(tmp_path / "dl"), tracking_uri=tracking)
    found = glob.glob(os.path.join(local, "**", "checkpoint.pt"), recursive=True)
    assert found
    _evil_checkpoint(found[0], marker)
    exp = c.get_experiment_by_name("vaepipe").experiment_id
    run = c.create_run(exp, run_name="tampered")
    c.log_artifacts(run.info.run_id, local, "model")
    c.set_terminated(run.info.run_id)
    mv = registry.register(run.info.artifact_uri.rstrip("/") + "/model", "digits", tracking, run.info.run_id)
    inp = str(tmp_path / "in")
    shutil.copytree(_digits_dir(), inp)
    with pytest.raises(CheckpointError):
        run_encode(EncodeConfig(model=f"models:/digits/{mv.version}", input=inp, output=str(tmp_path / "out"),
                                workdir=workdir, concurrency=1))
    assert not os.path.exists(marker) and not os.path.exists(str(tmp_path / "out"))


def _digits_dir():
    import tempfile

    from pipeline.evaluation.datasets import digits, images_table, write_parquet

    x, y = digits()
    return write_parquet(images_table(x[:100], y[:100]), tempfile.mkdtemp(prefix="rel14-"), files=1)


@pytest.mark.parametrize("flag,uri,why", [
    ("--input", "data/../../etc", "'..'"),
    ("--output", "/tmp/out/../../home", "'..'"),
    ("--input", "s3://bucket/a/../b", "'..'"),
    ("--input", "http://evil.example/x.parquet", "not allowed"),
    ("--output", "ftp://host/out", "not allowed"),
])
def test_15_user_uris_dotdot_and_unlisted_schemes_rejected_by_cli(flag, uri, why, tmp_path, capsys):
    args = {"--input": str(tmp_path / "in"), "--output": str(tmp_path / "out")}
    args[flag] = uri
    rc = cli_main(["encode", "--model", "models:/digits@production", "--workdir", str(tmp_path),
                   "--input", args["--input"], "--output", args["--output"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error" in err and uri in err and why in err, err
    with pytest.raises(InputError):
        check_uri(uri)
    assert not os.path.exists(str(tmp_path / "out"))
