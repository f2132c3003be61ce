"""pipeline: Ray, MLflow and Parquet I/O around the pure-PyTorch `vae` package."""
