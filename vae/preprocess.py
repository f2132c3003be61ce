"""Preprocessing that travels with the model: which columns, in which layout, scaled how.

Training fits it once on the training data; encode, decode and evaluate apply exactly the same
transform, because it is stored in the model's config (the numbers as plain lists, no pickles)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

SCALINGS = ("none", "uint8", "range", "minmax", "standardize")


@dataclass
class Preprocessing:
    features: list[str] = field(default_factory=list)
    """Feature column names: one list column, or several numeric scalar columns."""
    layout: str = "list"
    """'list' (one list column holding the whole vector) or 'scalars' (one column per feature)."""
    scaling: str = "none"
    """'uint8' (x / 255), 'range' (the data's own range to [0, 1], one offset and scale for the whole
    vector, so an image keeps its contrast between pixels), 'minmax' (to [0, 1] per feature),
    'standardize' (zero mean, unit variance per feature) or 'none'."""
    offset: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    """Fitted per-feature transform: model_input = (raw - offset) * scale (empty = identity)."""
    dtypes: list[str] = field(default_factory=list)
    """numpy dtype name of each feature column as training read it ('float64' per scalar column; the
    value type of a list column, e.g. 'uint8'); the served model's signature accepts these. Empty
    (models trained before it was recorded) = float32."""

    def __post_init__(self) -> None:
        if self.layout not in ("list", "scalars"):
            raise ValueError(f"layout must be 'list' or 'scalars', got {self.layout!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if len(self.offset) != len(self.scale):
            raise ValueError("offset and scale must have the same length")
        self.offset = [float(v) for v in self.offset]
        self.scale = [float(v) for v in self.scale]
        self.dtypes = [str(np.dtype(t)) for t in self.dtypes]
        if self.dtypes and len(self.dtypes) != len(self.features):
            raise ValueError(f"dtypes {self.dtypes} do not match features {self.features}")

    @property
    def unit_interval(self) -> bool:
        """True when model inputs lie in [0, 1] (so the Bernoulli likelihood applies)."""
        return self.scaling in ("uint8", "range", "minmax")

    @classmethod
    def fit(cls, x: np.ndarray, features: list[str], layout: str, scaling: str = "auto",
            dtypes: list[str] | None = None) -> "Preprocessing":
        """Fit on a sample of raw training records x: (N, D). 'auto' picks none for data already in
        [0, 1]; for a list column of integers (images, counts, grey levels 0–16 or 0–255 alike) the
        range the data spans; standardize otherwise (scalar columns: each in its own units).
        `dtypes`: the feature columns' dtypes in the input (recorded, not used by the transform)."""
        x = np.asarray(x)
        if scaling == "auto":
            lo, hi = float(np.min(x)), float(np.max(x))
            integral = np.issubdtype(x.dtype, np.integer) or bool(np.all(np.mod(x, 1) == 0))
            if lo >= 0 and hi <= 1:
                scaling = "none"
            elif integral and layout == "list":
                scaling = "range"
            else:
                scaling = "standardize"
        d = x.shape[1]
        xf = x.astype(np.float64)
        if scaling == "none":
            offset, scale = np.zeros(d), np.ones(d)
        elif scaling == "uint8":
            offset, scale = np.zeros(d), np.full(d, 1 / 255)
        elif scaling == "range":
            lo, hi = float(xf.min()), float(xf.max())
            offset, scale = np.full(d, lo), np.full(d, 1 / (hi - lo if hi > lo else 1.0))
        elif scaling == "minmax":
            lo, hi = xf.min(0), xf.max(0)
            offset, scale = lo, 1 / np.where(hi > lo, hi - lo, 1.0)
        elif scaling == "standardize":
            mu, sd = xf.mean(0), xf.std(0)
            offset, scale = mu, 1 / np.where(sd > 0, sd, 1.0)
        else:
            raise ValueError(f"scaling must be 'auto' or one of {SCALINGS}, got {scaling!r}")
        return cls(features=list(features), layout=layout, scaling=scaling,
                   offset=offset.tolist(), scale=scale.tolist(), dtypes=list(dtypes or []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(**d)

    def input_dtype(self, column: str | None = None) -> np.dtype:
        """The dtype training read `column` (default: the first feature column) in; float32 if unknown."""
        if not self.dtypes:
            return np.dtype(np.float32)
        i = self.features.index(column) if column is not None else 0
        return np.dtype(self.dtypes[i])


class Scaler(torch.nn.Module):
    """The fitted affine transform as buffers, so it moves with the model to any device."""

    def __init__(self, pre: Preprocessing, dim: int):
        super().__init__()
        offset = torch.tensor(pre.offset, dtype=torch.float32) if pre.offset else torch.zeros(dim)
        scale = torch.tensor(pre.scale, dtype=torch.float32) if pre.scale else torch.ones(dim)
        if offset.numel() != dim:
            raise ValueError(f"preprocessing has {offset.numel()} features, model expects {dim}")
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.clip = pre.unit_interval  # keep Bernoulli targets inside [0, 1]

    def forward(self, raw: torch.Tensor) -> torch.Tensor:  # (B, D) raw -> (B, D) model space
        x = (raw.to(self.scale.dtype) - self.offset) * self.scale
        return x.clamp_(0.0, 1.0) if self.clip else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) model space -> (B, D) raw units
        return x / self.scale + self.offset
