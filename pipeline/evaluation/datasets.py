"""Bundled and shared real data written to Parquet: scikit-learn's 8×8 digits (ships with the
package, for the demo) and 8,000 MNIST digits shipped in data/ (for tests and benchmarks)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table.features import fixed_size_list


def images_table(images: np.ndarray, labels: np.ndarray, start_id: int = 0) -> pa.Table:
    """`image` as fixed_size_list<uint8>[H·W], `label`, `id`."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1).astype(np.uint8))
    return pa.table({"id": pa.array(np.arange(start_id, start_id + len(flat), dtype=np.int64)),
                     "label": pa.array(labels.astype(np.int64)),
                     "image": fixed_size_list(flat, pa.uint8())})


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits, grey levels 0–16 rescaled to uint8 0–255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target


def mnist_path() -> str:
    """The 8,000 MNIST digits shipped in the package (pipeline/evaluation/data, with their source and
    licence note); $VAEPIPE_MNIST names another copy."""
    p = os.environ.get("VAEPIPE_MNIST") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                         "mnist_8k.npz")
    if not os.path.exists(p):
        raise FileNotFoundError(f"mnist_8k.npz not found at {p} (VAEPIPE_MNIST names the file)")
    return os.path.abspath(p)


def mnist() -> tuple[np.ndarray, np.ndarray]:
    with np.load(mnist_path()) as z:
        return z["images"], z["labels"]


def write_parquet(table: pa.Table, folder: str, files: int = 1) -> str:
    os.makedirs(folder, exist_ok=True)
    n = table.num_rows
    for i in range(files):
        lo, hi = i * n // files, (i + 1) * n // files
        pq.write_table(table.slice(lo, hi - lo), os.path.join(folder, f"part-{i:05d}.parquet"), compression="zstd")
    return folder


def write_mnist_split(folder: str, seed: int = 0, n_train: int = 6000) -> tuple[str, str]:
    """The shipped mnist_8k.npz → FOLDER/train (6,000) and FOLDER/test (the rest), seeded shuffle.
    python -c "from pipeline.evaluation.datasets import write_mnist_split as w; print(w('mnist_split'))"."""
    x, y = mnist()
    p = np.random.default_rng(seed).permutation(len(x))
    tr, te = p[:n_train], p[n_train:]
    a = write_parquet(images_table(x[tr], y[tr]), os.path.join(folder, "train"))
    b = write_parquet(images_table(x[te], y[te], start_id=n_train), os.path.join(folder, "test"))
    return a, b


def carve_validation(folder: str, out: str, n_val: int = 1000, seed: int = 1) -> tuple[str, str]:
    """An image split's training records (FOLDER, e.g. mnist_split/train: id, label, image) → OUT/train
    and OUT/val (n_val records), by a seeded permutation of the records in id order: the validation
    split settings are chosen on, so the held-out records are never read (docs/quality.md).
    python -c "from pipeline.evaluation.datasets import carve_validation as c; c('mnist_split/train', 'mnist_val')"."""
    import pyarrow.dataset as pads

    t = pads.dataset(folder, format="parquet").to_table(columns=["id", "label", "image"]).sort_by("id")
    x, y = np.stack(t.column("image").to_numpy(zero_copy_only=False)), t.column("label").to_numpy()
    p = np.random.default_rng(seed).permutation(len(y))
    tr, va = p[n_val:], p[:n_val]
    return (write_parquet(images_table(x[tr], y[tr]), os.path.join(out, "train")),
            write_parquet(images_table(x[va], y[va], start_id=len(tr)), os.path.join(out, "val")))


def keep_few_labels(folder: str, n: int, seed: int = 0, source: str = "label", column: str = "y") -> str:
    """Add `column` to every Parquet file of FOLDER: `source`'s value for a balanced seeded draw of n
    records (pipeline.evaluation.eval_metrics.balanced_indices, the draws `evaluate` uses), null for the rest:
    the input of `vaepipe train --labels y` with n labels.
    python -c "from pipeline.evaluation.datasets import keep_few_labels as k; k('mnist_split/train', 100)"."""
    import pyarrow.dataset as pads

    from pipeline.evaluation.eval_metrics import balanced_indices

    files = sorted(f.path for f in pads.dataset(folder, format="parquet").get_fragments())
    tables = [pq.read_table(f) for f in files]
    labels = np.concatenate([t.column(source).to_numpy() for t in tables])
    keep = np.zeros(len(labels), bool)
    keep[balanced_indices(labels, n, seed)] = True
    start = 0
    for path, t in zip(files, tables):
        k = keep[start:start + t.num_rows]
        col = pa.array(np.where(k, labels[start:start + t.num_rows], 0), t.schema.field(source).type, mask=~k)
        t = t.drop_columns([column]) if column in t.schema.names else t
        pq.write_table(t.append_column(column, col), path, compression="zstd")
        start += t.num_rows
    return folder


# --- the any-data panel's sets (pipeline.measure.panel): real data nothing in the project was tuned on

def digits_as_stored() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits as stored: grey levels 0–16, (N, 64) uint8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.uint8), d.target


def breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's breast-cancer table: 569 records of 30 scalar columns (float64), the target, the names."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data, d.target, [str(n) for n in d.feature_names]


def photo_patches(photo: str, size: int, n: int, seed: int = 0) -> np.ndarray:
    """n random size×size colour patches of one of scikit-learn's two bundled photos ('china.jpg' or
    'flower.jpg', 427×640×3), flattened channels first (C, H, W), uint8: (n, 3·size²)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    img = photos.images[[str(f).rsplit("/", 1)[-1] for f in photos.filenames].index(photo)]
    rng = np.random.default_rng(seed)
    r = rng.integers(0, img.shape[0] - size + 1, n)
    c = rng.integers(0, img.shape[1] - size + 1, n)
    patches = np.stack([img[i:i + size, j:j + size] for i, j in zip(r, c)])      # (n, H, W, C)
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2).reshape(n, -1))
