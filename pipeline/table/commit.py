"""Committed outputs: what any reader of an output folder sees is exactly one run's rows.

An output folder OUT holds only the data (`part-*.parquet`, in hive folders where the input had them)
and an empty `_SUCCESS`: a recursive glob (`OUT/**/*.parquet`), `pyarrow.dataset(OUT)`, Polars and
pandas read it as it is. Everything else lives in the output's *control folder*, a sibling that no
reader of OUT reaches:

    <parent>/_<name>.vaepipe/
        manifest.json          the commit point: the committed files and their rows
        staging/<run>/         parts being written (moved into OUT at commit)
        quarantine/            the records a run skipped (--on-bad-record skip)
        lease/                 one writer per output (pipeline.table.lease)
        state.json             nightly: what each partition was encoded from
        partitions/<p>/        nightly: each partition OUT/<p>/ is a table of its own (manifest, staging)

A manifest (and the state) is read back from storage, so it is untrusted: every path in it must be a
plain relative name inside the output; anything else is a ManifestError before anything is read,
moved or deleted.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import time
import uuid
from typing import Any

from pipeline.runtime.errors import ConfigError, ManifestError
from pipeline.table.uris import Location

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
LEGACY_MANIFEST = "_manifest.json"   # outputs written before the control folder: read, then migrated
CONTROL_SUFFIX = ".vaepipe"
_PART = re.compile(r"^part-\d{5}-[A-Za-z0-9_-]+\.parquet$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# --- where things live --------------------------------------------------------------------------------

def control_of(out: Location) -> Location:
    """The control folder of output `out`: the sibling `_<name>.vaepipe` (no reader of OUT sees it)."""
    path = out.path.rstrip("/")
    parent, name = posixpath.split(path)
    if not name or not parent or name.startswith(("_", ".")):
        raise ConfigError(f"output {out.uri!r}: expected a folder below a bucket or directory root whose name "
                          f"does not start with '_' or '.' (its control folder is a sibling)")
    ctl = f"_{name}{CONTROL_SUFFIX}"
    uri = out.uri.rstrip("/")
    return Location(uri[: len(uri) - len(name)] + ctl, out.fs, posixpath.join(parent, ctl))


def partition_control(root_control: Location, part: str) -> Location:
    """The control folder of nightly partition OUT/<part>, inside the root's control folder."""
    safe_name(part, "partition")
    return root_control.join("partitions", part)


def safe_relpath(p: Any, what: str) -> str:
    """A plain relative path inside a folder: no leading '/', no '..' or '.', no scheme, no backslash."""
    if not isinstance(p, str) or not p or len(p) > 1024:
        raise ManifestError(f"{what}: expected a relative path, got {p!r}")
    if (p.startswith(("/", "~")) or "://" in p or "\\" in p or "\x00" in p
            or any(seg in ("", ".", "..") for seg in p.split("/"))):
        raise ManifestError(f"{what}: {p!r} is not a plain relative path inside the output "
                            f"(no leading '/', no '..', no scheme); refusing to use it")
    return p


def safe_name(p: Any, what: str) -> str:
    """One plain path segment (a partition or run id)."""
    safe_relpath(p, what)
    if "/" in p or p.startswith(("_", ".")):
        raise ManifestError(f"{what}: {p!r} is not a plain name (one segment, not hidden)")
    return p


# --- manifests ----------------------------------------------------------------------------------------

def validate_manifest(m: Any, source: str) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("files", []), list):
        raise ManifestError(f"{source}: not a vaepipe manifest (expected an object with a 'files' list)")
    for i, f in enumerate(m.get("files", [])):
        if not isinstance(f, dict):
            raise ManifestError(f"{source}: files[{i}] is not an object")
        safe_relpath(f.get("path"), f"{source}: files[{i}].path")
        if not isinstance(f.get("rows", 0), int) or f.get("rows", 0) < 0:
            raise ManifestError(f"{source}: files[{i}].rows must be a non-negative integer, got {f.get('rows')!r}")
    pending = m.get("pending_files", [])
    if not isinstance(pending, list):
        raise ManifestError(f"{source}: pending_files must be a list")
    for i, p in enumerate(pending):
        safe_relpath(p, f"{source}: pending_files[{i}]")
    for key in ("run_id", "pending_run_id"):
        v = m.get(key)
        if v is not None and not (isinstance(v, str) and _TOKEN.match(v)):
            raise ManifestError(f"{source}: {key} {v!r} is not a run id")
    if m.get("quarantine") is not None:
        safe_relpath(m["quarantine"], f"{source}: quarantine")
    return m


def read_json(loc: Location, path: str) -> Any | None:
    if not loc.fs.exists(path):
        return None
    with loc.fs.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"{loc.full(path)}: not valid JSON ({e})") from None


def read_table_manifest(out: Location, control: Location | None = None) -> dict[str, Any] | None:
    """The validated manifest of the table at `out` (its control folder; a nightly partition's in the
    root's; or the legacy OUT/_manifest.json), or None when it was never committed."""
    for ctl in _candidate_controls(out, control):
        path = posixpath.join(ctl.path, MANIFEST)
        m = read_json(ctl, path)
        if m is not None:
            return validate_manifest(m, ctl.full(path))
    legacy = posixpath.join(out.path, LEGACY_MANIFEST)
    m = read_json(out, legacy)
    return validate_manifest(m, out.full(legacy)) if m is not None else None


def _candidate_controls(out: Location, control: Location | None) -> list[Location]:
    if control is not None:
        return [control]
    found = []
    try:
        found.append(control_of(out))
    except ConfigError:
        pass
    up = parent_table(out)
    if up is not None:   # a nightly partition OUT/<p>: its manifest is in the root's control folder
        found.append(partition_control(control_of(up[0]), up[1]))
    return found


def parent_table(out: Location) -> tuple[Location, str] | None:
    """(the folder above `out`, out's name) when that folder could be a nightly output holding `out`
    as a partition (both names plain, the parent not a bucket or filesystem root); else None."""
    parent, name = posixpath.split(out.path.rstrip("/"))
    if not name or name.startswith(("_", ".")):
        return None
    up = Location(out.uri.rstrip("/")[: -len(name)].rstrip("/"), out.fs, parent)
    try:
        control_of(up)
    except ConfigError:
        return None
    return up, name


def nightly_partitions(root: Location) -> list[str]:
    """Partitions of a nightly output that have a committed manifest (validated names)."""
    try:
        ctl = control_of(root)
    except ConfigError:
        return []
    base = posixpath.join(ctl.path, "partitions")
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in root.fs.ls(base, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if root.fs.exists(posixpath.join(base, safe_name(n, f"{base}/{n}"), MANIFEST)))


def write_bytes_atomic(loc: Location, path: str, data: bytes) -> None:
    """Write to a temporary name beside `path`, then move into place (a single PUT on object stores)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with loc.fs.open(tmp, "wb") as f:
        f.write(data)
    loc.fs.mv(tmp, path)


def pause_point(name: str) -> None:
    """Test hook for crash and race tests: with VAEPIPE_PAUSE_AT=name the process announces the point
    (the file VAEPIPE_PAUSE_MARKER) and waits there: to be killed, or, with VAEPIPE_PAUSE_UNTIL=FILE,
    until FILE exists, then goes on. Does nothing otherwise."""
    if os.environ.get("VAEPIPE_PAUSE_AT") != name:
        return
    marker = os.environ.get("VAEPIPE_PAUSE_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(name)
    release = os.environ.get("VAEPIPE_PAUSE_UNTIL")
    while not (release and os.path.exists(release)):
        time.sleep(0.1 if release else 3600)


# --- the commit ---------------------------------------------------------------------------------------

class Commit:
    """Atomic output for one job run. Parts are written under the control folder's staging/<run>/;
    `commit()` publishes a *pending* manifest (the previous files, plus the names about to appear),
    moves the parts into OUT, writes the manifest (the commit point) and `_SUCCESS`, and only then
    deletes the previous run's files, any part a crashed run left in OUT, and old quarantine files.
    With a `lease` (pipeline.table.lease), the run is the only writer: leftovers of killed runs' staging
    are removed when the commit is set up, and the lease is checked before each commit point."""

    def __init__(self, out: Location, run_id: str | None = None, control: Location | None = None, lease=None):
        self.out = out
        self.control = control or control_of(out)
        self.lease = lease
        self.run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        safe_name(self.run_id, "run id")
        self.staging = posixpath.join(self.control.path, "staging", self.run_id)
        if lease is not None:
            self.sweep_staging()

    def staged_path(self, name: str) -> str:
        return posixpath.join(self.staging, name)

    def sweep_staging(self) -> None:
        """Under the lease no other run is writing: every other run's staging is a crash's leftover."""
        fs, root = self.out.fs, posixpath.join(self.control.path, "staging")
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return
        for p in entries:
            if posixpath.basename(p.rstrip("/")) != self.run_id:
                fs.rm(p, recursive=True)

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def commit(self, staged: list[tuple[str, int]], metadata: dict[str, Any],
               quarantine: str | None = None) -> dict[str, Any]:
        """staged: (path inside staging, rows) in output order; quarantine: a staged file of skipped
        records, kept in the control folder. Returns the manifest written."""
        fs, out = self.out.fs, self.out.path
        self._check_lease()
        old = read_table_manifest(self.out, self.control)   # (or the legacy OUT/_manifest.json)
        fs.makedirs(out, exist_ok=True)
        fs.makedirs(self.control.path, exist_ok=True)
        files = []
        for i, (src, rows) in enumerate(staged):
            rel_dir = posixpath.dirname(posixpath.relpath(src, self.staging))
            name = f"part-{i:05d}-{self.run_id}.parquet"
            files.append({"path": posixpath.join(rel_dir, name) if rel_dir not in ("", ".") else name,
                          "rows": int(rows), "src": src})
        for f in files:
            safe_relpath(f["path"], "staged part")
        manifest_path = posixpath.join(self.control.path, MANIFEST)
        # Before any part gets a visible name: a manifest that still describes the previous state (no
        # files on a first commit) and names what is about to appear, so a crash in the moves below
        # never exposes a partial run to manifest readers, and the next commit can clean it up.
        previous = old or {"run_id": None, "rows": 0, "files": []}
        new_paths = {f["path"] for f in files}
        leftovers = [p for p in previous.get("pending_files", []) if p not in new_paths]
        pending = {**previous, "pending_run_id": self.run_id, "pending_files": sorted(set(leftovers) | new_paths)}
        write_bytes_atomic(self.control, manifest_path, json.dumps(pending, indent=1).encode())
        for f in files:
            dst = posixpath.join(out, f["path"])
            if posixpath.dirname(f["path"]):
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(f.pop("src"), dst)
            pause_point("commit.moves")
        q_rel = None
        if quarantine:
            q_rel = f"quarantine/skipped-{self.run_id}.parquet"
            fs.makedirs(posixpath.join(self.control.path, "quarantine"), exist_ok=True)
            fs.mv(quarantine, posixpath.join(self.control.path, q_rel))
        manifest = {"run_id": self.run_id, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "rows": sum(f["rows"] for f in files), "files": files, **metadata}
        if q_rel:
            manifest["quarantine"] = q_rel
        self._check_lease()
        write_bytes_atomic(self.control, manifest_path, json.dumps(manifest, indent=1).encode())   # commit point
        pause_point("commit.manifest")
        with fs.open(posixpath.join(out, SUCCESS), "wb"):
            pass
        stale = [f["path"] for f in previous.get("files", [])] + leftovers
        for path in dict.fromkeys(stale):
            if path not in new_paths:
                _rm(fs, posixpath.join(out, path))
        self._sweep_out(new_paths)
        crashed = previous.get("pending_run_id")
        if crashed and crashed != self.run_id:   # a commit that died mid-way: its staging is garbage too
            Commit(self.out, run_id=crashed, control=self.control).abort()
        old_q = previous.get("quarantine")
        if old_q and old_q != q_rel:
            _rm(fs, posixpath.join(self.control.path, old_q))
        self.abort()
        return manifest

    def _sweep_out(self, keep: set[str]) -> None:
        """Parts in OUT that no manifest names (a killed run's moves) and the legacy layout's files."""
        fs, out = self.out.fs, self.out.path
        for path in fs.find(out):
            rel = posixpath.relpath(path, out)
            base = posixpath.basename(rel)
            if rel in keep:
                continue
            if _PART.match(base) or rel in (LEGACY_MANIFEST, "_skipped.parquet") or rel.startswith("_staging/") \
                    or (base.startswith(LEGACY_MANIFEST + ".tmp-") and "/" not in rel):
                _rm(fs, path)
        if fs.exists(posixpath.join(out, "_staging")):
            fs.rm(posixpath.join(out, "_staging"), recursive=True)

    def abort(self) -> None:
        """Remove this run's staging folder (and the staging root when nothing else is in it)."""
        fs, root = self.out.fs, posixpath.dirname(self.staging)
        try:
            if fs.exists(self.staging):
                fs.rm(self.staging, recursive=True)
            if fs.exists(root) and not fs.ls(root, detail=False):
                fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass


def _rm(fs, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
