"""pipeline: Ray, MLflow and Parquet I/O around the pure-PyTorch `vae` package, one subpackage per concern.

From the ground up (each may import only those listed before it, and `vae`):
runtime (configs, errors, Ray) → table (locations, Parquet, commits, leases, features) → models (MLflow
registry) and search (query over latents) → training (Ray Train) and batch (encode, decode, nightly,
neighbours) → evaluation (quality, bundled data) → measure (benchmarks, protocols) and demo."""
