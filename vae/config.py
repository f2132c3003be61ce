"""Model configuration: everything needed to rebuild a VAE from code (no pickles)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vae.preprocess import Preprocessing

ARCHS = ("mlp", "conv", "resconv")
LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class SemiConfig:
    """The semi-supervised head (vae.semi, Kingma et al. 2014's M1+M2): an M2 model over the VAE's
    latent z1 ~ q(z1|x), with a classifier q(y|z1), q(z2|z1, y) and a label-conditioned p(z1|z2, y)."""

    classes: tuple = ()
    """The class list, in index order: what `pred` indexes and `pred_prob` is laid out by (ints or strings)."""
    hidden: tuple[int, ...] = (128,)
    """Widths of the hidden layers of each M2 net (classifier, encoder, decoder)."""
    latent_dim: int = 16
    """Size of z2."""
    alpha: float = 10.0
    """Weight of the classification loss of labelled records, times the number of unlabelled records
    per labelled one in the batch (the paper's α·N). Fixed on two toys (two Gaussian blobs, 2 labels
    per class) before any MNIST run of this head: the paper's 0.1 let M2 explain the blobs by z2
    instead of y (77 % right); 1.0 gave 98 % with a small head but 84 % with the default one; 10 gave
    ≥ 99 % with both."""

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.hidden = tuple(int(h) for h in self.hidden)
        if len(self.classes) < 2:
            raise ValueError(f"a semi-supervised model needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {list(self.classes)}")
        if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in self.classes):
            raise ValueError(f"classes must be ints or strings, got {list(self.classes)}")
        if self.latent_dim <= 0 or not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"latent_dim and hidden must be positive, got {self.latent_dim}, {self.hidden}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "hidden": list(self.hidden), "latent_dim": self.latent_dim,
                "alpha": self.alpha}


@dataclass
class VAEConfig:
    """Shape and size of a VAE. Records are always flat vectors of `input_dim` floats at the model's
    boundary; `input_shape` says how the convolutional model views them (C, H, W)."""

    input_shape: tuple[int, ...]
    """(D,) for vector records, (C, H, W) for images; prod(input_shape) = input_dim."""
    arch: str = "mlp"
    """'mlp' for vector records, 'conv' for images, 'resconv' for images with residual blocks (vae.resconv)."""
    latent_dim: int = 16
    """Size of the latent code z (and of the μ vectors that batch jobs write)."""
    hidden: tuple[int, ...] = (512, 256)
    """MLP: widths of the hidden layers. conv, resconv: channels of each stride-2 level (resconv: multiples of 8)."""
    likelihood: str = "bernoulli"
    """'bernoulli' (BCE, for data in [0, 1]) or 'gaussian' (MSE-based; see `calibrated`)."""
    calibrated: bool = False
    """gaussian only: the decoder's shared σ is fitted to the data (σ-VAE: the batch's optimal σ in
    training, its running value stored in the model's `log_sigma` buffer for evaluation and scores);
    False keeps the unit variance of models trained before it existed."""
    linear_path: bool = False
    """A linear encoder and decoder beside the nonlinear ones (their outputs add), which training starts
    at probabilistic PCA (vae.linear); False: the nonlinear nets alone, as models trained before it."""
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    """log-variance is clamped to this range (as diffusers' DiagonalGaussianDistribution)."""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    """How raw feature columns become the model's input vector (scaling is part of the model)."""
    semi: SemiConfig | None = None
    """The semi-supervised head (classes and sizes), or None for a plain VAE."""

    def __post_init__(self) -> None:
        if isinstance(self.semi, dict):
            self.semi = SemiConfig(**self.semi)
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
        if self.arch in ("conv", "resconv"):
            if len(self.input_shape) != 3:
                raise ValueError(f"{self.arch} needs input_shape (C, H, W), got {self.input_shape}")
            k = 2 ** len(self.hidden)
            if self.input_shape[1] % k or self.input_shape[2] % k:
                raise ValueError(f"{self.arch} with {len(self.hidden)} stride-2 layers needs H and W divisible "
                                 f"by {k}, got {self.input_shape[1:]}")
        if self.arch == "resconv" and any(h % 8 for h in self.hidden):
            raise ValueError(f"resconv's channels must be multiples of 8 (GroupNorm's groups), got {self.hidden}")
        if self.calibrated and self.likelihood != "gaussian":
            raise ValueError("calibrated applies to the gaussian likelihood only")
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
        d["semi"] = self.semi.to_dict() if self.semi is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        return cls(**d)
