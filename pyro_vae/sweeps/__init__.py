"""Sweeps: `pyro-vae grid`, every combination of settings trained, evaluated and reported, in local worker
processes or as Ray Tune trials."""
