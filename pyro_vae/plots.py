"""Moved to pyro_vae.figures.plots: this old path warns (DeprecationWarning) and forwards."""
from ._moved import forward

__getattr__, __dir__ = forward(__name__, "pyro_vae.figures.plots")
