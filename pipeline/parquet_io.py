"""Parquet files through fsspec: listing inputs, checking them before any work, and committing
outputs atomically (staging prefix → final names → manifest → _SUCCESS; old files removed last)."""
from __future__ import annotations

import json
import posixpath
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.uris import Location

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
STAGING = "_staging"


def _hidden(name: str) -> bool:
    return name.startswith("_") or name.startswith(".")


def list_parquet_files(loc: Location) -> list[str]:
    """Parquet files under `loc` (a file or a folder, hive partitions included), sorted; names starting
    with '_' or '.' are skipped at every level (staging, markers). A committed vaepipe output is read
    through its manifest, so a reader never sees a half-committed run."""
    fs = loc.fs
    if not fs.exists(loc.path):
        raise InputError(f"input {loc.uri!r} does not exist")
    if fs.isfile(loc.path):
        return [loc.path]
    manifest = read_manifest(loc)
    if manifest is not None:
        return [posixpath.join(loc.path, f["path"]) for f in manifest["files"]]
    found = fs.find(loc.path)
    # a folder of committed outputs (nightly's OUT/<partition>/): each sub-folder with a manifest is
    # read through it, never scanned, so a commit in progress or crashed there stays invisible
    committed = sorted(posixpath.dirname(posixpath.relpath(p, loc.path)) for p in found
                       if posixpath.basename(p) == MANIFEST and posixpath.dirname(posixpath.relpath(p, loc.path)))
    committed = [d for d in committed if not any(_hidden(part) for part in d.split("/"))]
    committed = [d for d in committed if not any(d.startswith(a + "/") for a in committed)]   # outermost
    out = []
    for d in committed:
        m = read_manifest(loc.join(d))
        out += [posixpath.join(loc.path, d, f["path"]) for f in (m or {}).get("files", [])]
    for path in found:
        rel = posixpath.relpath(path, loc.path)
        if any(_hidden(part) for part in rel.split("/")) or any(rel.startswith(d + "/") for d in committed):
            continue
        if rel.endswith(".parquet") or rel.endswith(".parq") or "." not in rel.rsplit("/", 1)[-1]:
            out.append(path)
    return sorted(out)


def partition_values(rel_path: str) -> dict[str, str]:
    """Hive-style partition columns from a relative path: 'date=2026-01-01/part.parquet' → {date: …}."""
    vals = {}
    for part in rel_path.split("/")[:-1]:
        if "=" in part:
            k, v = part.split("=", 1)
            vals[k] = v
    return vals


def read_footer(loc: Location, path: str) -> pq.FileMetaData:
    try:
        with loc.fs.open(path, "rb") as f:
            return pq.read_metadata(f)
    except Exception as e:
        raise InputError(f"{loc.full(path)}: not a readable Parquet file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def check_inputs(loc: Location, files: list[str]) -> tuple[pa.Schema, int, list[int]]:
    """Read every footer before any work: a truncated or corrupt file fails here, naming the file.
    Returns the first file's schema, the total row count and per-file row counts."""
    if not files:
        raise InputError(f"input {loc.uri!r} holds no Parquet files")
    schema, rows = None, []
    for path in files:
        md = read_footer(loc, path)
        rows.append(md.num_rows)
        if schema is None:
            schema = md.schema.to_arrow_schema()
    return schema, sum(rows), rows


def read_table(loc: Location, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        with loc.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except Exception as e:
        raise InputError(f"{loc.full(path)}: cannot read Parquet ({type(e).__name__}: {str(e)[:200]})") from None


def read_manifest(out: Location) -> dict[str, Any] | None:
    path = posixpath.join(out.path, MANIFEST)
    if not out.fs.exists(path):
        return None
    with out.fs.open(path, "rb") as f:
        return json.loads(f.read())


def write_bytes_atomic(loc: Location, path: str, data: bytes) -> None:
    """Write to a temporary name, then move into place (a single PUT on object stores)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with loc.fs.open(tmp, "wb") as f:
        f.write(data)
    loc.fs.mv(tmp, path)


def write_table(loc: Location, path: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{
            k.encode(): v.encode() for k, v in metadata.items()}})
    with loc.fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


class Commit:
    """Atomic output for one job run. Parts are written under <out>/_staging/<run_id>/; `commit()`
    first publishes a *pending* manifest (the previous manifest's files, or none on a first commit,
    plus the names about to appear), moves the parts to their final names, then writes the real
    manifest (the commit point) and _SUCCESS, and only then deletes the files of the previous commit.
    A crash anywhere before the commit point leaves the previous output (or an empty one) as what a
    manifest-aware reader sees: `list_parquet_files` never falls back to scanning a folder that a
    commit has started in; the next commit removes the crashed run's moved parts."""

    def __init__(self, out: Location, run_id: str | None = None):
        self.out = out
        self.run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.staging = posixpath.join(out.path, STAGING, self.run_id)

    def staged_path(self, name: str) -> str:
        return posixpath.join(self.staging, name)

    def commit(self, staged: list[tuple[str, int]], metadata: dict[str, Any]) -> dict[str, Any]:
        """staged: (path inside staging, rows) in output order. Returns the manifest written."""
        fs, out = self.out.fs, self.out.path
        old = read_manifest(self.out)
        fs.makedirs(out, exist_ok=True)
        files = []
        for i, (src, rows) in enumerate(staged):
            rel_dir = posixpath.dirname(posixpath.relpath(src, self.staging))
            name = f"part-{i:05d}-{self.run_id}.parquet"
            files.append({"path": posixpath.join(rel_dir, name) if rel_dir not in ("", ".") else name,
                          "rows": int(rows), "src": src})
        # Before any part gets a visible name: a manifest that still describes the previous state (no
        # files on a first commit) and names what is about to appear, so a crash in the moves below
        # never exposes a partial run, and the next commit can clean it up.
        previous = old or {"run_id": None, "rows": 0, "files": []}
        leftovers = [p for p in previous.get("pending_files", []) if p not in {f["path"] for f in files}]
        pending = {**previous, "pending_run_id": self.run_id,
                   "pending_files": sorted(set(leftovers) | {f["path"] for f in files})}
        write_bytes_atomic(self.out, posixpath.join(out, MANIFEST), json.dumps(pending, indent=1).encode())
        for f in files:
            dst = posixpath.join(out, f["path"])
            if posixpath.dirname(f["path"]):
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(f.pop("src"), dst)
        manifest = {"run_id": self.run_id, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "rows": sum(f["rows"] for f in files), "files": files, **metadata}
        write_bytes_atomic(self.out, posixpath.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
        write_bytes_atomic(self.out, posixpath.join(out, SUCCESS), b"")
        keep = {f["path"] for f in files}
        stale = [f["path"] for f in previous.get("files", [])] + leftovers   # + a crashed commit's parts
        for path in dict.fromkeys(stale):
            if path not in keep:
                try:
                    fs.rm(posixpath.join(out, path))
                except FileNotFoundError:
                    pass
        crashed = previous.get("pending_run_id")
        if crashed and crashed != self.run_id:   # a commit that died mid-way: its staging is garbage too
            Commit(self.out, run_id=crashed).abort()
        self.abort()
        return manifest

    def abort(self) -> None:
        """Remove this run's staging folder (and the staging root when empty)."""
        fs = self.out.fs
        try:
            if fs.exists(self.staging):
                fs.rm(self.staging, recursive=True)
            root = posixpath.join(self.out.path, STAGING)
            if fs.exists(root) and not fs.ls(root):
                fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
