"""Likelihood registry: name -> factory of a module that turns the decoder's raw output into
p(x|z), a distribution whose event is one whole image (C, H, W). Each likelihood states the support
it accepts and refuses data outside it."""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from .errors import InputError

IMAGE_DIMS = 3  # (C, H, W): the event of p(x|z)


class Likelihood(nn.Module):
    """Base: `forward(out)` gives p(x|z); `mean(out)` its mean (for pictures); `check(x)` the support."""

    name = "likelihood"
    support = "(-inf, inf)"
    params_per_pixel = 1  # decoder output channels per image channel

    def forward(self, out: Tensor) -> dist.Distribution:
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        return self(out).mean

    def in_support(self, x: Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def check(self, x: Tensor) -> None:
        """Raise InputError when data lies outside the support."""
        if not self.in_support(x):
            lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
            raise InputError(
                f"likelihood {self.name!r} needs pixel values in {self.support}, but the data ranges "
                f"over [{lo:g}, {hi:g}]; rescale the data or choose another --likelihood"
            )


class Bernoulli(Likelihood):
    """p(x|z) = prod_i lambda_i^x_i (1 - lambda_i)^(1 - x_i), lambda = sigmoid(logits). For binary
    data; on grey values in [0, 1] it is the common relaxation (not a normalized density)."""

    name = "bernoulli"
    support = "[0, 1]"

    def forward(self, out: Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=out, validate_args=False).to_event(IMAGE_DIMS)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def in_support(self, x: Tensor) -> bool:
        return bool(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


class Gaussian(Likelihood):
    """p(x|z) = N(x; decoder(z), sigma^2 I) with fixed sigma: log p = -||x - x_hat||^2 / (2 sigma^2)
    - (D/2) log(2 pi sigma^2) — squared error plus the constant, so values are true log densities."""

    name = "gaussian"

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        if not sigma > 0:
            raise InputError(f"--sigma must be positive, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, out: Tensor) -> dist.Distribution:
        return dist.Normal(out, self.sigma).to_event(IMAGE_DIMS)

    def mean(self, out: Tensor) -> Tensor:
        return out


LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    "bernoulli": lambda **_: Bernoulli(),
    "gaussian": lambda sigma=0.1, **_: Gaussian(sigma),
}


def make_likelihood(name: str, **options) -> Likelihood:
    """The likelihood `name`; factories take the options they need (e.g. `sigma`)."""
    if name not in LIKELIHOODS:
        raise InputError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](**options)
