"""A local copy of a latents table's columns (all but `logvar`), for repeated `vaepipe query`s.

A query process spends most of its time decoding Parquet: the μ column of 1 M 16-dim latents is
64 MB of zstd pages to decompress on every run. The first full scan of a latents table therefore also
writes the columns it decoded to an uncompressed Arrow IPC file in a local cache folder; later
queries of the same table read that file batch by batch through memory maps (no decoding, no copy:
the page cache serves it), ids, μ, `--where` and printed columns alike, and open no Parquet page.

Trust: the cache is keyed by the exact files it was made from (path, size and modification time, or
the object store's ETag, of every file, plus the columns), so a nightly commit, a rewritten file or a
different column gives a new key and the old entry is never read. An entry is written to a temporary
name and renamed into place when complete; one that does not open, or whose row count differs from
the table's footers, is deleted and ignored. The folder (`$VAEPIPE_CACHE_DIR`, default
`$XDG_CACHE_HOME/vaepipe/latents` or `~/.cache/vaepipe/latents`, mode 0700) is kept under a size
budget by deleting the least recently used entries.

A local table also gets a small note beside its entry, keyed by the identity (path, size, mtime,
inode) of every file under the table's folder and under its control folder: `find_local` reads the
note and opens the entry without listing the table through fsspec or reading any Parquet footer,
the imports and reads a short query process would otherwise spend most of its start-up on. Any
change under either folder (a commit, a rewritten file, a writer's lease being renewed) changes that
identity, and the query takes the full path, which checks the files themselves."""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Iterator

import pyarrow as pa

SUFFIX = ".arrow"
NOTE_SUFFIX = ".tree.json"
KEY_VERSION = 2          # 2: the entry keeps the table's schema metadata (int8 scales, model version)
DEFAULT_MAX_GB = 8.0


def default_dir() -> str:
    if os.environ.get("VAEPIPE_CACHE_DIR"):
        return os.environ["VAEPIPE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vaepipe", "latents")


def file_identity(fs, path: str) -> list:
    """What identifies one file's content without reading it: size, mtime and inode (local), or
    everything the store's listing says of it (size, ETag / generation, modification time)."""
    from pipeline.table.uris import is_local_fs

    if is_local_fs(fs):
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns, st.st_ino]
    return [path, sorted((k, str(v)) for k, v in fs.info(path).items())]


def cache_key(uri: str, fs, files: list[str], columns: list[str]) -> str:
    """sha256 of the table's files (their identities, in order) and the cached columns."""
    ident = {"version": KEY_VERSION, "uri": uri, "columns": columns, "files": [file_identity(fs, p) for p in files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def local_index_pointer(path: str) -> str:
    """Where a local table's index pointer is (pipeline.search.ann: control folder, index/current.json),
    found without fsspec: a short query checks it before taking the note's path."""
    parent, name = os.path.split(os.path.abspath(path).rstrip("/"))
    return os.path.join(parent, f"_{name}.vaepipe", "index", "current.json")


def tree_identity(path: str) -> str | None:
    """sha256 of every file under a local table's path and under its control folder (the sibling
    `_<name>.vaepipe`, where its manifests live): path, size, mtime and inode of each, in order.
    None when the path does not exist."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        return None
    parent, name = os.path.split(path)
    roots = [path] + ([os.path.join(parent, f"_{name}.vaepipe")] if name and name[0] not in "_." else [])
    items = []
    for root in roots:
        if os.path.isfile(root):
            files = [root]
        else:
            files = []
            for dirpath, dirnames, names in os.walk(root):
                dirnames.sort()
                files += [os.path.join(dirpath, n) for n in sorted(names)]
        for p in files:
            try:
                st = os.stat(p)
            except FileNotFoundError:   # removed while listed: this identity will not be seen again
                continue
            items.append([p, st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps([KEY_VERSION, items]).encode()).hexdigest()[:32]


def find_local(path: str, folder: str | None = None, max_gb: float = DEFAULT_MAX_GB) -> "CachedBlocks | None":
    """The entry of the local table at `path` through its note (see the module's docstring), or None:
    not local, no note for the table as it is now, or the entry is gone."""
    if "://" in path and not path.startswith("file://"):
        return None
    path = path[len("file://"):] if path.startswith("file://") else path
    ident = tree_identity(path)
    if ident is None:
        return None
    folder = folder or default_dir()
    try:
        with open(os.path.join(folder, ident + NOTE_SUFFIX)) as f:
            note = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("key"), str) or not isinstance(note.get("rows"), int):
        return None
    return LatentCache(note["key"], note["rows"], folder, max_gb).open([])


class LatentCache:
    """One cache entry: `open()` it, or write it with `writer()` during a full scan."""

    def __init__(self, key: str, rows: int, folder: str | None = None, max_gb: float = DEFAULT_MAX_GB):
        self.folder = folder or default_dir()
        self.key, self.rows, self.max_gb = key, rows, max_gb
        self.path = os.path.join(self.folder, key + SUFFIX)

    def open(self, columns: list[str]) -> "CachedBlocks | None":
        """The entry when it exists, is whole and holds `columns`; else None (a broken one is deleted)."""
        try:
            blocks = CachedBlocks(self.path)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException):
            self._discard()
            return None
        if int(blocks.starts[-1]) != self.rows or not set(columns) <= set(blocks.schema.names):
            self._discard()
            return None
        try:
            os.utime(self.path)   # recently used: evicted last
        except OSError:
            pass
        return blocks

    def remember(self, ident: str | None, path: str) -> None:
        """Write the note that maps the local table at `path` to this entry: when the entry exists and
        the table's tree identity is still `ident`, taken before the table was listed (a change made
        meanwhile leaves no note behind)."""
        if ident is None or not os.path.exists(self.path) or tree_identity(path) != ident:
            return
        note = os.path.join(self.folder, ident + NOTE_SUFFIX)
        tmp = f"{note}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"key": self.key, "rows": self.rows}, f)
            os.replace(tmp, note)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def writer(self, schema: pa.Schema) -> "CacheWriter | None":
        """A writer for this entry, or None when the cache folder cannot be written (a read-only
        home, a full disk): the query goes on without a cache."""
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            return CacheWriter(self, schema)
        except OSError:
            return None

    def _discard(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def prune(self) -> None:
        """Delete the least recently used entries until the folder fits the budget (this one stays)."""
        entries, notes = [], []
        for name in os.listdir(self.folder):
            p = os.path.join(self.folder, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if name.endswith(SUFFIX):
                entries.append((st.st_mtime, st.st_size, p))
            elif name.endswith(NOTE_SUFFIX):
                notes.append(p)
            elif ".tmp-" in name and st.st_mtime < time.time() - 24 * 3600:   # a killed writer's leftovers
                os.unlink(p)
        total, budget = sum(e[1] for e in entries), self.max_gb * 2 ** 30
        for _, size, p in sorted(entries):
            if total <= budget:
                break
            if p != self.path:
                try:
                    os.unlink(p)
                    total -= size
                except OSError:
                    pass
        for p in notes:   # a note whose entry is gone points nowhere
            try:
                with open(p) as f:
                    key = json.load(f).get("key")
                if not os.path.exists(os.path.join(self.folder, f"{key}{SUFFIX}")):
                    os.unlink(p)
            except (OSError, ValueError, AttributeError):
                try:
                    os.unlink(p)
                except OSError:
                    pass


class CachedBlocks:
    """A whole entry, read batch by batch: each batch is a zero-copy view of its own memory map of
    the file, unmapped when the caller drops it, so memory stays one or two batches, not the file."""

    def __init__(self, path: str):
        import numpy as np

        # Open the file once and map it through that descriptor: another query pruning the cache, or
        # replacing this entry, while this one reads it, leaves this one reading the file it opened.
        self.fd = os.open(path, os.O_RDONLY)
        by_fd = f"/proc/self/fd/{self.fd}"
        self.path = by_fd if os.path.exists(by_fd) else path   # Linux; elsewhere the path itself
        try:
            reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
            self.schema = reader.schema
            self.starts = np.cumsum([0] + [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)])
        except BaseException:
            os.close(self.fd)
            raise

    def batch(self, i: int) -> pa.RecordBatch:
        return pa.ipc.open_file(pa.memory_map(self.path, "r")).get_batch(i)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass

    def blocks(self, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
        for i, start in enumerate(self.starts[:-1].tolist()):
            yield start, pa.Table.from_batches([self.batch(i)]).select(columns)

    def take(self, rows, columns: list[str]) -> pa.Table:
        """The `columns` of the given global rows (a numpy int array), in that order: each batch that
        holds one of them is read once."""
        import numpy as np

        from pipeline.search.knn import unique_first

        if len(rows) == 0:
            return self.schema.empty_table().select(columns)
        bi = np.searchsorted(self.starts, rows, side="right") - 1
        parts, order = [], []
        for b in unique_first(bi)[0].tolist():
            sel = np.flatnonzero(bi == b)
            t = pa.Table.from_batches([self.batch(b)]).select(columns)
            local = (rows[sel] - self.starts[b]).tolist()
            parts.append(pa.concat_tables([t.slice(r, 1) for r in local]) if len(local) <= 64 else
                         t.take(pa.array(local)))
            order.append(sel)
        t = pa.concat_tables(parts)
        inverse = np.argsort(np.concatenate(order), kind="stable")
        return pa.concat_tables([t.slice(int(i), 1) for i in inverse]) if len(rows) <= 4096 else \
            t.take(pa.array(inverse))


class CacheWriter:
    """Appends the blocks of a full scan, in row order; `commit()` renames the file into place only
    when every row arrived, `abort()` (or a failure) leaves nothing behind."""

    def __init__(self, cache: LatentCache, schema: pa.Schema):
        self.cache, self.schema, self.rows, self.failed = cache, schema, 0, False
        self.tmp = f"{cache.path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        self.sink = pa.OSFile(self.tmp, "wb")
        self.w = pa.ipc.new_file(self.sink, schema)

    def add(self, start: int, t: pa.Table) -> None:
        """Append one block; a block out of order or a write that fails (a full disk) gives the
        entry up, never the query."""
        if self.failed:
            return
        try:
            if start != self.rows:
                raise ValueError(f"block starts at row {start}, expected {self.rows}")
            t = t.select(self.schema.names)
            if t.schema != self.schema:
                t = t.cast(self.schema)
            for b in t.combine_chunks().to_batches():
                self.w.write_batch(b)
            self.rows += t.num_rows
        except (OSError, ValueError, pa.ArrowException):
            self.abort()

    def commit(self) -> bool:
        if self.failed:
            return False
        try:
            self.w.close()
            self.sink.close()
            if self.rows != self.cache.rows:
                raise ValueError("incomplete")
            os.replace(self.tmp, self.cache.path)
        except (OSError, ValueError, pa.ArrowException):
            self.abort()
            return False
        try:
            self.cache.prune()
        except OSError:
            pass
        return True

    def abort(self) -> None:
        self.failed = True
        for close in (self.w.close, self.sink.close):
            try:
                close()
            except (OSError, pa.ArrowException):
                pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
