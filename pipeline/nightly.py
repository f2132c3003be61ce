"""`vaepipe nightly`: encode only the partitions that this model version has not encoded yet.

Partitions are the input's top-level folders (hive style, `date=2026-11-24/`) or, for a flat
folder, its files. The model alias is resolved once per run; each partition is encoded and
committed atomically into OUT/<partition>/ (encode's staging → manifest → _SUCCESS), and only then
recorded in OUT/_vaepipe_state.json (written atomically). A run that dies part-way leaves every
committed partition recorded and the rest to the next run: re-running is always safe."""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, fields

from pipeline import registry
from pipeline.config import opt
from pipeline.encode import EncodeConfig, run_encode
from pipeline.errors import InputError
from pipeline.parquet_io import write_bytes_atomic
from pipeline.uris import resolve

STATE = "_vaepipe_state.json"


@dataclass
class NightlyConfig(EncodeConfig):
    max_partitions: int | None = opt(None, "encode at most this many pending partitions this run")


def partitions(uri: str, **storage_options) -> list[str]:
    loc = resolve(uri, **storage_options)
    if not loc.fs.exists(loc.path):
        raise InputError(f"input {uri!r} does not exist")
    names = []
    for entry in loc.fs.ls(loc.path, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.startswith(("_", ".")):
            continue
        if entry["type"] == "directory" or name.endswith(".parquet"):
            names.append(name)
    return sorted(names)


def read_state(out_uri: str, **storage_options) -> dict:
    out = resolve(out_uri, **storage_options)
    path = posixpath.join(out.path, STATE)
    if not out.fs.exists(path):
        return {"partitions": {}}
    with out.fs.open(path, "rb") as f:
        return json.loads(f.read())


def run_nightly(cfg: NightlyConfig) -> dict:
    tracking = cfg.resolved_tracking_uri()
    ref, blob = registry.load_model_bytes(cfg.model, tracking)   # one version for the whole run
    so = cfg.storage_options_dict()
    out = resolve(cfg.output, **so)
    state = read_state(cfg.output, **so)
    done, skipped, t0 = [], [], time.perf_counter()
    pending = []
    for part in partitions(cfg.input, **so):
        prev = state["partitions"].get(part)
        if prev and prev["model_uri"] == ref.uri:
            skipped.append(part)
        else:
            pending.append(part)
    if cfg.max_partitions is not None:
        pending = pending[: cfg.max_partitions]
    base = {f.name: getattr(cfg, f.name) for f in fields(EncodeConfig)}
    for part in pending:
        sub_out = posixpath.join(cfg.output.rstrip("/"), part.removesuffix(".parquet"))
        hive = dict([part.split("=", 1)]) if "=" in part else {}   # keep date=… as a column, like encode
        r = run_encode(EncodeConfig(**{**base, "input": posixpath.join(cfg.input.rstrip("/"), part), "output": sub_out}),
                       model_blob=(ref, blob), constants=hive)
        state["partitions"][part] = {"model_uri": ref.uri, "model_version": ref.version, "rows": r.rows_out,
                                     "skipped_records": r.skipped, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        out.fs.makedirs(out.path, exist_ok=True)
        write_bytes_atomic(out, posixpath.join(out.path, STATE), json.dumps(state, indent=1).encode())
        done.append((part, r.rows_out))
    return {"model_uri": ref.uri, "encoded": done, "skipped": skipped, "wall_s": time.perf_counter() - t0}
