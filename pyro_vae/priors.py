"""Prior registry: name -> factory of a module whose call returns p(z), a distribution with
event shape (z_dim,). Adding a prior is one entry here plus its tests."""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import nn

from .errors import InputError


class StandardNormal(nn.Module):
    """p(z) = N(0, I). Its mean and scale are buffers, so the prior moves with the model's device."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


PRIORS: dict[str, Callable[..., nn.Module]] = {
    "normal": lambda z_dim, **_: StandardNormal(z_dim),
}


def make_prior(name: str, z_dim: int, **options) -> nn.Module:
    """The prior `name` for a `z_dim`-dimensional latent; factories take the options they need."""
    if name not in PRIORS:
        raise InputError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)}")
    return PRIORS[name](z_dim=z_dim, **options)
