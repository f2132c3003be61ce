"""The table layer: where data lives (fsspec locations: local, memory://, S3), Parquet reading and
writing, the commit protocol (staging, manifest, _SUCCESS) and the output lease, feature columns and
their layout, int8/float16 quantisation of latents, and label columns. It imports pipeline.runtime and
vae's record hashing only; jobs, training and query build on it."""
