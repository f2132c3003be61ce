"""The train worker without Ray: the cached shard's per-epoch permutation, integer
images kept as integers on the way to the model, and the score Ray Train keeps checkpoints by."""
from __future__ import annotations

import numpy as np
import pytest
import pyarrow as pa
import torch

from pipeline.table.features import FeatureSpec, raw_dtype, to_matrix
from pipeline.training.train_loop import KEEP_LAST, _Progress, cached_batches, shard_blocks

CFG = {"seed": 3, "shuffle_buffer": 4096}


def epoch(x, epoch_i, rank=0, shuffle=True, **over):
    return torch.cat(list(cached_batches(x, 4, epoch_i, shuffle, rank, **(CFG | over))))


def test_cached_batches_cover_every_record_once_per_epoch():
    x = torch.arange(10).reshape(10, 1)
    out = epoch(x, 0)
    assert sorted(out[:, 0].tolist()) == list(range(10))
    assert [len(b) for b in cached_batches(x, 4, 0, True, **CFG)] == [4, 4, 2]


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


def test_mid_epoch_hook_runs_once_before_the_second_batch():
    # fault injection kills a worker there: after the previous epoch's checkpoint, before this one's
    calls = []
    it = cached_batches(torch.arange(12).reshape(12, 1), 4, 0, True, mid_epoch=lambda: calls.append(1), **CFG)
    next(it)
    assert calls == []
    next(it)
    assert calls == [1]
    list(it)
    assert calls == [1]


def test_cosine_schedule_starts_at_peak_and_ends_at_five_percent():
    from pipeline.training.train_config import OptimConfig
    from vae.train_step import cosine_lr

    assert cosine_lr(1.0, 0, 11) == 1.0 and cosine_lr(1.0, 10, 11) == pytest.approx(0.05)
    assert cosine_lr(1.0, 5, 11) == pytest.approx(0.525) and cosine_lr(0.3, 0, 1) == 0.3
    o = OptimConfig(epochs=11, batch_size=1, lr=2.0, lr_schedule="constant", weight_decay=0, grad_clip=0, beta=1,
                    warmup_epochs=0, free_bits=0, patience=0, min_delta=0, head_epochs=0, amp="off", compile=False, seed=0)
    assert o.lr_at(10) == 2.0


def test_cached_shares_are_equal_contiguous_and_cross_block_boundaries():
    # DDP needs the same number of steps on every worker: equal shares, the remainder sitting out (as
    # Ray Train's own equal split); contiguous row ranges, so a restarted worker gets its rows again
    blocks = (("a", 0, 5), ("b", 0, 0), ("c", 0, 4), ("d", 0, 2))   # 11 rows
    assert shard_blocks(blocks, 0, 1) == [("a", 0, 5), ("c", 0, 4), ("d", 0, 2)]
    shares = [shard_blocks(blocks, r, 2) for r in range(2)]
    assert shares == [[("a", 0, 5)], [("c", 0, 4), ("d", 0, 1)]]
    assert [sum(z - a for _, a, z in s) for s in shares] == [5, 5]
    three = [shard_blocks(blocks, r, 3) for r in range(3)]
    assert three == [[("a", 0, 3)], [("a", 3, 5), ("c", 0, 1)], [("c", 1, 4)]]
    assert shard_blocks((), 0, 2) == []
    # a bundle holding a slice of a block (rows 10..16 of "e"): offsets stay in the block's own rows
    halves = [shard_blocks((("e", 10, 16),), r, 2) for r in range(2)]
    assert halves == [[("e", 10, 13)], [("e", 13, 16)]]



def test_the_train_worker_code_never_imports_mlflow():
    """The driver copies the journal to MLflow (pipeline.training.train.journal_to_mlflow): no import of mlflow
    anywhere in the worker's module, lazy ones inside functions included (it cost rank 0 about
    4 CPU-seconds per run on this machine, measured, and every worker node a connection to the
    tracking server)."""
    import ast
    import pathlib

    import pipeline.training.train_loop as worker

    tree = ast.parse(pathlib.Path(worker.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
            [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names and not [m for m in names if m.split(".")[0] == "mlflow"], names


def test_keep_score_ranks_the_best_epoch_first_and_head_epochs_last():
    # Ray Train deletes the checkpoints with the highest keep scores beyond --keep-checkpoints (the
    # newest always stays): the best epoch must never rank behind a later one, under --min-delta too.
    p = _Progress()
    scores = [5.0, 3.0, 2.95, 4.0, 2.0]            # 2.95 improves on 3.0 by less than min_delta 0.1
    keep = []
    for epoch, s in enumerate(scores):
        p.update(s, epoch, min_delta=0.1)
        keep.append(p.keep_score(s, epoch))
    assert [p.best_epoch, p.best] == [4, 2.0]
    assert keep[:2] == [5.0, 3.0] and keep[4] == 2.0      # a new best: its own -ELBO
    assert 3.0 < keep[2] < 3.0 + 1e-9                     # not a best epoch: just behind epoch 1's
    assert keep[3] == 4.0
    assert sorted(range(5), key=keep.__getitem__)[:2] == [4, 1]   # --keep-checkpoints 2: epochs 4 and 1
    assert KEEP_LAST > max(keep)                          # head epochs rank behind every VAE epoch


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_shared_checkpoints_journal_lines_go_in_one_write_and_a_resume_restores_only_the_missing(where, tmp_path):
    """Epochs that share a checkpoint commit their lines together (one rewrite of the journal on an
    object store, which cannot append); a resumed group restores those of its checkpoint's lines the
    journal lacks, marked recovered, and never writes one twice."""
    import uuid

    from pipeline.training.run_store import RunStore

    store = RunStore(str(tmp_path / "run") if where == "local" else f"memory://journal-{uuid.uuid4().hex}")
    store.fs.makedirs(store.path, exist_ok=True)
    line = lambda epoch, attempt=0: {"epoch": epoch, "phase": "vae", "attempt": attempt, "train_neg_elbo": 9.0 - epoch}
    store.append_journal(line(0), line(1), line(2))
    store.append_journal()                                    # nothing to commit: no write
    assert [e["epoch"] for e in store.journal()] == [0, 1, 2]
    store.ensure_journal(line(1), line(2), line(3), line(4))  # the checkpoint of epochs 1-4; 3 and 4 were lost
    assert [(e["epoch"], e.get("recovered", False)) for e in store.journal()] == \
        [(0, False), (1, False), (2, False), (3, True), (4, True)]
    store.ensure_journal(line(3), line(4))
    assert len(store.journal()) == 5
