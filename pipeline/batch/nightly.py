"""`vaepipe nightly`: encode the partitions whose input changed, or that another model version encoded.

Partitions are the input's top-level folders (hive style, `date=2026-11-24/`) or, for a flat folder,
its files. For each partition the state (`state.json` in the output's control folder) records the
input files it was encoded from (relative path, size and a fingerprint: the ETag on object stores,
the modification time elsewhere) and the model version. A partition is encoded again when a file is
added, removed or rewritten, when the model version moves, or when its last run failed; the run
says why. The whole run holds the output's lease (one writer per output); the model alias is
resolved once; each partition is encoded and committed atomically into OUT/<partition>/ and only
then recorded in the state. A failing partition is recorded as failed with its reason and the
others still commit; the run then exits with status 3, naming the failed ones, and the next run
retries them. A run that dies part-way leaves every committed partition recorded: re-running is
always safe."""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, fields
from typing import Any

from pipeline.table.commit import control_of, partition_control, read_json, safe_name, safe_relpath, write_bytes_atomic
from pipeline.runtime.config import opt
from pipeline.batch.encode import EncodeConfig, Target, build_index_locked, load_models, run_encode
from pipeline.runtime.errors import InputError, LeaseLostError, ManifestError, PartialFailure, VaepipeError
from pipeline.table.lease import hold_lease
from pipeline.table.parquet_io import is_parquet_name
from pipeline.table.uris import Location, resolve

STATE = "state.json"
LEGACY_STATE = "_vaepipe_state.json"


@dataclass
class NightlyConfig(EncodeConfig):
    max_partitions: int | None = opt(None, "encode at most this many pending partitions this run")


# --- what the input holds now ----------------------------------------------------------------------

def _fingerprint(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v not in (None, ""):
            return f"{key}:{v}"
    return ""


def partitions(loc: Location) -> list[str]:
    if not loc.fs.exists(loc.path):
        raise InputError(f"input {loc.uri!r} does not exist")
    names = []
    for entry in loc.fs.ls(loc.path, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.startswith(("_", ".")):
            continue
        if entry["type"] == "directory" or name.endswith(".parquet"):
            names.append(name)
    return sorted(names)


def partition_files(loc: Location, part: str) -> dict[str, dict[str, Any]]:
    """{path relative to the partition: {size, fingerprint}} of the Parquet files of one partition
    (one LIST, no reads). A flat partition (a file) is keyed by its own name."""
    path = posixpath.join(loc.path, part)
    if loc.fs.isfile(path):
        info = loc.fs.info(path)
        return {part: {"size": int(info.get("size") or 0), "fingerprint": _fingerprint(info)}}
    found = loc.fs.find(path, detail=True)
    out = {}
    for p, info in sorted(found.items()):
        rel = posixpath.relpath(p, path)
        if info.get("type") == "directory" or any(s.startswith(("_", ".")) for s in rel.split("/")):
            continue
        if is_parquet_name(posixpath.basename(rel)):
            out[rel] = {"size": int(info.get("size") or 0), "fingerprint": _fingerprint(info)}
    return out


RECORDED_SINCE = {"embedding": False}
"""Settings output_columns records that older states lack, with the value those states were written with."""


def output_columns(cfg: EncodeConfig, score_model_uris: list[str]) -> dict[str, Any]:
    """What the run writes beside the ids, recorded per partition: a partition written with other
    settings is encoded again, so every partition of the table has the same columns and meaning."""
    return {"logvar": cfg.logvar, "embedding": cfg.embedding, "dtype": cfg.dtype, "predict": cfg.predict,
            "score": cfg.score_kind if cfg.score else None, "score_models": score_model_uris if cfg.score else []}


def why_encode(prev: dict | None, files: dict[str, dict], model_uri: str,
               columns: dict[str, Any] | None = None) -> str | None:
    """Why a partition must be (re-)encoded, or None when its committed output is current. A state
    written before columns were recorded is taken as written with this run's settings."""
    if not prev:
        return "new partition"
    if prev.get("status") == "failed":
        return f"retry (last run failed: {prev.get('error', '?')})"
    old = prev.get("files")
    if not isinstance(old, dict):   # written by a version that recorded no file set
        return "no file set recorded"
    added = [f for f in files if f not in old]
    removed = [f for f in old if f not in files]
    rewritten = [f for f in files if f in old and old[f] != files[f]]
    plural = lambda n, what: f"{n} {what}{'s' if n > 1 and what.endswith('file') else ''}"
    changes = [plural(len(v), what) for v, what in ((added, "new file"), (removed, "removed file"),
                                                     (rewritten, "rewritten")) if v]
    if prev.get("model_uri") != model_uri:
        changes.insert(0, f"model {prev.get('model_uri')} → {model_uri}")
    old_cols = prev.get("columns")
    if columns is not None and isinstance(old_cols, dict):
        old_cols = {**RECORDED_SINCE, **old_cols}
        changes += [f"{k} {old_cols.get(k)} → {v}" for k, v in columns.items() if old_cols.get(k) != v]
    return ", ".join(changes) or None


# --- the state: untrusted input, changed under the lease only ---------------------------------------

def validate_state(state: Any, source: str) -> dict:
    if not isinstance(state, dict) or not isinstance(state.get("partitions", {}), dict):
        raise ManifestError(f"{source}: not a vaepipe nightly state (expected an object with 'partitions')")
    for part, entry in state.get("partitions", {}).items():
        safe_name(part, f"{source}: partition")
        if not isinstance(entry, dict):
            raise ManifestError(f"{source}: partition {part!r} is not an object")
        files = entry.get("files")
        if files is not None:
            if not isinstance(files, dict):
                raise ManifestError(f"{source}: partition {part!r}: files must be an object")
            for rel in files:
                safe_relpath(rel, f"{source}: partition {part!r} file")
    state.setdefault("partitions", {})
    return state


def read_state(out: Location) -> dict:
    """The state in the control folder (or a legacy OUT/_vaepipe_state.json), validated."""
    ctl = control_of(out)
    for loc, path in ((ctl, posixpath.join(ctl.path, STATE)), (out, posixpath.join(out.path, LEGACY_STATE))):
        state = read_json(loc, path)
        if state is not None:
            return validate_state(state, loc.full(path))
    return {"partitions": {}}


def write_state(out: Location, state: dict) -> None:
    ctl = control_of(out)
    out.fs.makedirs(ctl.path, exist_ok=True)
    write_bytes_atomic(ctl, posixpath.join(ctl.path, STATE), json.dumps(state, indent=1, sort_keys=True).encode())
    legacy = posixpath.join(out.path, LEGACY_STATE)
    if out.fs.exists(legacy):
        out.fs.rm(legacy)


# --- the run ----------------------------------------------------------------------------------------

def index_is_fresh(out: Location, cfg: NightlyConfig) -> bool:
    """Whether the output's index covers it as committed now (a run with nothing to encode still
    builds a missing or stale one)."""
    from pipeline.search.ann import freshness, read_pointer
    from pipeline.search.latents import Latents
    from pipeline.table.parquet_io import list_parquet_files

    try:
        files = list_parquet_files(out)
    except InputError:
        return True   # nothing committed yet: nothing to index
    if not files:
        return True
    try:
        return freshness(read_pointer(out), Latents(out, files), "mu") is None
    except ManifestError:
        return False

def run_nightly(cfg: NightlyConfig, log=print) -> dict:
    so = cfg.storage_options_dict()
    loc, out = resolve(cfg.input, **so), resolve(cfg.output, **so)
    ctl = control_of(out)
    with hold_lease(ctl, out.uri, "nightly", cfg.lease_ttl, cfg.wait) as lease:
        return _nightly(cfg, loc, out, lease, log)


def _nightly(cfg: NightlyConfig, loc: Location, out: Location, lease, log) -> dict:
    t0 = time.perf_counter()
    ref, blob, scorers = load_models(cfg)   # one version of each model for the run
    columns = output_columns(cfg, [r.uri for r, _ in scorers])
    state = read_state(out)
    pending, current = [], []
    present = partitions(loc)
    gone = sorted(p for p in state["partitions"] if p not in present and p.removesuffix(".parquet") not in present)
    for part in gone:   # their outputs stay: an input's retention is not the latents'
        log(f"kept     {part}: its input is gone; its encoded output stays (delete OUT/{part} to drop it)")
    for part in present:
        safe_name(part, f"{loc.uri}: partition")
        files = partition_files(loc, part)
        reason = why_encode(state["partitions"].get(part), files, ref.uri, columns)
        (pending if reason else current).append((part, files, reason))
    if cfg.max_partitions is not None:
        pending = pending[: cfg.max_partitions]
    base = {f.name: getattr(cfg, f.name) for f in fields(EncodeConfig)}
    done, failed = [], []
    for part, files, reason in pending:
        log(f"encoding {part}: {reason}")
        name = part.removesuffix(".parquet")
        part_in = loc.join(part)
        paths = [part_in.path] if loc.fs.isfile(part_in.path) else [posixpath.join(part_in.path, f) for f in files]
        sub = EncodeConfig(**{**base, "input": part_in.uri, "output": out.join(name).uri, "index": ""})
        entry = {"files": files, "model_uri": ref.uri, "model_version": ref.version, "columns": columns,
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            r = run_encode(sub, models=(ref, blob, scorers), files=paths,
                           target=Target(partition_control(control_of(out), name), lease))
        except LeaseLostError:
            raise
        except Exception as e:   # one partition's failure must not stop the night: recorded, retried
            msg = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
            if not isinstance(e, VaepipeError):
                msg = f"{type(e).__name__}: {msg}"
            entry.update(status="failed", error=msg)
            failed.append((part, msg))
            log(f"FAILED   {part}: {msg}")
        else:
            entry.update(status="ok", rows=r.rows_out, skipped_records=r.skipped)
            done.append((part, r.rows_out))
            log(f"encoded  {part}: {r.rows_out:,} records")
        lease.check()
        state = read_state(out)   # re-read under the lease: never drop an entry another run wrote
        state["partitions"][part] = entry
        write_state(out, state)
    if cfg.index and (done or not index_is_fresh(out, cfg)):
        lease.check()
        build_index_locked(out, lease, cfg, log)   # the whole output; unchanged partitions keep their cells
    result = {"model_uri": ref.uri, "encoded": done, "failed": failed, "reasons": {p: w for p, _, w in pending},
              "current": [p for p, _, _ in current], "input_gone": gone, "wall_s": time.perf_counter() - t0}
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(pending)} partition(s) failed and will be retried by the next "
                             f"run: " + "; ".join(f"{p}: {m}" for p, m in failed), result=result)
    return result
