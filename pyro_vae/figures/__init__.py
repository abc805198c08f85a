"""Figures: samples, reconstructions, traversals, latent maps, training curves, and a conditional VAE's
completions, drawn for a model kind or any model/guide pair."""
