"""pipeline: Ray, MLflow and Parquet I/O around the pure-PyTorch `vae` package, one subpackage per concern.

From the ground up (each may import only those listed before it, and `vae`):
runtime (configs, errors, Ray) → table (locations, Parquet, commits, leases, features) → models (MLflow
registry) and search (query and index over latents) → training (Ray Train), batch (encode, decode,
nightly, neighbours) and serving (neighbours over HTTP) → evaluation (quality, bundled data) → measure (benchmarks, protocols) and demo."""
