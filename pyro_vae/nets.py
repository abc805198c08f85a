"""Moved to pyro_vae.models.nets: this old path warns (DeprecationWarning) and forwards."""
from ._moved import forward

__getattr__, __dir__ = forward(__name__, "pyro_vae.models.nets")
