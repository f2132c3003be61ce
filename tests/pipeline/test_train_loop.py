"""The train worker's data path without Ray: the cached shard's per-epoch permutation, and integer
images kept as integers on the way to the model."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.features import FeatureSpec, raw_dtype, to_matrix
from pipeline.train_loop import cached_batches

CFG = {"batch_size": 4, "seed": 3, "shuffle_buffer": 4096, "fail_at_epoch": None, "fail_rank": 0}


def epoch(x, epoch_i, rank=0, shuffle=True, **over):
    return torch.cat(list(cached_batches(x, CFG | over, epoch_i, shuffle, rank)))


def test_cached_batches_cover_every_record_once_per_epoch():
    x = torch.arange(10).reshape(10, 1)
    out = epoch(x, 0)
    assert sorted(out[:, 0].tolist()) == list(range(10))
    assert [len(b) for b in cached_batches(x, CFG, 0, True)] == [4, 4, 2]


def test_cached_permutation_is_a_function_of_seed_epoch_and_rank():
    # A resumed run rebuilds the cache and must see the batches the uninterrupted run saw.
    x = torch.arange(64).reshape(64, 1)
    assert torch.equal(epoch(x, 5), epoch(x, 5))
    assert not torch.equal(epoch(x, 5), epoch(x, 6))
    assert not torch.equal(epoch(x, 5, rank=0), epoch(x, 5, rank=1))
    assert not torch.equal(epoch(x, 5), epoch(x, 5, seed=4))


def test_cached_batches_keep_order_without_shuffle_or_with_buffer_zero():
    x = torch.arange(10).reshape(10, 1)
    assert torch.equal(epoch(x, 0, shuffle=False), x)
    assert torch.equal(epoch(x, 0, shuffle_buffer=0), x)


def test_uint8_images_reach_the_model_as_uint8():
    # No float32 copy in numpy: the model's scaler casts (4x fewer bytes to cache or move to a GPU).
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    t = pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.uint8()), 4)})
    spec = FeatureSpec(("image",), "list")
    m = to_matrix(t, spec, 4, dtype=raw_dtype(t.schema, spec))
    assert m.dtype == np.uint8 and np.array_equal(m, x)
    f = pa.table({"a": pa.array([1.5, 2.0], pa.float64())})
    assert raw_dtype(f.schema, FeatureSpec(("a",), "scalars")) is np.float32
