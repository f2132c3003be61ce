"""Search over committed latents: the `query` engine (exact k-NN by Euclidean distance on μ, with
filters, the same distances DuckDB computes), its block search kernels, and the local Arrow cache of
latents tables. It imports pipeline.table and pipeline.runtime only (no torch, Ray or MLflow, so a
query is a short process)."""
