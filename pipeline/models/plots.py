"""PNG figures (matplotlib, Agg backend): sample/reconstruction grids, 2-D views of μ and the
evaluation report's rate–distortion and probe curves."""
from __future__ import annotations

import math
import os

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
    """μ itself when 2-D, else its scores on the first two principal components: scikit-learn's PCA
    (full SVD, its sign rule) in a few lines of numpy, so that the figure of every `vaepipe train` does
    not import scikit-learn (about 3 CPU-seconds on this machine, measured)."""
    if mu.shape[1] <= 2:
        return np.pad(mu, ((0, 0), (0, 2 - mu.shape[1])))
    x = np.asarray(mu, np.float64)
    x = x - x.mean(0)
    vt = np.linalg.svd(x, full_matrices=False)[2][:2]                 # (2, d) principal axes
    vt *= np.sign(vt[np.arange(2), np.abs(vt).argmax(1)])[:, None]   # each axis' largest entry positive
    return (x @ vt.T).astype(np.float32)


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


def rate_distortion(comp: dict, path: str) -> str:
    """MSE against bytes per record: PCA at fp16 for each k, and the VAE's μ at fp32/fp16/int8."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    c = comp["pca_curve_fp16"]
    ax.plot([p["bytes_fp16"] for p in c], [p["mse"] for p in c], "o-", label="PCA (fp16 components)")
    ax.plot([p["bytes_per_record"] for p in comp["rows"]], [p["vae_mse"] for p in comp["rows"]], "s-",
            label="VAE μ (fp32/fp16/int8)")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("bytes per record"), ax.set_ylabel("MSE (model units)")
    ax.legend(), ax.set_title("rate–distortion")
    fig.tight_layout(), fig.savefig(path, dpi=90), plt.close(fig)
    return path


def probe_accuracy(probe: dict, spreading: dict | None, path: str) -> str:
    """Accuracy against the number of labels for μ, PCA and raw features (logistic; label spreading)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ns = sorted(probe, key=int)
    for name in ("mu", "pca", "raw"):
        ax.plot([int(n) for n in ns], [1 - probe[n][name] for n in ns], "o-", label=f"{name}, logistic")
        if spreading:
            ax.plot([int(n) for n in ns], [1 - spreading[n][name] for n in ns], "s--", label=f"{name}, label spreading")
    ax.set_xlabel("labels"), ax.set_ylabel("probe accuracy"), ax.legend()
    fig.tight_layout(), fig.savefig(path, dpi=90), plt.close(fig)
    return path


def evaluation_figures(model: VAE, r: dict, test_raw: np.ndarray, mu: np.ndarray, labels, out: str) -> list[str]:
    """The PNGs of an evaluation report `r` in folder `out`."""
    os.makedirs(out, exist_ok=True)
    paths = [samples_and_reconstructions(model, torch.from_numpy(test_raw[:16]).float(),
                                         os.path.join(out, "samples_reconstructions.png")),
             latent_scatter(mu, labels, os.path.join(out, "latent_scatter.png")),
             rate_distortion(r["compression"], os.path.join(out, "rate_distortion.png"))]
    if r.get("probe_error"):
        paths.append(probe_accuracy(r["probe_error"], r.get("semi_supervised_error"),
                                    os.path.join(out, "probe_accuracy.png")))
    return paths
