"""`vaepipe protocol --what any-data-one-class`: one-class anomaly ranking by the model a user gets.

The one-class protocols (pipeline.measure.protocols) fix their own models (one-class MNIST: a Bernoulli
conv VAE, 100 epochs) to choose a score among candidates. This one asks what a user who trains with
the default recipe and runs `encode --score` gets: for each normal class d of a labelled panel set,
the recipe (pipeline.measure.panel.train_default: pPCA start, auto length, the nets' check) trains on
the training part's records of class d, and every held-out record is scored, the other classes being
the anomalies. Scores as `encode` computes them (vae.anomaly, the latent reference fitted on the
training sample as `train` registers it); `--score`'s default kind (pipeline.batch.encode.AUTO_SCORE)
is reported beside the others and IsolationForest (100 trees) on the same training records. Nothing
is chosen here: the held-out part only gives the AUCs."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.evaluation.eval_metrics import roc_auc
from pipeline.measure.panel import PanelSet, panel_sets, train_default
from vae.anomaly import SCORES, LatentReference, anomaly_score
from vae.distributions import record_keys, record_normal

SAMPLE_ROWS = 10_000    # `vaepipe train`'s --sample-rows: the records the reference is fitted on


def normal_class(s: PanelSet, d) -> PanelSet:
    """s with only class d's training records to train on; the whole held-out part stays to be scored."""
    if s.y_train is None:
        raise ValueError(f"{s.name} has no labels: a one-class run needs classes")
    own = s.x_train[s.y_train == d]
    if len(own) < 20:
        raise ValueError(f"{s.name}: class {d!r} has {len(own)} training records; a one-class run needs at least 20")
    return PanelSet(f"{s.name}:{d}", own, s.x_test, None, None, s.latent_dim, s.layout, s.image_shape)


def score_held_out(s: PanelSet, normal, seed: int = 0, epochs: int = 0) -> dict[str, Any]:
    """Train the default recipe (`epochs` 0: its auto length) on class `normal` of s and rank the held-out
    records: AUC per score."""
    from sklearn.ensemble import IsolationForest

    from pipeline.batch.encode import AUTO_SCORE

    t = time.perf_counter()
    one = normal_class(s, normal)
    nets: dict[str, Any] = {}
    model, epochs = train_default(one, seed, epochs, nets=nets)
    ref = LatentReference.fit(model, torch.from_numpy(one.x_train[:SAMPLE_ROWS].astype(np.float32)))
    raw = torch.from_numpy(s.x_test.astype(np.float32))
    eps = record_normal(record_keys(raw), s.latent_dim).unsqueeze(0)    # neg_elbo's per-record noise, as encode
    anomalous = (s.y_test != normal).astype(int)
    aucs = {k: roc_auc(anomaly_score(model, raw, k, ref, eps=eps).numpy(), anomalous) for k in SCORES}
    iso = IsolationForest(n_estimators=100, random_state=seed).fit(one.x_train)
    aucs["isolation_forest"] = roc_auc(-iso.score_samples(s.x_test), anomalous)
    return {"set": s.name, "normal": int(normal), "train": len(one.x_train),
            "epochs": epochs, "nets_kept": bool(nets.get("nets_kept", True)), "auc": aucs, "score_auto": AUTO_SCORE,
            "wall_s": time.perf_counter() - t}


def any_data_one_class(names: tuple[str, ...], normals: tuple, seed: int = 0, epochs: int = 0) -> dict[str, Any]:
    """Each set × normal class (those of `normals` the set has), printed as it finishes; the means per set."""
    t0, rows = time.perf_counter(), []
    for s in panel_sets(names, seed):
        for d in [d for d in normals if s.y_train is not None and np.any(s.y_train == d)]:
            r = score_held_out(s, d, seed, epochs)
            rows.append(r)
            print(row(r), flush=True)
    means = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r["auc"] for r in rows if r["set"] == name]
        means[name] = {k: float(np.mean([a[k] for a in mine])) for k in mine[0]}
    return {"protocol": "any-data-one-class", "seed": seed, "rows": rows, "mean": means,
            "wall_s": time.perf_counter() - t0}


def row(r: dict[str, Any]) -> str:
    a = r["auc"]
    return (f"{r['set']} normal {r['normal']}: {r['train']} records, {r['epochs']} epochs, nets "
            f"{'kept' if r['nets_kept'] else 'dropped'}; held-out ROC AUC " + " ".join(f"{k} {v:.4f}" for k, v in a.items())
            + f"  {r['wall_s']:.0f} s")


def summary(r: dict[str, Any]) -> str:
    keys = (*SCORES, "isolation_forest")
    auto = r["rows"][0]["score_auto"] if r["rows"] else "sq_err+knn_z"
    lines = [f"any-data one-class (default recipe, seed {r['seed']}; `encode --score` ranks by {auto}): wall "
             f"{r['wall_s']:.0f} s", "set | normal | nets | " + " | ".join(keys)]
    for x in r["rows"]:
        lines.append(f"{x['set']} | {x['normal']} | {'kept' if x['nets_kept'] else 'dropped'} | "
                     + " | ".join(f"{x['auc'][k]:.4f}" for k in keys))
    for name, m in r["mean"].items():
        lines.append(f"{name} | mean | | " + " | ".join(f"{m[k]:.4f}" for k in keys))
    return "\n".join(lines)
