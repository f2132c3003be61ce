"""Fault injection for tests and drills (`--fail-at-epoch`, `--fail-rank`): one rank exits hard,
once per run folder, in the middle of an epoch (after the previous epoch's checkpoint was reported)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.training.run_store import RunStore

MARKER = ".fault_injected"


@dataclass(frozen=True)
class FaultPlan:
    epoch: int | None            # None: no fault
    rank: int
    run_dir: str
    storage_options: dict = field(default_factory=dict)

    def maybe_fail(self, rank: int, epoch: int) -> None:
        """Exit this process (status 1) if it is the planned rank and epoch and it has not yet happened."""
        if self.epoch is None or epoch != self.epoch or rank != self.rank:
            return
        store = RunStore(self.run_dir, self.storage_options)
        if store.exists(MARKER):
            return
        store.fs.pipe_file(store.join(MARKER), b"")
        os._exit(1)
