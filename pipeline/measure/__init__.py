"""Benchmarks (`vaepipe bench`) and quality protocols (`vaepipe protocol`): figures against a plain
PyTorch loop, DuckDB or published baselines. Nothing on the runtime path imports it; it may import
every other subpackage."""
