"""PNG figures (matplotlib, Agg backend): sample/reconstruction grids and 2-D views of μ."""
from __future__ import annotations

import math

import numpy as np
import torch

from vae.model import VAE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_shape(model: VAE) -> tuple[int, int] | None:
    shape = model.config.input_shape
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2]
    side = math.isqrt(model.config.input_dim)
    return (side, side) if side * side == model.config.input_dim else None


def samples_and_reconstructions(model: VAE, raw: torch.Tensor, path: str, n: int = 16, seed: int = 0) -> str:
    """Row 1: inputs; row 2: their reconstructions from μ; row 3: samples from the prior."""
    plt = _plt()
    raw = raw[:n].float()
    recon = model.reconstruct(model.embed(raw).mean)
    samples = model.sample(len(raw), generator=torch.Generator().manual_seed(seed))
    hw = _image_shape(model)
    fig, axes = plt.subplots(3, len(raw), figsize=(len(raw) * 0.8, 2.8))
    axes = np.atleast_2d(axes)
    for row, (title, data) in enumerate([("input", raw), ("reconstruction", recon), ("sample", samples)]):
        for i in range(len(raw)):
            ax = axes[row, i]
            v = data[i].numpy()
            if hw:
                ax.imshow(v.reshape(hw), cmap="gray")
            else:
                ax.plot(v, lw=0.7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def project_2d(mu: np.ndarray) -> np.ndarray:
    """μ itself when 2-D, else its first two principal components."""
    if mu.shape[1] <= 2:
        return np.pad(mu, ((0, 0), (0, 2 - mu.shape[1])))
    c = mu - mu.mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T


def latent_scatter(mu: np.ndarray, labels: np.ndarray | None, path: str) -> str:
    plt = _plt()
    p = project_2d(mu)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    kw = {"c": labels, "cmap": "tab10"} if labels is not None else {"color": "tab:blue"}
    sc = ax.scatter(p[:, 0], p[:, 1], s=3, **kw)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_title("μ, first two principal components" if mu.shape[1] > 2 else "μ")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
