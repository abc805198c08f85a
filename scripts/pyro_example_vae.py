"""The benchmark's second reference: Pyro's own VAE example (pyro-ppl/pyro examples/vae/vae.py),
retyped: a 784-400-50 MLP with softplus hidden units, q(z|x) = N(mu(x), exp(s(x))^2), p(z) = N(0, I),
p(x|z) = Bernoulli(probs), sites "latent" and "obs", networks registered with pyro.module, trained
the way the example trains it: pyro.infer.SVI with Trace_ELBO (or JitTrace_ELBO) and pyro.optim.Adam,
one svi.step(x) per batch (which returns the loss as a Python float).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.optim import Adam
from torch import Tensor, nn
from torch.nn import functional as F

FUDGE = 1e-7  # the example keeps the Bernoulli probabilities inside (0, 1) by this much


class Encoder(nn.Module):
    """x -> (mu, sigma) through one softplus hidden layer; sigma = exp(raw)."""

    def __init__(self, d: int, z_dim: int, hidden: int):
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, hidden)
        self.fc21, self.fc22 = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.softplus(self.fc1(x.reshape(-1, self.d)))
        return self.fc21(h), torch.exp(self.fc22(h))


class Decoder(nn.Module):
    """z -> Bernoulli probabilities through one softplus hidden layer, squeezed away from 0 and 1."""

    def __init__(self, d: int, z_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, d)

    def forward(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(self.fc21(F.softplus(self.fc1(z)))) + FUDGE) * (1 - 2 * FUDGE)


class ExampleVAE(nn.Module):
    """Pyro's example model/guide pair; `name` prefixes the param-store names so that several copies
    can live in one process."""

    def __init__(self, x_shape: Sequence[int], hidden: int = 400, z_dim: int = 50, name: str = ""):
        super().__init__()
        self.d, self.z_dim, self.name = math.prod(x_shape), z_dim, name
        self.encoder = Encoder(self.d, z_dim, hidden)
        self.decoder = Decoder(self.d, z_dim, hidden)

    def model(self, x: Tensor) -> None:
        pyro.module(self.name + "decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decoder(z)).to_event(1), obs=x.reshape(-1, self.d))

    def guide(self, x: Tensor) -> None:
        pyro.module(self.name + "encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def make_example_step(vae: ExampleVAE, jit: bool = False, lr: float = 1e-3) -> Callable[[Tensor], float]:
    """The example's training step: svi.step(x), -ELBO summed over the batch, as a Python float."""
    loss = JitTrace_ELBO() if jit else Trace_ELBO()
    return SVI(vae.model, vae.guide, Adam({"lr": lr}), loss=loss).step
