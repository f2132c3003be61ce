"""Batch jobs over Parquet: `encode` (μ, and optional logvar, score, prediction, committed with ids and
the model version), `decode` (the compression round trip), `nightly` (incremental and idempotent,
under the output's lease) and `neighbours` (everyone's k nearest, exact or through an ANN index). It
imports pipeline.search, pipeline.models, pipeline.table, pipeline.runtime and vae."""
