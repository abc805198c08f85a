"""The VAE and the autoencoder baseline now live in pyro_vae.models.vae (their kinds: models/vae.py,
models/autoencoder.py); this module keeps the old import path working."""

from .models.vae import MODELS, VAE, AutoEncoder, FlatLatent, GaussianOutputs, build_vae

__all__ = ["MODELS", "VAE", "AutoEncoder", "FlatLatent", "GaussianOutputs", "build_vae"]
