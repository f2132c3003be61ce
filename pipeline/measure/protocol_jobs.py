"""`vaepipe protocol --what breast-cancer-jobs`: the breast-cancer protocol's chosen score, produced
by the batch jobs a user runs instead of the protocol's in-process loop.

Per draw (the same seeded draws as `--what breast-cancer`): the fit half and the scored half are
written as Parquet (30 float columns `c0`…`c29` and `id`; the malignant flag never reaches a job),
`run_train` (what `vaepipe train` runs: Ray Train, MLflow registry) fits `--ensemble` models with
the protocol's tabular recipe (protocols.tabular_vae: `--no-linear-path`), seeds draw + 10,000·m,
and one `run_encode` (what `vaepipe encode` runs) writes `score` for the scored half with
`--score-kind` over all of them (`--score-models`).
The AUC is read from the committed Parquet output. IsolationForest is fit on the same fit half (in
the standardised space the protocol uses), so the comparison is paired draw by draw.

The score and the epochs are not chosen here: they are what `--what breast-cancer --ensemble 5
--draws 20` chose by its cross-fit (docs/quality.md: knn_z at 10 epochs), fixed before any run of
this command."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.evaluation.eval_metrics import roc_auc
from pipeline.measure.protocols import ProtocolConfig, breast_cancer_draw, paired, tabular_vae

CHOSEN_SCORE, CHOSEN_EPOCHS = "knn_z", 10   # chosen by breast-cancer's cross-fit (docs/quality.md)
COLUMNS = [f"c{i}" for i in range(30)]


def _write(path: str, x: np.ndarray, ids: np.ndarray) -> str:
    os.makedirs(path, exist_ok=True)
    table = pa.table({"id": pa.array(ids, pa.int64()), **{c: pa.array(x[:, i], pa.float32()) for i, c in enumerate(COLUMNS)}})
    pq.write_table(table, os.path.join(path, "part-0.parquet"))
    return path


def _committed_score(out: str) -> tuple[np.ndarray, np.ndarray]:
    """(id, score) of encode's committed output, read with pyarrow as any reader would."""
    t = pq.read_table(out, columns=["id", "score"]).sort_by("id")
    return t.column("id").to_numpy(), t.column("score").to_numpy()


def breast_cancer_jobs(cfg: ProtocolConfig) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import IsolationForest

    from pipeline.batch.encode import EncodeConfig, run_encode
    from pipeline.training.train import TrainConfig, run_train

    t0 = time.perf_counter()
    x, target = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    epochs = cfg.epochs or CHOSEN_EPOCHS
    root = os.path.join(cfg.workdir, "protocol-jobs")
    runs = []
    for s in range(cfg.seed, cfg.seed + cfg.draws):
        tr, te = breast_cancer_draw(target, s)
        d = os.path.join(root, f"draw-{s}")
        fit_dir, scored_dir = _write(f"{d}/fit", x[tr], tr), _write(f"{d}/scored", x[te], te)
        uris = []
        for m in range(cfg.ensemble):
            r = run_train(TrainConfig(
                input=fit_dir, features=COLUMNS, id_column="id", arch="mlp", hidden=[64, 32], latent_dim=4,
                likelihood="gaussian", scaling="standardize", epochs=epochs, batch_size=32, lr=2e-3,
                weight_decay=0.01, linear_path=False, val_fraction=cfg.val_fraction, seed=s + 10_000 * m, workers=1,
                model_name=f"bc-draw{s}-m{m}", workdir=cfg.workdir, tracking_uri=cfg.tracking_uri,
                ray_address=cfg.ray_address))
            uris.append(r.model_uri)
        out = f"{d}/latents"
        run_encode(EncodeConfig(model=uris[0], input=scored_dir, output=out, score_kind=CHOSEN_SCORE,
                                score_models=uris[1:], workdir=cfg.workdir, tracking_uri=cfg.tracking_uri,
                                ray_address=cfg.ray_address))
        ids, score = _committed_score(out)
        assert np.array_equal(ids, np.sort(te)), f"{out}: the committed ids are not the scored half's"
        anomalous = (target[ids] == 0).astype(int)
        pre = tabular_vae(x[tr], s).preprocess                # the protocol's standardised space
        z_tr, z_te = pre(torch.from_numpy(x[tr])).numpy(), pre(torch.from_numpy(x[ids])).numpy()
        iso = -IsolationForest(n_estimators=100, random_state=s).fit(z_tr).score_samples(z_te)
        runs.append({"jobs": roc_auc(score, anomalous), "isolation_forest": roc_auc(iso, anomalous),
                     "models": uris})
        print(f"draw {s}: {len(uris)} models trained and one encode, {len(ids)} rows scored "
              f"({int(anomalous.sum())} malignant): {CHOSEN_SCORE} from the jobs {runs[-1]['jobs']:.4f}, "
              f"isolation_forest {runs[-1]['isolation_forest']:.4f}", flush=True)
    keys = ("jobs", "isolation_forest")
    return {"protocol": "breast-cancer-jobs", "score": CHOSEN_SCORE, "epochs": epochs, "ensemble": cfg.ensemble,
            "val_fraction": cfg.val_fraction, "draws": runs,
            "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
            "sd": {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys},
            "vs_isolation_forest": paired(runs, "jobs", "isolation_forest"), "wall_s": time.perf_counter() - t0}


def jobs_summary(r: dict[str, Any]) -> str:
    v = r["vs_isolation_forest"]
    lines = [f"breast-cancer through the batch jobs ({r['ensemble']} × `train`, {r['epochs']} epochs, one "
             f"`encode --score-kind {r['score']}`): wall {r['wall_s']:.0f} s",
             "held-out ROC AUC | vaepipe jobs | isolation_forest"]
    lines += [f"draw {i} | {d['jobs']:.4f} | {d['isolation_forest']:.4f}" for i, d in enumerate(r["draws"])]
    lines.append(f"mean ± sd | {r['mean']['jobs']:.4f} ± {r['sd']['jobs']:.4f} | "
                 f"{r['mean']['isolation_forest']:.4f} ± {r['sd']['isolation_forest']:.4f}")
    lines.append(f"paired, jobs minus isolation_forest: wins {v['wins']} / losses {v['losses']} of {v['draws']} "
                 f"draws, mean {v['mean_diff']:+.4f} ± {v['sd_diff']:.4f} (sd)")
    return "\n".join(lines)
