"""The default recipe: what a VAE looks like and how long it trains when only the data is given.

`vaepipe train` and the any-data panel (pipeline.measure.panel) both call these, so the panel
measures exactly what a user gets. Every choice is made from the data's shape and a fitted sample,
never from its dtype alone; docs/quality.md has the panel the defaults were checked on."""
from __future__ import annotations

import math

from vae.config import VAEConfig
from vae.preprocess import Preprocessing

STEP_BUDGET = 2_000
"""Optimizer steps an `--epochs auto` run aims for. MNIST's 7,200 training records at batch 128 get
36 epochs; a 455-row table gets the MAX_AUTO_EPOCHS cap (1,600 steps) instead of 20 epochs' 80."""
MAX_AUTO_EPOCHS = 400
"""Cap on auto epochs: each epoch writes a checkpoint, which costs more than a tiny table's steps."""
CONV_HIDDEN = (32, 64)
MLP_HIDDEN = (512, 256)


def auto_epochs(train_rows: int, batch_size: int, workers: int = 1) -> int:
    """Epochs that give about STEP_BUDGET optimizer steps (each worker steps on its own shard of
    `train_rows`), at least 1 and at most MAX_AUTO_EPOCHS. Early stopping (--patience) can still end
    a run sooner."""
    steps_per_epoch = max(1, math.ceil(train_rows / max(1, workers) / batch_size))
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(STEP_BUDGET / steps_per_epoch)))


def architecture(arch: str, dim: int, layout: str, image_shape: tuple[int, ...] = ()) -> tuple[str, tuple[int, ...]]:
    """(arch, input_shape). 'auto' is conv for images: a list column with `image_shape` given (any
    C×H×W, colour included) or a square of at least 8×8 grey pixels, when H and W survive the two
    stride-2 layers; an MLP over (D,) otherwise."""
    if image_shape and math.prod(image_shape) != dim:
        raise ValueError(f"image_shape {tuple(image_shape)} holds {math.prod(image_shape)} values, "
                         f"the feature column has {dim}")
    side = math.isqrt(dim)
    shape = tuple(image_shape) if image_shape else ((1, side, side) if side * side == dim else ())
    k = 2 ** len(CONV_HIDDEN)
    image = layout == "list" and len(shape) == 3 and min(shape[1:]) >= 8 and shape[1] % k == 0 and shape[2] % k == 0
    if arch == "auto":
        arch = "conv" if image else "mlp"
    if arch in ("conv", "resconv"):
        if len(shape) != 3:
            raise ValueError(f"--arch {arch} needs --image-shape C,H,W: {dim} features are not a square image")
        return arch, shape
    return arch, (dim,)


def likelihood(choice: str, pre: Preprocessing, sample_in_unit: bool) -> tuple[str, bool]:
    """(likelihood, calibrated). 'auto' is the calibrated Gaussian (σ-VAE) on every kind of data: its
    σ follows the data's error scale, so β = 1 balances reconstruction and KL in any units. An explicit
    'gaussian' is calibrated too; 'bernoulli' needs data in [0, 1]."""
    if choice == "bernoulli":
        if not (pre.unit_interval or (pre.scaling == "none" and sample_in_unit)):
            raise ValueError("the bernoulli likelihood needs data in [0, 1] (scaling uint8, range or minmax, or "
                             "data already there); use --likelihood gaussian")
        return "bernoulli", False
    return "gaussian", True


def model_config(pre: Preprocessing, dim: int, layout: str, latent_dim: int, *, arch: str = "auto",
                 image_shape: tuple[int, ...] = (), hidden: tuple[int, ...] = (), likelihood_choice: str = "auto",
                 sample_in_unit: bool = False, linear_path: bool | None = None) -> VAEConfig:
    """The VAEConfig for this data and these (possibly 'auto') choices. The Gaussian models get the
    linear path started at pPCA (vae.linear) unless `linear_path` says otherwise."""
    arch, shape = architecture(arch, dim, layout, tuple(image_shape))
    lik, calibrated = likelihood(likelihood_choice, pre, sample_in_unit)
    hidden = tuple(hidden) or (CONV_HIDDEN if arch in ("conv", "resconv") else MLP_HIDDEN)
    return VAEConfig(input_shape=shape, arch=arch, latent_dim=latent_dim, hidden=hidden, likelihood=lik,
                     calibrated=calibrated,
                     linear_path=lik == "gaussian" if linear_path is None else linear_path, preprocessing=pre)


def ppca_start(model, sample, seed: int = 0):
    """The pPCA (vae.linear.PPCA) a linear-path model starts at, fit on `sample` (raw records (N, D),
    preprocessed here); None for a model without a linear path."""
    import torch

    from vae.linear import fit_ppca

    if not model.config.linear_path:
        return None
    return fit_ppca(model.preprocess(torch.as_tensor(sample)), model.config.latent_dim, seed)


def start(model, sample, seed: int = 0) -> None:
    """Start a linear-path model at the pPCA of `sample`; nothing for a model without one."""
    p = ppca_start(model, sample, seed)
    if p is not None:
        model.start_at(p)


NETS_MIN_GAIN = 0.10
"""The share of the linear (pPCA) part's validation round-trip error the nonlinear nets must remove,
at the lower end of its confidence interval, for the model to keep them (vae.recipe.keep_nets). Set
on the any-data panel's colour patches, whose nets' lower bounds reached 7.9 % over three seeds while
they did worse than pPCA on the other photo; where nets carry over (MNIST, the digits: 49–52 %) it
changes nothing (docs/quality.md)."""

PSEUDO_LABELS = 0.0
"""`train --labels`: the fraction of each class's unlabelled records that label spreading over μ
pseudo-labels for the M2 head (vae.spreading.pseudo_label), those it is surest of. Off by default:
0.6 lowered the head's error on the panel's digits (9.5 % to 6.8 %, 5 label draws; over 20 the head
without it is level with raw label spreading there) and helped breast cancer and wine, but on iris,
kept aside, it did worse than the head without it on all three splits and than raw spreading too,
and on MNIST it cost half a point; 0.3 hurt iris and MNIST as well (docs/quality.md)."""


def keep_nets(full: float, linear: float, sq_diff: float, n: float, min_gain: float = NETS_MIN_GAIN) -> bool:
    """Whether a trained linear-path model keeps its nets, from the sums vae.train_step.round_trip takes
    over validation records: Σ of the whole model's squared round-trip errors, Σ of its linear part's
    alone, Σ of the squared per-record differences, and the count. The nets stay only when the gain
    per record (linear − whole), less two standard errors, is at least `min_gain` of the linear part's
    error; otherwise the model is its pPCA start. Two reasons: a gain seen on a few validation
    records is noise (a 105-row table holds out 10), and nets that gain little on records like the
    training data can do much worse on records unlike it (docs/quality.md: on colour patches, nets
    2–11 % better than pPCA on held-out patches of the training photo were up to 2.1× worse on the
    other photo, where pPCA holds). A negative `min_gain` keeps the nets whatever they do."""
    return min_gain < 0 or nets_gain(full, linear, sq_diff, n)[1] >= min_gain


def nets_gain(full: float, linear: float, sq_diff: float, n: float) -> tuple[float, float]:
    """(gain, its lower bound): the nets' mean per-record gain over the linear part, and that less two
    standard errors, each as a share of the linear part's mean error (keep_nets's sums)."""
    if n < 2 or linear <= 0:
        return 0.0, float("-inf")
    gain = (linear - full) / n                                   # mean per-record gain
    se = max(sq_diff / n - gain ** 2, 0.0) ** 0.5 / (n - 1) ** 0.5
    return gain * n / linear, (gain - 2 * se) * n / linear


def settle_nets(model, sums, start, min_gain: float = NETS_MIN_GAIN) -> dict[str, float]:
    """The nets' check on a trained model, from vae.train_step.round_trip's sums (added over workers
    where there are several): decide (keep_nets), send a model whose nets fail back to its pPCA start
    `start` (in place), and return the figures (MLflow, the checkpoint, the panel): nets_kept (1/0),
    the validation round-trip MSE per record of the whole model and of its linear part, and the gain
    and its lower bound as shares of the linear part's error (NaN with fewer than 2 records)."""
    full, linear, sq_diff, n = (float(v) for v in sums)
    kept = keep_nets(full, linear, sq_diff, n, min_gain)
    if not kept:
        model.start_at(start)
    gain, lower = nets_gain(full, linear, sq_diff, n)
    return {"nets_kept": float(kept), "val_round_trip_mse": full / max(n, 1), "val_linear_round_trip_mse": linear / max(n, 1),
            "nets_gain": gain, "nets_gain_lower": lower if lower > float("-inf") else float("nan")}
