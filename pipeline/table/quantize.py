"""The one int8 format for μ: symmetric and per latent dimension, with a float32 scale each,
scale_j = max|μ_j| / 127 over a reference sample (values beyond it clip to ±127). encode writes it
(the scales go to the file metadata as `vaepipe.int8_scale`), decode reads it back, and evaluate
measures exactly this format."""
from __future__ import annotations

import numpy as np

INT8_MAX = 127
PRECISIONS = {"fp32": 4, "fp16": 2, "int8": 1}
"""Storage precisions of μ and their bytes per value."""


def int8_scale(mu: np.ndarray) -> np.ndarray:
    """Per-dimension scale (D,) of a reference sample μ (N, D): max|μ_j| / 127 (at least 1e-6 / 127,
    so an all-zero dimension still has one)."""
    mu = np.asarray(mu, np.float32).reshape(-1, np.shape(mu)[-1])
    return (np.maximum(np.abs(mu).max(0), 1e-6) / INT8_MAX).astype(np.float32)


def quantize(mu: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """μ (N, D) → int8 codes: round(μ / scale), clipped to [-127, 127] (symmetric: 0 stays 0)."""
    return np.clip(np.rint(np.asarray(mu, np.float32) / scale), -INT8_MAX, INT8_MAX).astype(np.int8)


def error_sums(mu: np.ndarray, q: np.ndarray, scale: np.ndarray) -> dict[str, float]:
    """Sums that add up across slices and units into the error of int8 storage on the data itself:
    squared error, squared μ, values clipped at ±127, values."""
    mu = np.asarray(mu, np.float32)
    err = dequantize(q, scale) - mu
    return {"sq_err": float(np.square(err, dtype=np.float64).sum()), "sq_mu": float(np.square(mu, dtype=np.float64).sum()),
            "clipped": int((np.abs(mu) > INT8_MAX * np.asarray(scale, np.float32)).sum()), "values": int(mu.size)}


def error_report(sums: dict[str, float]) -> dict[str, float]:
    """RMS error of the stored μ, that error relative to μ's RMS, and the fraction of values clipped."""
    n = max(sums.get("values", 0), 1)
    rmse, rms = (sums.get("sq_err", 0.0) / n) ** 0.5, (sums.get("sq_mu", 0.0) / n) ** 0.5
    return {"rmse": rmse, "relative_rmse": rmse / rms if rms > 0 else 0.0,
            "clipped_fraction": sums.get("clipped", 0) / n, "values": int(sums.get("values", 0))}


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes → float32 μ."""
    return q.astype(np.float32) * np.asarray(scale, np.float32)


def stored(mu: np.ndarray, precision: str, ref: np.ndarray | None = None) -> np.ndarray:
    """μ as it reads back after storage at fp32 / fp16 / int8, as float32. int8 takes its scale
    from `ref` (default μ itself), as encode takes it from the data it first sees."""
    if precision == "fp32":
        return np.asarray(mu, np.float32)
    if precision == "fp16":
        return np.asarray(mu).astype(np.float16).astype(np.float32)
    if precision != "int8":
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    scale = int8_scale(mu if ref is None else ref)
    return dequantize(quantize(mu, scale), scale)


def bytes_per_record(dims: int, precision: str) -> int:
    return dims * PRECISIONS[precision]
