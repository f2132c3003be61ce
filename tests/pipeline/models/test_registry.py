"""The registry read path tells a missing model from a failing store: a locked SQLite store is asked
again until it answers, and one that stays locked is reported as the store's own error, never as
"no such version" (which sent users looking for a model that was there) nor as "no alias yet" (which
would let `train` promote a worse model past the one holding the alias)."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

import pytest

from pipeline.models import registry
from pipeline.runtime.errors import ModelNotFoundError, RegistryError

BUSY_TIMEOUT_S = 20   # MLflow's SQLite sessions wait this long on a lock before "database is locked"


@pytest.fixture
def store(tmp_path, empty_mlflow_db):
    """A SQLite store with model `m`, version 1, alias `production`."""
    empty_mlflow_db(str(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = registry.client(uri)
    c.create_registered_model("m")
    mv = c.create_model_version("m", source=f"file://{tmp_path}/model", run_id=None)
    c.set_registered_model_alias("m", "production", mv.version)
    return uri, os.path.join(str(tmp_path), "mlflow.db")


def test_missing_version_or_alias_is_model_not_found_with_the_stores_answer(store):
    uri, _ = store
    with pytest.raises(ModelNotFoundError, match=r"has no version 7 .*known aliases: \{'production': 1\}.*"
                                                 r"the store said: .*not found"):
        registry.resolve_model("models:/m/7", uri)
    with pytest.raises(ModelNotFoundError, match="has no alias 'staging'"):
        registry.resolve_model("models:/m@staging", uri)
    assert registry.current_alias_version("m", "staging", uri) is None     # truly absent: None
    assert registry.current_alias_version("m", "production", uri) == "1"


def test_locked_store_is_a_registry_error_or_is_asked_again_until_it_answers(store, caplog):
    uri, path = store
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")   # what a writer holding the file looks like to every reader
    out: dict[str, object] = {}

    def attempt(key, fn):
        t = time.monotonic()
        try:
            out[key] = fn()
        except Exception as e:   # kept to assert on below, in the test's thread
            out[key] = e
        out[key + "_s"] = time.monotonic() - t

    jobs = {"no_retry": lambda: registry.resolve_model("models:/m@production", uri, retry_s=0),
            "alias_no_retry": lambda: registry.current_alias_version("m", "production", uri, retry_s=0),
            "retry": lambda: registry.resolve_model("models:/m@production", uri, retry_s=60),
            # train's last step: the name's creation is asked again, then the version is created once
            "register": lambda: registry.register(f"file://{os.path.dirname(path)}/model", "m", uri, None),
            # and its promotion: the alias is set once the store answers
            "alias": lambda: registry.set_alias_when_ready("m", "staging", "1", uri, retry_s=60)}
    threads = [threading.Thread(target=attempt, args=kv) for kv in jobs.items()]
    with caplog.at_level(logging.WARNING, logger="pipeline.models.registry"):
        for t in threads:
            t.start()
        time.sleep(BUSY_TIMEOUT_S + 4)   # past every first attempt's busy timeout, then release
        lock.execute("ROLLBACK")
        lock.close()
        for t in threads:
            t.join(timeout=120)

    for key in ("no_retry", "alias_no_retry"):
        e = out[key]
        assert isinstance(e, RegistryError), (key, e)   # not ModelNotFoundError, not None ("no alias yet")
        assert "database is locked" in str(e) and path in str(e) and "[SQL:" not in str(e)
        assert e.exit_code == 5
    ref = out["retry"]
    assert isinstance(ref, registry.ModelRef) and ref.version == "1", ref
    assert out["retry_s"] > BUSY_TIMEOUT_S                # it did meet the lock, and asked again
    mv = out["register"]
    assert not isinstance(mv, Exception) and str(mv.version) == "2" and mv.status == "READY", mv
    assert sorted(str(v.version) for v in registry.client(uri).search_model_versions("name='m'")) == ["1", "2"]
    assert out["alias"] is None and out["alias_s"] > BUSY_TIMEOUT_S, out["alias"]
    assert registry.current_alias_version("m", "staging", uri) == "1"
    assert any("registry busy" in r.getMessage() for r in caplog.records)


def test_train_promotion_past_a_store_that_stays_locked_says_the_alias_did_not_move(store, monkeypatch, capsys):
    from pipeline.training.train import promote
    from pipeline.training.train_config import TrainConfig

    uri, path = store
    monkeypatch.setattr(registry, "READ_RETRY_S", 1)   # one busy timeout, then give up (the default asks for 60 s)
    cfg = TrainConfig(input="in/", features=["x"], model_name="m", alias="staging", promote="force")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RegistryError, match=r"alias 'staging' was not moved: .*database is locked") as e:
            promote(cfg, "1", model=None, data=None, val_ds=None, tracking=uri)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert e.value.exit_code == 5 and "registry:" not in capsys.readouterr().out   # no decision printed
    assert registry.current_alias_version("m", "staging", uri) is None            # and none made
