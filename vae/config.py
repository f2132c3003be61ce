"""Model configuration: everything needed to rebuild a VAE from code (no pickles)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vae.preprocess import Preprocessing

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class VAEConfig:
    """Shape and size of a VAE. Records are always flat vectors of `input_dim` floats at the model's
    boundary; `input_shape` says how the convolutional model views them (C, H, W)."""

    input_shape: tuple[int, ...]
    """(D,) for vector records, (C, H, W) for images; prod(input_shape) = input_dim."""
    arch: str = "mlp"
    """'mlp' for vector records, 'conv' for images."""
    latent_dim: int = 16
    """Size of the latent code z (and of the μ vectors that batch jobs write)."""
    hidden: tuple[int, ...] = (512, 256)
    """MLP: widths of the hidden layers. conv: channels of each stride-2 conv layer."""
    likelihood: str = "bernoulli"
    """'bernoulli' (BCE, for data in [0, 1]) or 'gaussian' (unit-variance, i.e. MSE)."""
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    """log-variance is clamped to this range (as diffusers' DiagonalGaussianDistribution)."""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    """How raw feature columns become the model's input vector (scaling is part of the model)."""

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.hidden = tuple(int(h) for h in self.hidden)
        if isinstance(self.preprocessing, dict):
            self.preprocessing = Preprocessing.from_dict(self.preprocessing)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not self.input_shape or any(s <= 0 for s in self.input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
        if self.latent_dim <= 0:
            raise ValueError(f"latent_dim must be > 0, got {self.latent_dim}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden must be positive sizes, got {self.hidden}")
        if self.arch == "conv":
            if len(self.input_shape) != 3:
                raise ValueError(f"conv needs input_shape (C, H, W), got {self.input_shape}")
            k = 2 ** len(self.hidden)
            if self.input_shape[1] % k or self.input_shape[2] % k:
                raise ValueError(f"conv with {len(self.hidden)} stride-2 layers needs H and W divisible "
                                 f"by {k}, got {self.input_shape[1:]}")
        if self.logvar_min >= self.logvar_max:
            raise ValueError("logvar_min must be < logvar_max")

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        return cls(**d)
