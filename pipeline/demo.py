"""`vaepipe demo`: the whole pipeline on bundled real data (scikit-learn's 8×8 digits): Parquet →
Ray Train → MLflow registry → Ray Data encode → nearest-neighbour query → PNG of samples and
reconstructions. Local Ray, MLflow on a SQLite file in the work folder."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.evaluation.datasets import digits, images_table, write_parquet


@dataclass
class DemoConfig(RuntimeConfig):
    epochs: int = opt(60, "training epochs (0: train's auto length; 60 keeps the demo to about a minute of training)")
    workers: int = opt(2, "Ray Train workers (DDP on CPU here)")
    latent_dim: int = opt(8, "latent size")
    model_name: str = opt("digits-vae", "registered model name")


def run_demo(cfg: DemoConfig) -> dict:
    from pipeline.batch.encode import EncodeConfig, run_encode
    from pipeline.models.plots import latent_scatter, samples_and_reconstructions
    from pipeline.search.query import QueryConfig, format_table, run_query
    from pipeline.training.train import TrainConfig, run_train
    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    t0 = time.perf_counter()
    work = os.path.abspath(cfg.workdir)
    rt = dict(workdir=work, tracking_uri=cfg.tracking_uri, ray_address=cfg.ray_address)
    images, labels = digits()
    data = write_parquet(images_table(images, labels), os.path.join(work, "data", "digits"), files=4)
    print(f"[1/5] wrote {len(images):,} digits (8×8, uint8) to {data}")

    tr = run_train(TrainConfig(input=data, features=["image"], epochs=cfg.epochs, workers=cfg.workers,
                               latent_dim=cfg.latent_dim, batch_size=64, model_name=cfg.model_name, **rt))
    m = tr.metrics
    print(f"[2/5] trained {tr.epochs_run} epochs on {cfg.workers} Ray Train workers in {tr.wall_s:.0f} s: "
          f"val ELBO {m['val_elbo']:.2f} nats/record (recon {m['val_recon']:.2f}, KL {m['val_kl']:.2f}), "
          f"{int(m.get('active_units', 0))}/{cfg.latent_dim} active units")
    print(f"      registered {tr.model_uri} (alias production: {'moved' if tr.promoted else 'kept'})")

    latents = os.path.join(work, "latents", "digits")
    enc = run_encode(EncodeConfig(model=f"models:/{cfg.model_name}@production", input=data, output=latents,
                                  keep=["id", "label"], score=True, executor="ray", **rt))   # the showcase: Ray Data
    print(f"[3/5] encoded {enc.rows_out:,} records to {latents} in {enc.wall_s:.1f} s")

    q = run_query(QueryConfig(latents=latents, id=["0"], k=5, **rt))
    same = sum(1 for r in q.to_pylist() if r["label"] == int(labels[0]))
    print(f"[4/5] 5 nearest neighbours of record id=0 (a {labels[0]}): {same}/5 share its label")
    print("      " + format_table(q).replace("\n", "\n      "))

    model = model_from_checkpoint(load_checkpoint(tr.checkpoint))
    figs = os.path.join(work, "figures")
    os.makedirs(figs, exist_ok=True)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    grid = samples_and_reconstructions(model, x[:16], os.path.join(figs, "digits_samples_reconstructions.png"))
    mu = model.embed(x).mean.numpy()
    scatter = latent_scatter(mu, labels, os.path.join(figs, "digits_latent_2d.png"))
    print(f"[5/5] figures: {grid}\n                {scatter}")
    uri = tr_uri = cfg.resolved_tracking_uri()
    print(f"\nMLflow store: {tr_uri}  (browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return {"train": tr, "encode": enc, "query": q, "figures": [grid, scatter]}
