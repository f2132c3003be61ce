"""vae: the variational auto-encoder itself, in pure PyTorch (no Ray, MLflow or fsspec here)."""
from vae.config import VAEConfig
from vae.distributions import DiagonalGaussian
from vae.model import VAE
from vae.preprocess import Preprocessing

__all__ = ["VAE", "VAEConfig", "DiagonalGaussian", "Preprocessing"]
