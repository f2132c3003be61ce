"""Training a VAE with Ray Train: the `train` job (input checks, preprocessing fit, registration), the
per-worker loop (cached or streamed shards, checkpoints each epoch, the journal the driver logs to
MLflow), its typed options, the run store that keeps checkpoints, and fault injection for the
reliability tests. It imports pipeline.models, pipeline.table, pipeline.runtime and vae."""
