"""The model registry: logging a trained VAE to MLflow (weights, config, signature, lineage), registering
a version, moving the `production` alias only when the new version is better, loading a model by URI,
the pyfunc MLflow serves, and the figures logged with each model (samples, reconstructions, μ in 2-D). It imports pipeline.table, pipeline.runtime and vae."""
