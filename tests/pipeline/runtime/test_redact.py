"""pipeline.runtime.redact and the MLflow params/tags that train builds with it: storage options and URI
passwords never come out, harmless settings do."""
from __future__ import annotations

import json
import logging

import pytest

from pipeline.runtime.redact import (MASK, RedactFilter, RedactingStream, redact_options, redact_text, redact_uri,
                             secrets_in_args, secrets_in_env, secrets_in_options)

PW = "pw-Zq9x"
KEY, SECRET = "AKIAEXAMPLEKEY", "wJalrXUtnFEMI-K7MDENG"
OPTIONS = {"key": KEY, "secret": SECRET, "endpoint_url": f"http://minio:{PW}@10.0.0.5:9000",
           "client_kwargs": {"region_name": "us-east-1", "aws_session_token": "tok-123456"}, "anon": False}


@pytest.mark.parametrize("uri, expected", [
    (f"http://vaepipe:{PW}@127.0.0.1:5000", "http://vaepipe:***@127.0.0.1:5000"),
    (f"postgresql://mlflow:{PW}@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    (f"https://acct.blob.core.windows.net/c/x?sv=1&sig={PW}&se=2", "https://acct.blob.core.windows.net/c/x?sv=1&sig=***&se=2"),
    (f"s3://bucket/x?X-Amz-Credential={PW}", "s3://bucket/x?X-Amz-Credential=***"),
    ("http://127.0.0.1:5000/api@x", "http://127.0.0.1:5000/api@x"),        # no userinfo: a port, then a path
    ("s3://vaepipe-data/events/", "s3://vaepipe-data/events/"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_options_masks_credentials_and_keeps_settings():
    red = redact_options(OPTIONS)
    assert red == {"key": MASK, "secret": MASK, "endpoint_url": "http://minio:***@10.0.0.5:9000",
                   "client_kwargs": {"region_name": "us-east-1", "aws_session_token": MASK}, "anon": False}
    assert not {KEY, SECRET, PW, "tok-123456"} & set(json.dumps(red).split('"'))


def test_secrets_in_options_parsed_and_malformed():
    assert secrets_in_options(json.dumps(OPTIONS)) == {KEY, SECRET, PW, "tok-123456"}
    assert secrets_in_options(OPTIONS) == {KEY, SECRET, PW, "tok-123456"}
    broken = f'{{"key": "{KEY}", "secret": "{SECRET}"'           # not valid JSON: still scrubbed
    assert {KEY, SECRET, broken} <= secrets_in_options(broken)
    assert secrets_in_options("") == set()


def test_secrets_in_args_and_config_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"storage_options:\n  key: {KEY}\n  secret: {SECRET}\ntracking_uri: http://u:{PW}@h:5000\n")
    argv = ["--input", "s3://b/x", "--storage-options", json.dumps({"secret": "from-argv"}),
            f"--tracking-uri=http://u:other-{PW}@h:1", "--config", str(cfg)]
    assert secrets_in_args(argv) == {"from-argv", f"other-{PW}", KEY, SECRET, PW}
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": f"http://u:{PW}@h", "HOME": "/home/x"}
    assert secrets_in_env(env) == {SECRET, PW}


def test_redact_text_known_and_shaped_secrets():
    text = (f"cannot open s3://b/x with {{'key': '{KEY}', 'secret': '{SECRET}'}} via http://u:{PW}@h:5000; "
            f'json {{"password": "p@ss word"}}, token=abc123 and {SECRET!r} again; author: me; KeyError: 3')
    red = redact_text(text, {SECRET})
    for s in (KEY, SECRET, PW, "p@ss word", "abc123"):
        assert s not in red, (s, red)
    assert "s3://b/x" in red and "author: me" in red and "KeyError: 3" in red
    # a secret with quotes/backslashes, as repr() and json.dumps() escape it
    odd = "a'b\\c\"d"
    assert odd not in redact_text(repr(odd) + json.dumps(odd), {odd}) and "b\\\\c" not in redact_text(repr(odd), {odd})


def test_log_filter_and_stream(capsys):
    logger = logging.getLogger("vaepipe.test_redact")
    handler = logging.StreamHandler(RedactingStream(__import__("sys").stderr, {SECRET}))
    handler.addFilter(RedactFilter({SECRET}))
    logger.addHandler(handler)
    try:
        logger.warning("options %s for %s", {"secret": SECRET}, f"http://u:{PW}@h")
        try:
            raise RuntimeError(f"boom with {SECRET}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "RuntimeError: boom with ***" in err and "http://u:***@h" in err
    assert SECRET not in err and PW not in err


def test_train_params_and_tags_hold_no_credentials():
    from pipeline.training.train import TrainConfig, lineage_tags, run_params

    cfg = TrainConfig(input=f"s3://vaepipe-data/mnist/?X-Amz-Signature={PW}", features=["image"],
                      tracking_uri=f"http://vaepipe:{PW}@127.0.0.1:5000", storage_path="s3://vaepipe-data/checkpoints",
                      storage_options=json.dumps(OPTIONS), val_input=f"hdfs://etl:{PW}@nn:8020/val/")

    class Model:
        def to_dict(self):
            return {"latent_dim": 16}

    params = run_params(cfg)
    from types import SimpleNamespace

    tags = lineage_tags(cfg, SimpleNamespace(fingerprint="fp", rows=10, model=Model()),
                        run_dir=f"s3://vaepipe-data/checkpoints/vae-1?sig={PW}")
    recorded = json.dumps([params, tags])
    for s in (PW, KEY, SECRET, "tok-123456"):
        assert s not in recorded, s
    assert "tracking_uri" not in params and "storage_options" not in params
    assert params["storage_path"] == "s3://vaepipe-data/checkpoints" and params["features"] == '["image"]'
    assert params["val_input"] == "hdfs://etl:***@nn:8020/val/"
    assert tags["input_uri"] == "s3://vaepipe-data/mnist/?X-Amz-Signature=***"
    assert all(isinstance(v, str) for v in {**params, **tags}.values())


def test_train_refuses_non_object_storage_options_without_echoing_them():
    from pipeline.runtime.errors import ConfigError
    from pipeline.training.train import TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig(input="x", features=["f"], storage_options=json.dumps([KEY, SECRET]))
    assert KEY not in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize("uri", [f"http://u:{PW}@evil.example/x.parquet", f"s3://b/../x?sig={PW}"])
def test_refused_uris_are_named_without_their_password(uri):
    from pipeline.runtime.errors import InputError
    from pipeline.table.uris import check_uri

    with pytest.raises(InputError) as e:
        check_uri(uri)
    assert PW not in str(e.value) and MASK in str(e.value)
