"""`vaepipe protocol --what …`: runs the chosen protocol and prints its table (the protocols themselves
are in pipeline.measure.protocols and pipeline.measure.protocol_jobs)."""
from __future__ import annotations

from typing import Any

import torch

from pipeline.measure import panel, panel_one_class
from pipeline.measure.protocol_jobs import breast_cancer_jobs, jobs_summary
from pipeline.measure.protocols import (BASELINES, CANDIDATES, ProtocolConfig, breast_cancer, one_class_mnist,
                                        semi_mnist)
from pipeline.runtime.config import write_json
from pipeline.runtime.errors import ConfigError

def _any_data(cfg: ProtocolConfig) -> dict[str, Any]:
    unknown = [s for s in cfg.sets if s not in panel.PANEL]
    if unknown:
        raise ConfigError(f"--sets: unknown any-data set(s) {unknown}; known: {list(panel.PANEL)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return panel.any_data(tuple(cfg.sets) or panel.PANEL, seed=cfg.seed, epochs=cfg.epochs, betas=tuple(cfg.betas),
                          label_draws=cfg.label_draws)


def _any_data_one_class(cfg: ProtocolConfig) -> dict[str, Any]:
    unknown = [s for s in cfg.sets if s not in panel.PANEL]
    if unknown:
        raise ConfigError(f"--sets: unknown any-data set(s) {unknown}; known: {list(panel.PANEL)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return panel_one_class.any_data_one_class(tuple(cfg.sets) or ONE_CLASS_SETS, tuple(cfg.digits), seed=cfg.seed,
                                                epochs=cfg.epochs)


ONE_CLASS_SETS = ("mnist", "digits-0-16")


def run_protocol(cfg: ProtocolConfig) -> dict[str, Any]:
    r = {"semi-mnist": semi_mnist, "one-class-mnist": one_class_mnist, "breast-cancer": breast_cancer,
         "breast-cancer-jobs": breast_cancer_jobs, "any-data": _any_data,
         "any-data-one-class": _any_data_one_class}[cfg.what](cfg)
    r["threads"] = torch.get_num_threads()
    if cfg.json:
        write_json(cfg.json, r)
    return r


def summary(r: dict[str, Any]) -> str:
    """The protocol's table, as printed."""
    if r["protocol"] == "breast-cancer-jobs":
        return jobs_summary(r)
    if r["protocol"] == "any-data":
        return panel.summary(r)
    if r["protocol"] == "any-data-one-class":
        return panel_one_class.summary(r)
    lines = [f"{r['protocol']} ({r.get('arch', 'mlp')}, {r['epochs']} epochs"
             + (f", best of them by the ELBO of {r['val_fraction']:.0%} held out" if r.get("val_fraction") else "")
             + (f", scores averaged over {r['ensemble']} VAEs" if r.get("ensemble", 1) > 1 else "")
             + f"): wall {r['wall_s']:.0f} s ({r['threads']} torch threads)"]
    if r["protocol"] == "semi-mnist":
        lines.append("labels | M1+M2 error (mean ± sd) | label spreading on μ")
        for n, v in r["m2"].items():
            ls = r["label_spreading_mu"][n]
            lines.append(f"{n:>6} | {v['mean']:.2%} ± {v['sd']:.2%} | {ls['mean']:.2%} ± {ls['sd']:.2%}")
        return "\n".join(lines)
    keys = (*CANDIDATES, *BASELINES)
    c = r["chosen"]
    lines.append("held-out ROC AUC | vaepipe (chosen) | " + " | ".join(keys))
    rows = r["per_digit"].items() if r["protocol"] == "one-class-mnist" else \
        ((f"draw {i}", d) for i, d in enumerate(r["draws"]))
    for name, v in rows:
        lines.append(f"{name} | {v[c['score']]:.4f} | " + " | ".join(f"{v[k]:.4f}" for k in keys))
    lines.append(f"mean | {r['mean'][c['score']]:.4f} | " + " | ".join(f"{r['mean'][k]:.4f}" for k in keys))
    if "sd" in r:
        lines.append(f"sd | {r['sd'][c['score']]:.4f} | " + " | ".join(f"{r['sd'][k]:.4f}" for k in keys))
    at = f"@{c['epochs']}" if "epochs" in c else ""
    lines.append("training-split AUC (mean) | | " + " | ".join(f"{r['train_split_mean'][k + at]:.4f}"
                                                           for k in CANDIDATES))
    where = "on the training split (validation normals of d against other digits' training images)" \
        if r["protocol"] == "one-class-mnist" else \
        f"by the two-fold cross-fit inside the fit half, among epochs {r['epoch_grid']}"
    lines.append(f"chosen {where}: {c['score']}" + (f" at {c['epochs']} epochs" if at else "")
                 + f" (training-split AUC {c['train_split_auc']:.4f})")
    if "vs_isolation_forest" in r:
        v = r["vs_isolation_forest"]
        lines.append(f"paired, {c['score']} minus isolation_forest: wins {v['wins']} / losses {v['losses']} of "
                     f"{v['draws']} draws, mean {v['mean_diff']:+.4f} ± {v['sd_diff']:.4f} (sd)")
    best = max(BASELINES, key=lambda k: r["mean"][k])
    lines.append(f"vaepipe {c['score']} {r['mean'][c['score']]:.4f} vs best baseline {best} {r['mean'][best]:.4f}")
    return "\n".join(lines)
