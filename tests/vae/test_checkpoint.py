"""Checkpoints: a round trip rebuilds the same model; anything but tensors and plain data is refused."""
from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from vae.checkpoint import (FORMAT, CheckpointError, checkpoint_bytes, checkpoint_state, load_checkpoint,
                            model_from_checkpoint, state_bytes,
                            save_checkpoint)
from vae.config import VAEConfig
from vae.model import VAE
from vae.preprocess import Preprocessing


def small_model(arch: str = "mlp") -> VAE:
    if arch in ("conv", "resconv"):
        hidden = (4, 8) if arch == "conv" else (8, 16)
        return VAE(VAEConfig(input_shape=(1, 8, 8), arch=arch, latent_dim=3, hidden=hidden))
    pre = Preprocessing(features=["v"], scaling="standardize", offset=[float(i) for i in range(6)],
                        scale=[0.5] * 6)
    return VAE(VAEConfig(input_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian", preprocessing=pre))


@pytest.mark.parametrize("arch", ["mlp", "conv", "resconv"])
def test_save_load_round_trip_reproduces_identical_outputs(tmp_path, arch):
    model = small_model(arch).eval()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(4, model.config.input_dim)).loss.backward()
    opt.step()                                                      # optimizer state holds tensors and numbers
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, epoch=3, extra={"val_neg_elbo": 1.5})
    assert os.listdir(tmp_path) == ["ckpt.pt"]                      # no temporary file left behind

    state = load_checkpoint(path)
    assert (state["format"], state["epoch"], state["extra"]) == (FORMAT, 3, {"val_neg_elbo": 1.5})
    back = model_from_checkpoint(state)
    assert back.config == model.config and not back.training

    raw, z = torch.rand(5, model.config.input_dim) * 10, torch.randn(5, 3)
    assert torch.equal(back.embed(raw).mean, model.embed(raw).mean)
    assert torch.equal(back.embed(raw).logvar, model.embed(raw).logvar)
    assert torch.equal(back.reconstruct(z), model.reconstruct(z))
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(back.score(raw, generator=g()), model.score(raw, generator=g()))

    opt2 = torch.optim.AdamW(back.parameters())
    opt2.load_state_dict(state["optimizer"])                        # resumable
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_checkpoint_bytes_load_from_bytes_and_file_objects():
    model = small_model()
    data = checkpoint_bytes(model)
    for source in (data, io.BytesIO(data)):
        state = load_checkpoint(source)
        assert state["optimizer"] is None and state["epoch"] == 0
        for k, v in model.state_dict().items():
            assert torch.equal(state["model"][k], v)


def test_a_copied_checkpoint_state_stays_as_it_was_while_training_goes_on():
    """train holds the best epoch's checkpoint while later epochs train (--checkpoint-interval-s): a
    copy must not follow the live weights and optimiser state, as the plain state (written at once) may."""
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.rand(8, model.config.input_dim)
    model(x).loss.backward()
    opt.step()
    held = checkpoint_state(model, opt, epoch=3, copy=True)
    live = checkpoint_state(model, opt, epoch=3)
    before = {k: v.clone() for k, v in held["model"].items()}
    step = held["optimizer"]["state"][0]["step"].clone()
    model(x).loss.backward()
    opt.step()
    assert all(torch.equal(held["model"][k], v) for k, v in before.items())
    assert torch.equal(held["optimizer"]["state"][0]["step"], step)
    assert not all(torch.equal(live["model"][k], v) for k, v in before.items())   # the live tensors moved
    assert model_from_checkpoint(load_checkpoint(state_bytes(held))) is not None


def test_model_from_checkpoint_is_strict_about_weights():
    state = load_checkpoint(checkpoint_bytes(small_model()))
    state["model"].pop(next(k for k in state["model"] if k.startswith("encoder.")))
    with pytest.raises(RuntimeError, match="Missing key"):
        model_from_checkpoint(state)


def test_a_checkpoint_from_before_the_round_trip_map_loads_with_none():
    model = small_model()
    with torch.no_grad():
        model.round_trip_weight.fill_(0.5)
    state = load_checkpoint(checkpoint_bytes(model))
    for k in ("round_trip_weight", "round_trip_bias"):
        state["model"].pop(k)
    loaded = model_from_checkpoint(state)
    assert not loaded.round_trip_weight.any() and not loaded.round_trip_bias.any()


class Payload:
    """An arbitrary object: a weights-only loader must not rebuild it."""

    def __init__(self):
        self.x = 1


class RunsCode:
    """Unpickling this would create a directory: the classic pickle code-execution payload."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {}, "model": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        load_checkpoint(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_would_execute_code_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = {"format": FORMAT, "model": RunsCode(str(marker))}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))            # a bare (legacy) pickle file
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*evil\.pt"):
        load_checkpoint(path)
    assert not marker.exists()                                      # the payload never ran


@pytest.mark.parametrize("obj", [{"weights": torch.zeros(3)}, torch.zeros(3), {"format": "other-v1"}],
                         ids=["foreign-dict", "bare-tensor", "wrong-format"])
def test_a_non_vaepipe_torch_file_is_refused(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"is not a {FORMAT} file"):
        load_checkpoint(path)


def test_a_plain_state_dict_is_refused():
    buf = io.BytesIO()
    torch.save(small_model().state_dict(), buf)
    with pytest.raises(CheckpointError, match="<bytes> is not a"):
        load_checkpoint(buf.getvalue())


def test_garbage_bytes_are_refused():
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(b"definitely not a checkpoint")


def test_a_checkpoint_from_before_the_latent_metric_loads_with_the_identity():
    # its embedding is then μ itself, what such a model's users searched before
    model = small_model()
    with torch.no_grad():
        model.metric_factor.fill_(0.5)
    state = load_checkpoint(checkpoint_bytes(model))
    state["model"].pop("metric_factor")
    loaded = model_from_checkpoint(state)
    assert torch.equal(loaded.metric_factor, torch.eye(model.config.latent_dim))
