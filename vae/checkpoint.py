"""A checkpoint is state dicts + config + step, saved with torch.save and loaded by one safe helper
that never unpickles arbitrary objects (torch.load(weights_only=True)). A registered model's
checkpoint may also hold its latent reference (vae.anomaly: μ of records it was fit on), which the
knn_z anomaly scores read."""
from __future__ import annotations

import copy as copy_module
import io
import os
from typing import Any

import torch

from vae.anomaly import LatentReference
from vae.config import VAEConfig
from vae.model import VAE
from vae.semi import build_model

FORMAT = "vaepipe-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file that is not a vaepipe checkpoint, or holds something other than tensors and
    plain data."""


def checkpoint_state(model: VAE, optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                     extra: dict[str, Any] | None = None, copy: bool = False) -> dict[str, Any]:
    """The checkpoint of `model` (and `optimizer`) at `epoch`, as a dict; with `copy`, its tensors are
    copies, so it stays as it is while training goes on (otherwise they may be the live ones)."""
    opt = optimizer.state_dict() if optimizer is not None else None
    return {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu().clone() if copy else v.detach().cpu()
                  for k, v in _unwrap(model).state_dict().items()},
        "optimizer": copy_module.deepcopy(opt) if copy else opt,
        "epoch": int(epoch),
        "extra": extra or {},
    }


def checkpoint_bytes(model: VAE, optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                     extra: dict[str, Any] | None = None) -> bytes:
    return state_bytes(checkpoint_state(model, optimizer, epoch, extra))


def state_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def with_reference(state: dict[str, Any], reference: LatentReference) -> bytes:
    """The checkpoint `state` with its latent reference, as bytes."""
    return state_bytes({**state, "reference": reference.to_state()})


def reference_from_checkpoint(state: dict[str, Any]) -> LatentReference | None:
    """The latent reference stored with the model, or None (a checkpoint from before references, or
    one Ray Train wrote during training)."""
    ref = state.get("reference")
    return LatentReference.from_state(ref) if ref is not None else None


def save_checkpoint(path: str | os.PathLike, model: VAE, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write atomically: a reader never sees half a checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(checkpoint_bytes(model, optimizer, epoch, extra))
    os.replace(tmp, path)


def load_checkpoint(source: str | os.PathLike | bytes | io.BytesIO, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict. Refuses pickled objects (weights-only unpickler) and foreign files."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # the weights-only unpickler raises UnpicklingError / RuntimeError
        raise CheckpointError(f"refusing to load checkpoint {_name(source)}: not a weights-only file "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{_name(source)} is not a {FORMAT} file")
    return state


def model_from_checkpoint(state: dict[str, Any], map_location: str = "cpu") -> VAE:
    """Build the module from code and config (a SemiVAE when the config has a class list), then load
    weights (strict)."""
    model = build_model(VAEConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"], strict=True)
    return model.to(map_location).eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP wraps the model in .module


def _name(source: Any) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "<bytes>"
