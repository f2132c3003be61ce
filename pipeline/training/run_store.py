"""A vaepipe run folder on any fsspec filesystem: run metadata, the epoch journal and checkpoints.
The driver (pipeline.training.train) and rank 0 of the workers (pipeline.training.train_loop) both use it."""
from __future__ import annotations

import json

from pipeline.table.uris import is_local_fs
from vae.checkpoint import CheckpointError, load_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


class RunStore:
    """A vaepipe run folder on any fsspec filesystem (a local path or a URI):

        RUN/vaepipe_run.json        the MLflow run id, model name, attempts
        RUN/journal.jsonl           one line per finished epoch, every attempt appends
        RUN/epoch_NNNN/             checkpoints of the first attempt (Ray run RUN_NAME)
        RUN/resume-K/epoch_NNNN/    checkpoints of the K-th `--resume` (a new Ray run, resume-K)

    Each `--resume` is a new Ray Train run under RUN/, so Ray never restores its own snapshot
    (which refuses to start when a checkpoint it lists was deleted); we pick the checkpoint."""

    META = "vaepipe_run.json"
    JOURNAL = "journal.jsonl"
    CHECKPOINT = CHECKPOINT_FILE

    def __init__(self, uri: str, storage_options: dict | None = None):
        import fsspec

        self.uri = uri
        self.fs, self.path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.path = self.path.rstrip("/")

    @property
    def is_local(self) -> bool:
        return is_local_fs(self.fs)

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def read_meta(self) -> dict:
        p = self.join(self.META)
        return json.loads(self.fs.cat_file(p)) if self.fs.exists(p) else {}

    def write_meta(self, meta: dict) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(self.join(self.META), json.dumps(meta, indent=1).encode())

    def journal(self) -> list[dict]:
        p = self.join(self.JOURNAL)
        self.fs.invalidate_cache()
        if not self.fs.exists(p):
            return []
        # Only whole lines: every line is written with its newline, so text after the last one is a
        # line still being appended (the driver reads the journal while rank 0 writes it).
        text = self.fs.cat_file(p).decode()
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]

    def append_journal(self, *entries: dict) -> None:
        """Append the journal lines of `entries`, in one write (a checkpoint commits several epochs'
        lines when they share it)."""
        if not entries:
            return
        lines = "".join(json.dumps(e) + "\n" for e in entries).encode()
        p = self.join(self.JOURNAL)
        if self.is_local:
            with open(p, "ab") as f:
                f.write(lines)
        else:   # object stores cannot append; the journal is small and rank 0 is its only writer
            self.fs.invalidate_cache()   # a cached listing would say "absent" and drop every line before
            old = self.fs.cat_file(p) if self.fs.exists(p) else b""
            self.fs.pipe_file(p, old + lines)

    def ensure_journal(self, *entries: dict) -> None:
        """Append the journal lines of a checkpoint's epochs that are not there for that attempt: the
        checkpoint committed, but its worker group was torn down before rank 0 wrote them."""
        have = {(e.get("epoch"), e.get("attempt")) for e in self.journal()}
        self.append_journal(*({**e, "recovered": True} for e in entries
                              if (e["epoch"], e.get("attempt")) not in have))

    def checkpoints(self) -> dict[int, str]:
        """{epoch: path of its checkpoint file}; a later attempt's checkpoint of an epoch wins."""
        found: dict[int, tuple[int, str]] = {}
        self.fs.invalidate_cache()   # object-store listings are cached; Ray and rank 0 write meanwhile
        for pattern in (self.join("epoch_*", CHECKPOINT_FILE), self.join("resume-*", "epoch_*", CHECKPOINT_FILE)):
            for path in self.fs.glob(pattern):
                parts = path.rstrip("/").split("/")
                try:
                    epoch = int(parts[-2].split("_", 1)[1])
                    attempt = int(parts[-3].split("-", 1)[1]) if parts[-3].startswith("resume-") else 0
                except (IndexError, ValueError):
                    continue
                if epoch not in found or attempt > found[epoch][0]:
                    found[epoch] = (attempt, path)
        return {e: p for e, (_, p) in sorted(found.items())}

    def load(self, path: str) -> dict:
        return load_checkpoint(path if self.is_local else self.fs.cat_file(path))

    def newest_complete(self, after: int = -1) -> tuple[str, dict] | None:
        """(path, state) of the newest checkpoint with epoch > `after` that loads completely."""
        for epoch, path in sorted(self.checkpoints().items(), reverse=True):
            if epoch <= after:
                return None
            try:
                return path, self.load(path)
            except (CheckpointError, OSError):   # cut off mid-copy, or deleted meanwhile: the one before
                continue
        return None

    def latest_run(self, model_name: str) -> str | None:
        """The name of the newest run of `model_name` under this storage root (by creation time);
        run folders whose metadata is missing or unreadable are skipped."""
        best = None
        for meta_path in self.fs.glob(self.join("*", self.META)):
            try:
                meta = json.loads(self.fs.cat_file(meta_path))
            except (OSError, ValueError):
                continue
            if meta.get("model_name") == model_name:
                key = (meta.get("created", 0.0), meta_path)
                best = max(best, key) if best else key
        return best[1].rstrip("/").split("/")[-2] if best else None
