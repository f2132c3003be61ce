"""jobs: entry points shared by the `vaepipe` CLI and `ray job submit -- python -m jobs.X`."""
