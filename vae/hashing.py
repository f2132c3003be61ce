"""Record hashing in numpy only (no torch: Ray Data tasks import it through pipeline.table.features): a
64-bit key per record from the bits of its float32 values, the same in any batch, order or process.
vae.distributions draws each record's ε from it; pipeline.table.features splits train/val by it."""
from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def record_hash(x: np.ndarray) -> np.ndarray:
    """(N, D) records → (N,) uint64 keys from the bits of their float32 values: equal records get
    equal keys, whatever the batch or the position in it."""
    words = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1), dtype=np.float32).view(np.uint32)
    # a multiply-sum hash with a fixed odd multiplier per position, then a SplitMix64 finaliser
    mult = splitmix64(np.arange(words.shape[1], dtype=np.uint64)) | np.uint64(1)                    # (D,)
    with np.errstate(over="ignore"):
        h = (words.astype(np.uint64) * mult[None, :]).sum(axis=1, dtype=np.uint64)                    # (N,)
    return splitmix64(h ^ np.uint64(words.shape[1]))
