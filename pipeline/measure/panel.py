"""`vaepipe protocol --what any-data`: the default recipe on real data sets nothing was tuned on.

For each set the recipe (vae.recipe: scaling, likelihood, architecture and training length chosen
from the data, as `vaepipe train` chooses them with only --features, --latent-dim and --image-shape
given) trains on the training part; the held-out part is only encoded and decoded. Printed per set:
the round-trip MSE of decode(μ) against PCA's at the same latent dimension, in the data's own units
(pixels for images, scalar columns standardised by the training part), active units, 5-NN accuracy of
μ against PCA's scores where labels exist, the error of an M2 head on the frozen q(z|x) with a few
labels (what `train --labels` adds) against label spreading on the raw features with the same labels,
and the wall time. It runs in this process without Ray (the same vae.train_step loop the Ray workers
call), so the whole panel fits in minutes on 2 cores."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.evaluation import datasets
from pipeline.evaluation.eval_metrics import spreading_error
from pipeline.evaluation.probes import m2_error, posterior
from pipeline.measure.protocols import fit_vae
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.recipe import PSEUDO_LABELS, auto_epochs, model_config, ppca_start
from vae.train_step import active_units

BATCH_SIZE = 128        # `vaepipe train`'s default --batch-size
VAL_FRACTION = 0.1      # `vaepipe train`'s default --val-fraction
HEAD_EPOCHS = 800       # `vaepipe train`'s default --head-epochs
WEIGHT_DECAY = 0.0      # `vaepipe train`'s default --weight-decay


@dataclass
class PanelSet:
    name: str
    x_train: np.ndarray            # (N, D) raw records the recipe trains on
    x_test: np.ndarray             # (M, D) held out: only encoded and decoded
    y_train: np.ndarray | None     # labels, where the data has them
    y_test: np.ndarray | None
    latent_dim: int
    layout: str = "list"           # 'list' (one vector column) or 'scalars' (one column per feature)
    image_shape: tuple[int, ...] = ()
    labels: int = 0                # label count for the `train --labels` comparison (0: none)
    label_draws: int = 10          # balanced label draws the comparison averages over (see panel_sets)


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int):
    p = np.random.default_rng(seed).permutation(len(x))
    return x[p[n_test:]], x[p[:n_test]], y[p[n_test:]], y[p[:n_test]]


def panel_sets(names: tuple[str, ...], seed: int = 0) -> list[PanelSet]:
    """The panel's data, by name (PANEL): each split once, by a seeded permutation (photos: one trains,
    the other is held out). The labelled comparison averages 10 label draws on the small sets: one draw
    of 20 or 50 labels moves an error by points, and the head's paired difference to raw spreading on
    the digits has a spread of 2.3 points over 20 draws, so 5 draws (+1.6 points) and 20 (−0.2) told
    different stories; 10 keep the panel under 20 minutes on 2 cores. MNIST takes one draw: its head
    costs about 4 minutes a draw, and over 5 draws its gap to raw spreading (−10.9 points) was seven
    times the draws' spread (1.5)."""
    out = []
    for name in names:
        if name == "mnist":
            x, y = datasets.mnist()
            xtr, xte, ytr, yte = _split(x.reshape(len(x), -1), y, 2000, seed)
            out.append(PanelSet(name, xtr, xte, ytr, yte, 16, image_shape=(1, 28, 28), labels=100,
                                label_draws=1))
        elif name in ("digits-0-16", "digits-0-255"):
            x, y = datasets.digits_as_stored()
            if name == "digits-0-255":
                x = np.round(x * (255 / 16)).astype(np.uint8)
            out.append(PanelSet(name, *_split(x, y, 500, seed), 8, image_shape=(1, 8, 8), labels=50))
        elif name == "breast-cancer":
            x, y, _ = datasets.breast_cancer()
            out.append(PanelSet(name, *_split(x, y, 169, seed), 4, layout="scalars", labels=20))
        elif name.startswith("patches"):                       # e.g. patches16-china: train on china.jpg
            size, photo = int(name[7:9]), name.split("-")[1]
            other = "flower" if photo == "china" else "china"
            xtr = datasets.photo_patches(f"{photo}.jpg", size, 4000, seed)
            xte = datasets.photo_patches(f"{other}.jpg", size, 1000, seed + 1)
            out.append(PanelSet(name, xtr, xte, None, None, 16, image_shape=(3, size, size)))
        else:
            raise ValueError(f"unknown panel set {name!r}; known: {PANEL}")
    return out


PANEL = ("mnist", "digits-0-16", "digits-0-255", "breast-cancer", "patches16-china", "patches16-flower",
         "patches32-china", "patches32-flower")


def train_default(s: PanelSet, seed: int, epochs: int = 0, beta: float = 1.0, weight_decay: float = WEIGHT_DECAY,
                  nets: dict | None = None, **overrides: Any) -> tuple[VAE, int]:
    """The default recipe on s.x_train: (trained model, epochs). `beta` and `overrides` (passed to
    vae.recipe.model_config: likelihood_choice, hidden, arch, linear_path) are for sweeps and ablations;
    `nets` (a dict) receives the figures of the nets' check (vae.recipe.keep_nets)."""
    pre = Preprocessing.fit(s.x_train, ["x"] if s.layout == "list" else [f"c{i}" for i in range(s.x_train.shape[1])],
                            s.layout, "auto")
    in_unit = bool(s.x_train.min() >= 0 and s.x_train.max() <= 1)
    cfg = model_config(pre, s.x_train.shape[1], s.layout, s.latent_dim, image_shape=s.image_shape,
                       sample_in_unit=in_unit, **overrides)
    epochs = epochs or auto_epochs(int(len(s.x_train) * (1 - VAL_FRACTION)), BATCH_SIZE)
    torch.manual_seed(seed)
    model = VAE(cfg)
    sample = s.x_train[:10_000].astype(np.float32)                        # train's --sample-rows
    p = ppca_start(model, sample, seed)
    if p is not None:
        model.start_at(p)
    model = fit_vae(model, s.x_train.astype(np.float32), epochs, BATCH_SIZE, seed=seed, val_fraction=VAL_FRACTION,
                    beta=beta, weight_decay=weight_decay, start=p, nets=nets)
    model.fit_round_trip(torch.from_numpy(sample))                         # as train does before registering
    return model, epochs


def _units(s: PanelSet):
    """The data's own units: pixels as they are; scalar columns standardised by the training part."""
    if s.layout == "list":
        return lambda x: np.asarray(x, np.float64)
    mean, sd = s.x_train.mean(0), s.x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return lambda x: (np.asarray(x, np.float64) - mean) / sd


def measure(s: PanelSet, model: VAE, seed: int, label_draws: int = 0) -> dict[str, Any]:
    """Round trip, active units and neighbours of one trained model against PCA on s."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    units = _units(s)
    mu_tr, lv_tr = posterior(model, s.x_train.astype(np.float32))
    mu_te, _ = posterior(model, s.x_test.astype(np.float32))
    emb_tr, emb_te = (model.embedding(torch.from_numpy(m)).numpy() for m in (mu_tr, mu_te))   # encode --embedding
    recon = model.reconstruct(torch.from_numpy(mu_te)).numpy()            # reconstruct: no_grad
    mse = float(np.mean((units(recon) - units(s.x_test)) ** 2))
    pca = PCA(s.latent_dim, random_state=seed).fit(units(s.x_train))
    p_tr, p_te = pca.transform(units(s.x_train)), pca.transform(units(s.x_test))
    pca_mse = float(np.mean((pca.inverse_transform(p_te) - units(s.x_test)) ** 2))
    kl = 0.5 * (mu_tr ** 2 + np.exp(lv_tr) - 1 - lv_tr)                       # (N, L) nats
    out: dict[str, Any] = {"set": s.name, "train": len(s.x_train), "test": len(s.x_test),
                           "features": s.x_train.shape[1], "latent_dim": s.latent_dim,
                           "arch": model.config.arch, "likelihood": model.config.likelihood,
                           "scaling": model.config.preprocessing.scaling,
                           "mse": mse, "pca_mse": pca_mse, "mse_vs_pca": mse / pca_mse,
                           "active_units": active_units(torch.from_numpy(kl.mean(0))),
                           "kl_nats": float(kl.sum(1).mean())}
    if s.y_train is not None:
        def knn(a, b):
            return float(KNeighborsClassifier(5).fit(a, s.y_train).score(b, s.y_test))
        out["knn5_mu"], out["knn5_emb"], out["knn5_pca"] = knn(mu_tr, mu_te), knn(emb_tr, emb_te), knn(p_tr, p_te)
    if s.labels:
        out.update(labelled(s, mu_tr, lv_tr, mu_te, seed, label_draws or s.label_draws, emb_tr, emb_te))
    return out


def labelled(s: PanelSet, mu_tr: np.ndarray, lv_tr: np.ndarray, mu_te: np.ndarray, seed: int,
             draws: int, emb_tr: np.ndarray | None = None, emb_te: np.ndarray | None = None) -> dict[str, Any]:
    """The few-label comparison over `draws` balanced label draws (seeds seed, seed + 1, …; one draw
    of 20 labels moves the error by points): per draw the M2 head, label spreading over μ, over the
    embedding (μ in the model's latent metric; μ again when none is given), over the raw features and over PCA's scores at the same latent dimension (what the compression alone
    costs the labels), all on the same labels; the means, standard deviations, and the paired difference
    M2 − raw spreading (negative: the head is better). The draws run in as many one-thread processes
    as torch has threads: a head's 800 epochs of small batches take about as long on 1 thread as on
    2 (50 s on the digits), so two at once halve the wait; each draw's figures do not depend on it."""
    from sklearn.decomposition import PCA

    units = _units(s)
    pca = PCA(s.latent_dim, random_state=seed).fit(units(s.x_train))
    emb_tr, emb_te = (mu_tr, mu_te) if emb_tr is None else (emb_tr, emb_te)
    jobs = [(mu_tr, lv_tr, s.y_train, mu_te, s.y_test, s.labels, seed + d, units(s.x_train), units(s.x_test),
             pca.transform(units(s.x_train)), pca.transform(units(s.x_test)), emb_tr, emb_te) for d in range(draws)]
    workers = min(draws, torch.get_num_threads())
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork, as DataLoader's workers: spawn would re-run a calling script that has no __main__ guard
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as ex:
            results = list(ex.map(_one_draw, jobs))
    else:
        results = [_one_draw(j) for j in jobs]
    per = dict(zip(("m2_error", "spreading_error_mu", "spreading_error_raw", "spreading_error_pca", "spreading_error_emb"),
                   map(list, zip(*results))))
    out: dict[str, Any] = {"labels": s.labels, "label_draws": draws}
    for k, v in per.items():
        out[k], out[f"{k}_sd"], out[f"{k}_draws"] = float(np.mean(v)), _sd(v), v
    diff = np.subtract(per["m2_error"], per["spreading_error_raw"])
    out["m2_minus_raw"], out["m2_minus_raw_sd"] = float(diff.mean()), _sd(diff)
    out["m2_minus_raw_se"] = out["m2_minus_raw_sd"] / np.sqrt(len(diff))   # the mean's standard error
    return out


def _one_draw(job: tuple) -> tuple[float, float, float, float, float]:
    """One label draw's (M2 head, spreading over μ, spreading on the raw features, spreading on PCA's
    scores at the latent dimension, spreading over the embedding) errors."""
    mu_tr, lv_tr, ytr, mu_te, yte, n_labels, seed, raw_tr, raw_te, pca_tr, pca_te, emb_tr, emb_te = job
    return (m2_error(mu_tr, lv_tr, ytr, mu_te, yte, n_labels, seed, HEAD_EPOCHS, PSEUDO_LABELS),
            spreading_mu_error(mu_tr, ytr, mu_te, yte, n_labels, seed),
            spreading_error(raw_tr, ytr, raw_te, yte, n_labels, seed),
            spreading_error(pca_tr, ytr, pca_te, yte, n_labels, seed),
            spreading_mu_error(emb_tr, ytr, emb_te, yte, n_labels, seed))


def _sd(v) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def spreading_mu_error(mu_tr: np.ndarray, ytr: np.ndarray, mu_te: np.ndarray, yte: np.ndarray, n_labels: int,
                       seed: int) -> float:
    """Error of label spreading over the training records' μ (vae.spreading, the same balanced label
    draw as the other probes), carried to the test records by their 10 nearest training μ: the
    candidate predictor for `train --labels` beside the M2 head."""
    from pipeline.evaluation.eval_metrics import balanced_indices
    from vae.spreading import induce, spread

    classes = np.unique(ytr)
    idx = balanced_indices(ytr, n_labels, seed)
    y = torch.full((len(ytr),), -1, dtype=torch.long)
    y[idx] = torch.from_numpy(np.searchsorted(classes, ytr[idx]))
    mu = torch.from_numpy(np.ascontiguousarray(mu_tr, np.float32))
    dist = spread(mu, y, len(classes))
    pred = classes[induce(mu, dist, torch.from_numpy(np.ascontiguousarray(mu_te, np.float32))).argmax(1).numpy()]
    return float((pred != yte).mean())


def row(r: dict[str, Any]) -> str:
    line = (f"{r['set']:<17} β {r['beta']:<4g} {r['arch']:<4} {r['epochs']:>3} ep  MSE {r['mse']:10.4g} = "
            f"{r['mse_vs_pca']:.3f}× PCA  KL {r['kl_nats']:.1f} nats  active {r['active_units']}/{r['latent_dim']}")
    if "nets_kept" in r:
        line += f"  nets {'kept' if r['nets_kept'] else 'dropped'} (val gain {r['nets_gain']:.1%}, lower {r['nets_gain_lower']:.1%})"
    if "knn5_mu" in r:
        line += f"  5-NN μ {r['knn5_mu']:.3f} embedding {r['knn5_emb']:.3f} PCA {r['knn5_pca']:.3f}"
    if "m2_error" in r:
        line += (f"  {r['labels']} labels × {r['label_draws']} draws: M2 {r['m2_error']:.1%} spreading on μ "
                 f"{r['spreading_error_mu']:.1%} on the embedding {r['spreading_error_emb']:.1%} on raw {r['spreading_error_raw']:.1%} on PCA "
                 f"{r['spreading_error_pca']:.1%} (M2 − raw "
                 f"{r['m2_minus_raw']:+.1%} ± {r['m2_minus_raw_sd']:.1%} sd, {r['m2_minus_raw_se']:.1%} se)")
    return line + f"  {r['wall_s']:.0f} s"


def any_data(names: tuple[str, ...] = PANEL, seed: int = 0, epochs: int = 0, betas: tuple[float, ...] = (1.0,),
             label_draws: int = 0, **overrides: Any) -> dict[str, Any]:
    """The panel: one row per set (see the module docstring) and β (the default recipe's is 1; more
    give the rate-distortion frontier: round-trip MSE against the KL in nats), printed as it finishes.
    `label_draws` > 0 replaces each set's own count of label draws."""
    t0, rows = time.perf_counter(), []
    for s in panel_sets(names, seed):
        for beta in betas:
            t = time.perf_counter()
            nets: dict[str, Any] = {}
            model, ep = train_default(s, seed, epochs, beta, nets=nets, **overrides)
            r = {**measure(s, model, seed, label_draws), "epochs": ep, "beta": beta}
            if nets:
                r.update(nets_kept=bool(nets["nets_kept"]), nets_gain=nets["nets_gain"], nets_gain_lower=nets["nets_gain_lower"])
            r["wall_s"] = time.perf_counter() - t
            rows.append(r)
            print(row(r), flush=True)
    return {"protocol": "any-data", "seed": seed, "sets": rows, "wall_s": time.perf_counter() - t0}


def summary(r: dict[str, Any]) -> str:
    """The panel as a table (what `vaepipe protocol --what any-data` prints at the end)."""
    lines = [f"any-data panel (default recipe, seed {r['seed']}): wall {r['wall_s']:.0f} s",
             "set | β | arch | epochs | MSE / PCA | nets (val gain over the linear part, lower bound) | KL nats | active | 5-NN μ / embedding / PCA | labels × draws: M2 / spreading on "
             "μ / on the embedding / on raw / on PCA, means (paired M2 − raw ± sd, the mean's standard error) | wall s"]
    for x in r["sets"]:
        knn = f"{x['knn5_mu']:.3f} / {x['knn5_emb']:.3f} / {x['knn5_pca']:.3f}" if "knn5_mu" in x else "–"
        lab = (f"{x['labels']} × {x['label_draws']}: {x['m2_error']:.1%} / {x['spreading_error_mu']:.1%} / "
               f"{x['spreading_error_emb']:.1%} / "
               f"{x['spreading_error_raw']:.1%} / {x['spreading_error_pca']:.1%} (M2 − raw {x['m2_minus_raw']:+.1%} ± {x['m2_minus_raw_sd']:.1%} sd, {x['m2_minus_raw_se']:.1%} se)"
               if "m2_error" in x else "–")
        nets = (f"{'kept' if x['nets_kept'] else 'dropped'} ({x['nets_gain']:.1%}, {x['nets_gain_lower']:.1%})"
                if "nets_kept" in x else "–")
        lines.append(f"{x['set']} | {x['beta']:g} | {x['arch']} | {x['epochs']} | {x['mse_vs_pca']:.3f} | {nets} | "
                     f"{x['kl_nats']:.1f} | {x['active_units']}/"
                     f"{x['latent_dim']} | {knn} | {lab} | {x['wall_s']:.0f}")
    return "\n".join(lines)
