"""GPU checks (run by hand on a CUDA host; not a pytest module: CI has no GPU, and a test that
skips on every CI run would prove nothing there).

    python tests/gpu/check_cuda.py [--json FILE]      # exits 2 without a visible CUDA GPU

What it checks, on the MNIST digits shipped in pipeline/evaluation/data (or $VAEPIPE_MNIST), and what it prints:
1. parity: μ of the same weights on CPU and on CUDA (fp32), MLP and conv, the largest difference;
   the −ELBO anomaly score with per-record noise likewise. A GPU encode must give the CPU's latents.
2. amp: 6 epochs of `vae.train_step.train_epoch` (the loop `vaepipe train` runs) per precision,
   off / bf16 / fp16 (GradScaler), same seed: each run's −ELBO falls and ends within 3 % of fp32's;
   then steady-state samples/s of each precision at batch 1,024 and 8,192, data already on the GPU.
3. checkpoint: a model trained on CUDA, saved with vae.checkpoint and loaded on the CPU (and back on
   CUDA) by the one safe loader, gives the same μ; samples from the prior on CUDA are finite.
Every check asserts; the figures go to stdout (and --json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np
import torch

from pipeline.measure.bench_common import BenchConfig, bench_model
from pipeline.evaluation.datasets import mnist
from vae.checkpoint import checkpoint_bytes, load_checkpoint, model_from_checkpoint
from vae.distributions import record_keys, record_normal
from vae.loss import kl_weight
from vae.model import VAE
from vae.train_step import cosine_lr, train_epoch


def make_model(arch: str) -> VAE:
    """The MLP both sides of `vaepipe bench` run (784-512-256-16, uint8 scaling, Bernoulli, seed 0),
    or its conv twin (two stride-2 layers of 32 and 64 channels) with the same preprocessing."""
    mlp = bench_model(BenchConfig())
    if arch != "conv":
        return mlp
    torch.manual_seed(0)
    return VAE(dataclasses.replace(mlp.config, input_shape=(1, 28, 28), arch="conv", hidden=(32, 64))).eval()


def mu_of(model: VAE, x: torch.Tensor, device: str, bs: int = 4096) -> torch.Tensor:
    model = model.to(device)
    with torch.inference_mode():
        return torch.cat([model.embed(x[i:i + bs].to(device)).mean.float().cpu() for i in range(0, len(x), bs)])


def parity(x: torch.Tensor) -> dict:
    out = {}
    for arch in ("mlp", "conv"):
        m = make_model(arch)
        a, b = mu_of(m, x, "cpu"), mu_of(m, x, "cuda")
        out[f"{arch}_max_abs_mu_diff"] = float((a - b).abs().max())
        out[f"{arch}_max_abs_mu"] = float(a.abs().max())
        out[f"{arch}_max_rel_mu_diff"] = out[f"{arch}_max_abs_mu_diff"] / out[f"{arch}_max_abs_mu"]
    # −ELBO with each record's own noise (what `encode --score` writes): the same on both devices
    m, xs = make_model("mlp"), x[:2048]
    eps = record_normal(record_keys(xs), m.config.latent_dim, 0).unsqueeze(0)          # (1, B, L)
    s_cpu = m.cpu().score(xs, eps=eps)
    s_gpu = m.cuda().score(xs.cuda(), eps=eps.cuda()).cpu()
    out["score_max_rel_diff"] = float(((s_cpu - s_gpu).abs() / s_cpu.abs()).max())
    # fp32 matmuls on CUDA use full precision unless TF32 is allowed; cuDNN convolutions allow TF32
    # by default (torch.backends.cudnn.allow_tf32), hence the looser bound for conv
    out["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    assert out["mlp_max_rel_mu_diff"] < 1e-4, out          # fp32 both sides: summation order only
    assert out["conv_max_rel_mu_diff"] < 1e-2, out         # TF32 keeps a 10-bit mantissa: ~1e-3
    assert out["score_max_rel_diff"] < 1e-4, out
    return out


def train(x_gpu: torch.Tensor, amp: str, epochs: int = 6, bs: int = 256, lr: float = 2e-3) -> tuple[VAE, list[float]]:
    model = make_model("mlp").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    g = torch.Generator(device="cuda").manual_seed(0)
    hist = []
    for e in range(epochs):
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(lr, e, epochs)
        perm = torch.randperm(len(x_gpu), device="cuda", generator=g)
        stats = train_epoch(model, (x_gpu[perm[i:i + bs]] for i in range(0, len(x_gpu), bs)), opt,
                            kl_weight(1.0, e + 1, 0.0), 0.0, "cuda", amp, scaler)
        hist.append(stats.means()["neg_elbo"])
    return model.eval(), hist


def throughput(x_gpu: torch.Tensor, amp: str, bs: int, n: int = 262_144) -> float:
    """Samples/s of train_epoch over n records (the MNIST digits tiled) already on the GPU, after one
    warm-up pass of 20 batches."""
    model = make_model("mlp").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    data = x_gpu.repeat(-(-n // len(x_gpu)), 1)[:n]
    batches = lambda k: (data[i:i + bs] for i in range(0, min(k, n), bs))
    train_epoch(model, batches(20 * bs), opt, 1.0, 0.0, "cuda", amp, scaler)
    torch.cuda.synchronize()
    t = time.perf_counter()
    stats = train_epoch(model, batches(n), opt, 1.0, 0.0, "cuda", amp, scaler)
    torch.cuda.synchronize()
    assert stats.records == n and np.isfinite(stats.neg_elbo)
    return n / (time.perf_counter() - t)


def amp_checks(x: torch.Tensor) -> tuple[dict, VAE]:
    x_gpu = x.cuda()
    out, models = {}, {}
    for amp in ("off", "bf16", "fp16"):
        t = time.perf_counter()
        models[amp], hist = train(x_gpu, amp)
        out[f"{amp}_neg_elbo_by_epoch"] = [round(h, 3) for h in hist]
        out[f"{amp}_train_s"] = round(time.perf_counter() - t, 2)
        assert all(np.isfinite(hist)) and hist[-1] < hist[0], (amp, hist)
    ref = out["off_neg_elbo_by_epoch"][-1]
    for amp in ("bf16", "fp16"):
        out[f"{amp}_final_vs_fp32"] = out[f"{amp}_neg_elbo_by_epoch"][-1] / ref
        assert abs(out[f"{amp}_final_vs_fp32"] - 1) < 0.03, out
    for bs in (1024, 8192):
        for amp in ("off", "bf16", "fp16"):
            out[f"samples_per_s_{amp}_b{bs}"] = round(throughput(x_gpu, amp, bs))
    return out, models["off"]


def checkpoint_checks(model: VAE, x: torch.Tensor) -> dict:
    blob = checkpoint_bytes(model)
    on_cpu = model_from_checkpoint(load_checkpoint(blob, map_location="cpu"))
    on_gpu = model_from_checkpoint(load_checkpoint(blob, map_location="cuda"), map_location="cuda")
    assert next(on_cpu.parameters()).device.type == "cpu" and next(on_gpu.parameters()).device.type == "cuda"
    ref = mu_of(model, x, "cuda")
    out = {"cpu_load_max_abs_mu_diff": float((mu_of(on_cpu, x, "cpu") - ref).abs().max()),
           "cuda_load_max_abs_mu_diff": float((mu_of(on_gpu, x, "cuda") - ref).abs().max()),
           "checkpoint_bytes": len(blob)}
    samples = on_gpu.sample(64, torch.Generator(device="cuda").manual_seed(0))
    out["prior_samples_finite"] = bool(torch.isfinite(samples).all())
    assert out["cuda_load_max_abs_mu_diff"] == 0.0 and out["cpu_load_max_abs_mu_diff"] < 1e-3, out
    assert out["prior_samples_finite"] and samples.shape == (64, 784)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"check_cuda: no CUDA GPU is visible to torch {torch.__version__}; nothing was checked", file=sys.stderr)
        return 2
    images, _ = mnist()
    x = torch.from_numpy(np.ascontiguousarray(images.reshape(len(images), -1)))          # (8000, 784) uint8
    figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
               "records": len(x)}
    for name, fn in (("parity", lambda: parity(x)), ("amp", lambda: amp_checks(x)),
                     ("checkpoint", lambda: checkpoint_checks(trained, x))):
        t = time.perf_counter()
        res = fn()
        if name == "amp":
            res, trained = res
        figures[name] = res
        print(f"check_cuda: {name} OK in {time.perf_counter() - t:.1f} s: {json.dumps(res)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    print("check_cuda: all OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
