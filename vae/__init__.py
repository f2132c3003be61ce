"""vae: the variational auto-encoder itself, in pure PyTorch (no Ray, MLflow or fsspec here).
Names load lazily, so `vae.hashing` (numpy only) can be imported without torch."""
from __future__ import annotations

import importlib

_EXPORTS = {"VAE": "vae.model", "VAEConfig": "vae.config", "DiagonalGaussian": "vae.distributions",
            "Preprocessing": "vae.preprocess"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vae' has no attribute {name!r}")
