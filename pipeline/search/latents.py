"""Readers of a latents table for a query: `Latents` (the Parquet files with their footers: global
row numbers, row groups read by threads ahead of the consumer, rows taken by number) and
`CachedLatents` (a local table served from its latent_cache entry)."""
from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.runtime.errors import InputError
from pipeline.search import latent_cache
from pipeline.search.knn import from_np, unique_first

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from pipeline.table.uris import Location

BLOCK_ROWS = 262_144     # a larger row group is read in slices of this many rows


# --- reading --------------------------------------------------------------------------------------

class Latents:
    """The files of a latents folder with their footers: global row numbers, row-group offsets."""

    def __init__(self, loc: Location, files: list[str]):
        from pipeline.table.parquet_io import partition_values, read_footer

        self.loc, self.files = loc, files
        self.afs = loc.arrow_fs()
        self.meta = []
        for path in files:
            self.meta.append(read_footer(loc, path))
        self.file_start = np.cumsum([0] + [m.num_rows for m in self.meta])
        self.rg_start = [np.cumsum([0] + [m.row_group(i).num_rows for i in range(m.num_row_groups)])
                         for m in self.meta]
        first = next((m for m in self.meta if m.num_rows), self.meta[0])
        schema = first.schema.to_arrow_schema()
        self.metadata = schema.metadata or {}
        # hive partition values live in the folder names (nightly's date=…/): string columns, as a hive reader adds
        self.parts = [partition_values(posixpath.relpath(p, loc.path)) for p in files]
        self.part_keys = sorted({k for d in self.parts for k in d} - set(schema.names))
        for k in self.part_keys:
            schema = schema.append(pa.field(k, pa.string()))
        self.schema = schema
        self.cached: latent_cache.CachedBlocks | None = None   # set by use_cache when an entry matches

    def use_cache(self, cache: latent_cache.LatentCache, columns: list[str]) -> bool:
        """Serve reads of `columns` (or fewer) from `cache` when its entry exists and is whole."""
        self.cached = cache.open(columns)
        return self.cached is not None

    def from_cache(self, columns: list[str]) -> bool:
        """Whether reads of `columns` come from the cache."""
        return self.cached is not None and set(columns) <= set(self.cached.schema.names)

    @property
    def rows(self) -> int:
        return int(self.file_start[-1])

    def open(self, i: int) -> pq.ParquetFile:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.afs.open_input_file(self.files[i]), metadata=self.meta[i], pre_buffer=True)

    def pieces(self, row_groups: dict[int, list[int]] | None = None) -> list[tuple[int, int, int, int]]:
        """(file, row group, first row in it, rows) for every row group, or slice of a large one."""
        out = []
        for i, md in enumerate(self.meta):
            for rg in (range(md.num_row_groups) if row_groups is None else row_groups.get(i, [])):
                n = md.row_group(rg).num_rows
                for lo in range(0, max(n, 1), BLOCK_ROWS):
                    out.append((i, rg, lo, min(n, lo + BLOCK_ROWS) - lo))
        return out

    def read_piece(self, piece: tuple[int, int, int, int], columns: list[str]) -> tuple[int, pa.Table]:
        """(global first row, table) of one piece, with any hive partition columns asked for."""
        parts = [c for c in columns if c in self.part_keys]
        if not parts:
            return self._read_piece(piece, columns)
        start, t = self._read_piece(piece, [c for c in columns if c not in parts])
        for c in parts:
            t = t.append_column(c, pa.array([self.parts[piece[0]].get(c)] * t.num_rows, pa.string()))
        return start, t.select(columns)

    def _read_piece(self, piece: tuple[int, int, int, int], columns: list[str]) -> tuple[int, pa.Table]:
        i, rg, lo, n = piece
        start = int(self.file_start[i] + self.rg_start[i][rg]) + lo
        try:
            pf = self.open(i)
            if lo == 0 and n == self.meta[i].row_group(rg).num_rows:
                return start, pf.read_row_group(rg, columns=columns, use_threads=False)
            batches = pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=[rg], columns=columns, use_threads=False)
            for j, b in enumerate(batches):
                if j * BLOCK_ROWS == lo:
                    return start, pa.Table.from_batches([b])
            raise InputError(f"{self.loc.full(self.files[i])}: row group {rg} is shorter than its footer says")
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{self.loc.full(self.files[i])}: cannot read Parquet "
                             f"({type(e).__name__}: {str(e)[:200]})") from None

    def blocks(self, columns: list[str], row_groups: dict[int, list[int]] | None = None, threads: int | None = None):
        """(global first row, table) for every row group (or slice of a large one), in order, decoded
        by `threads` reader threads (default: one per core, at most 4) a few pieces ahead of the
        consumer: pyarrow decodes without the GIL, so the cores decode while the caller scores. A
        full scan of cached columns reads the memory-mapped cache instead (no decoding at all)."""
        if row_groups is None and self.from_cache(columns):
            yield from self.cached.blocks(columns)
            return
        pieces = self.pieces(row_groups)
        threads = threads or min(4, os.cpu_count() or 1)
        if threads <= 1 or len(pieces) <= 1:
            for p in pieces:
                yield self.read_piece(p, columns)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="vaepipe-read") as ex:
            window = [ex.submit(self.read_piece, p, columns) for p in pieces[:threads + 1]]
            nxt = len(window)
            try:
                while window:
                    item = window.pop(0).result()
                    if nxt < len(pieces):
                        window.append(ex.submit(self.read_piece, pieces[nxt], columns))
                        nxt += 1
                    yield item
            finally:
                for f in window:
                    f.cancel()

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows → (file index, row group, row inside the row group)."""
        fi = np.searchsorted(self.file_start, rows, side="right") - 1
        rg = np.empty_like(rows)
        local = np.empty_like(rows)
        for f in unique_first(fi)[0]:
            sel = fi == f
            r = rows[sel] - self.file_start[f]
            g = np.searchsorted(self.rg_start[f], r, side="right") - 1
            rg[sel], local[sel] = g, r - self.rg_start[f][g]
        return fi, rg, local

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The `columns` of the given global rows, in that order (reads their row groups only, or the
        cache)."""
        if not columns or len(rows) == 0:
            return self.schema.empty_table().select(columns)
        if self.from_cache(columns):
            return self.cached.take(rows, columns)
        fi, rg, local = self.locate(rows)
        groups = {}
        parts = [c for c in columns if c in self.part_keys]
        for f, g in sorted(set(zip(fi.tolist(), rg.tolist()))):
            t = self.open(f).read_row_group(g, columns=[c for c in columns if c not in parts])
            for c in parts:   # hive partition values from the file's folder names
                t = t.append_column(c, pa.array([self.parts[f].get(c)] * t.num_rows, pa.string()))
            groups[f, g] = t.select(columns)
        if len(rows) <= 4096:   # one-row slices: no pyarrow.compute import for a few winners
            return pa.concat_tables([groups[f, g].slice(r, 1) for f, g, r in zip(fi.tolist(), rg.tolist(),
                                                                                local.tolist())])
        pieces, order = [], []
        for (f, g), t in groups.items():
            sel = np.flatnonzero((fi == f) & (rg == g))
            pieces.append(t.take(from_np(local[sel])))
            order.append(sel)
        t = pa.concat_tables(pieces)
        return t.take(from_np(np.argsort(np.concatenate(order), kind="stable")))


class CachedLatents:
    """A local table served wholly from its cache entry, found through the entry's note
    (latent_cache.find_local): the same reads as Latents, no footer or Parquet page opened. Its
    schema is the cached columns' (all but logvar), with the table's metadata."""

    def __init__(self, cached: latent_cache.CachedBlocks):
        self.cached, self.schema = cached, cached.schema
        self.metadata = self.schema.metadata or {}
        self.rows = int(cached.starts[-1])

    def from_cache(self, columns: list[str]) -> bool:
        return set(columns) <= set(self.schema.names)

    def blocks(self, columns: list[str], row_groups: dict[int, list[int]] | None = None, threads: int | None = None):
        assert row_groups is None, "a cached table is scanned whole"
        return self.cached.blocks(columns)

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        return self.cached.take(rows, columns)
