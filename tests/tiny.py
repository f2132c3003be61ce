"""Tiny training recipes shared by tests and their session fixtures (tests/conftest.py)."""

TINY_TRAIN = dict(features=["image"], latent_dim=2, hidden=[8, 16], batch_size=256, epochs=4, seed=3,
                  promote="never", workers=1)
"""The fault tests' recipe: a faulty or stopped run of it is compared with the `clean_tiny_run` fixture."""
