"""Likelihood registry: name -> factory of a module that turns the decoder's raw output into
p(x|z), a distribution whose event is one whole image (C, H, W). Each likelihood states the support
it accepts and refuses data outside it. `register_likelihood` adds one of your own (its docstring
states the contract)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from torch import Tensor, nn
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

from ..data import RESCALE_HINT
from ..errors import InputError
from ..registry import Registry

IMAGE_DIMS = 3  # (C, H, W): the event of p(x|z)
SIGMA_MODES = ("shared", "pixel")  # how gaussian-learned and laplace-learned learn their scale
SCALE_FLOOR = 1e-3  # learned scale = softplus(raw) + SCALE_FLOOR
CB_WINDOW = 0.2  # |logit| below which the continuous Bernoulli uses its Taylor series


SCALE_LIMIT = 10.0  # a continuous likelihood warns when the data span more than this (0..255 pixels)


class Likelihood(nn.Module):
    """Base: `forward(out)` gives p(x|z); `mean(out)` its mean (for pictures); `check(x)` the support."""

    name = "likelihood"
    support = "(-inf, inf)"
    discrete = False  # a probability mass function (True) or a density (False)
    params_per_pixel = 1  # decoder output channels per image channel

    def forward(self, out: Tensor) -> dist.Distribution:
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        return self(out).mean

    def in_support(self, x: Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def check(self, x: Tensor) -> None:
        """Raise InputError when data lies outside the support; warn when a continuous likelihood gets
        data far wider than the [0, 1] scale its defaults (e.g. --sigma 0.1) are made for."""
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if not self.in_support(x):
            raise InputError(
                f"likelihood {self.name!r} needs pixel values in {self.support}, but the data ranges "
                f"over [{lo:g}, {hi:g}]; rescale the data ({RESCALE_HINT}) or choose another --likelihood"
            )
        if not self.discrete and hi - lo > SCALE_LIMIT:
            warnings.warn(f"pixel values range over [{lo:g}, {hi:g}], far wider than the [0, 1] scale the "
                          f"{self.name!r} likelihood is set for: its bound will be huge and the figures "
                          f"saturated; rescale the data ({RESCALE_HINT})", stacklevel=2)


class Bernoulli(Likelihood):
    """p(x|z) = prod_i lambda_i^x_i (1 - lambda_i)^(1 - x_i), lambda = sigmoid(logits). For binary
    data; on grey values in [0, 1] it is the common relaxation (not a normalized density)."""

    name = "bernoulli"
    support = "[0, 1]"
    discrete = True

    def forward(self, out: Tensor) -> dist.Distribution:
        return BernoulliImage(dist.Bernoulli(logits=out, validate_args=False), IMAGE_DIMS)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def in_support(self, x: Tensor) -> bool:
        return bool(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


class BernoulliImage(dist.Independent):
    """Independent(Bernoulli(logits), 3) with log p(x|z) = -sum_pixels BCE(logits, x): the sum is taken
    before the sign flips, so the per-pixel tensor is not negated (nor its gradient, in backward).
    Bit for bit the same values as Independent.log_prob; a faster pass over the image."""

    def log_prob(self, value: Tensor) -> Tensor:
        """No support check, as in the base Bernoulli here: grey values are the relaxation."""
        logits, value = broadcast_all(self.base_dist.logits, value)
        nll = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -sum_rightmost(nll, self.reinterpreted_batch_ndims)


class ContinuousBernoulliLogits(dist.ContinuousBernoulli):
    """torch's continuous Bernoulli, given logits eta (`logits=`), with its log density, mean and
    inverse CDF computed from eta itself. torch's versions go through clamped probabilities and
    lose accuracy once |eta| > ~16 in float32 (log C then stops growing like log |eta|), which
    decoders reach on pixels that are exactly 0 or 1."""

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(x) = x eta - softplus(eta) + log C(eta) = x log lambda + (1 - x) log(1 - lambda) + log C."""
        if self._validate_args:
            self._validate_sample(value)
        return value * self.logits - F.softplus(self.logits) + cb_log_normalizer(self.logits)

    @property
    def mean(self) -> Tensor:
        """E[x] = 1 / (1 - e^-eta) - 1 / eta (for eta >= 0; 1 - mean(-eta) below), and the series
        1/2 + eta/12 - eta^3/720 for |eta| < CB_WINDOW."""
        a = self.logits.abs()
        small = a < CB_WINDOW
        safe = torch.where(small, torch.full_like(a, CB_WINDOW), a)
        upper = -1 / torch.expm1(-safe) - 1 / safe  # the mean for logit +|eta|
        e = torch.where(small, self.logits, torch.zeros_like(a))
        return torch.where(small, 0.5 + e / 12 - e**3 / 720,
                           torch.where(self.logits >= 0, upper, 1 - upper))

    def icdf(self, value: Tensor) -> Tensor:
        """F^-1(u) = log1p(u expm1(eta)) / eta, evaluated as 1 - g(|eta|, 1 - u) for eta > 0 and
        g(|eta|, u) below, g(a, w) = log1p(w expm1(-a)) / -a (no overflow); g -> w as a -> 0."""
        a = self.logits.abs().clamp_min(1e-6)
        positive = self.logits > 0
        w = torch.where(positive, 1 - value, value)
        g = torch.log1p(w * torch.expm1(-a)) / -a
        return torch.where(positive, 1 - g, g)


def cb_log_normalizer(logits: Tensor) -> Tensor:
    """log C of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), lambda = sigmoid(eta):
    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = eta / tanh(eta / 2). Outside the window
    |eta| < CB_WINDOW (|lambda - 1/2| < ~0.05) it is log |eta| - log tanh(|eta| / 2); inside, the
    Taylor series log(u coth u) + log 2 = log 2 + u^2/3 - 7 u^4/90 + 62 u^6/2835 (u = eta / 2, next
    term below 1e-10 there), which is exact and smooth through lambda = 1/2 where the closed form is 0/0."""
    a = logits.abs()
    small = a < CB_WINDOW
    safe = torch.where(small, torch.full_like(a, CB_WINDOW), a)
    u2 = (torch.where(small, logits, torch.zeros_like(logits)) / 2) ** 2
    series = math.log(2.0) + u2 * (1 / 3 + u2 * (-7 / 90 + u2 * 62 / 2835))
    return torch.where(small, series, safe.log() - torch.tanh(safe / 2).log())


class ContinuousBernoulli(Likelihood):
    """p(x|z) = prod_i C(lambda_i) lambda_i^x_i (1 - lambda_i)^(1 - x_i) on [0, 1], lambda = sigmoid(logits):
    the Bernoulli made a normalized density on grey values (Loaiza-Ganem & Cunningham 2019). Its
    mean is not lambda; pictures show the mean."""

    name = "continuous-bernoulli"
    support = "[0, 1]"

    def forward(self, out: Tensor) -> dist.Distribution:
        return ContinuousBernoulliLogits(logits=out).to_event(IMAGE_DIMS)

    def in_support(self, x: Tensor) -> bool:
        return bool(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


class LocScale(Likelihood):
    """p(x|z) = family(x; loc = decoder(z), scale), one mechanism for the Gaussian and the Laplace.
    The scale is fixed (`sigma`), or learned (`learn`): 'shared', one scalar for every pixel, or
    'pixel', a second decoder channel per image channel. A learned scale is softplus(raw) +
    SCALE_FLOOR, so it cannot collapse to 0 and drive the log density to infinity; it starts near
    softplus(0) = 0.69."""

    family: Callable[..., dist.Distribution]  # dist.Normal or dist.Laplace, set by the subclass

    def __init__(self, sigma: float = 0.1, learn: str | None = None):
        super().__init__()
        self.learn = learn
        if learn is None:
            if not sigma > 0:
                raise InputError(f"--sigma must be positive, got {sigma}")
            self.sigma = float(sigma)
        elif learn not in SIGMA_MODES:
            raise InputError(f"unknown --sigma-mode {learn!r}: choose one of {', '.join(SIGMA_MODES)}")
        else:
            self.name = f"{self.name}-learned"
            if learn == "shared":
                self.raw_scale = nn.Parameter(torch.zeros(()))
            else:
                self.params_per_pixel = 2

    def loc_scale(self, out: Tensor) -> tuple[Tensor, Tensor | float]:
        """The location and scale of p(x|z) from the decoder output."""
        if self.learn is None:
            return out, self.sigma
        if self.learn == "shared":
            return out, F.softplus(self.raw_scale) + SCALE_FLOOR
        loc, raw = out.chunk(2, dim=-IMAGE_DIMS)
        return loc, F.softplus(raw) + SCALE_FLOOR

    def forward(self, out: Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(out)
        return self.family(loc, scale).to_event(IMAGE_DIMS)

    def mean(self, out: Tensor) -> Tensor:
        return self.loc_scale(out)[0]


class Gaussian(LocScale):
    """p(x|z) = N(x; decoder(z), sigma^2 I). With fixed sigma: log p = -||x - x_hat||^2 / (2 sigma^2)
    - (D/2) log(2 pi sigma^2) — squared error plus the constant, so values are true log densities."""

    name = "gaussian"
    family = dist.Normal


class Laplace(LocScale):
    """p(x|z) = prod_i exp(-|x_i - x_hat_i| / b) / (2 b): absolute error plus its constant; the scale
    b (`sigma`, or learned) is not the standard deviation, which is sqrt(2) b."""

    name = "laplace"
    family = dist.Laplace


LIKELIHOODS = Registry("likelihood", {
    "bernoulli": lambda **_: Bernoulli(),
    "continuous-bernoulli": lambda **_: ContinuousBernoulli(),
    "gaussian": lambda sigma=0.1, **_: Gaussian(sigma),
    "gaussian-learned": lambda sigma_mode="shared", **_: Gaussian(learn=sigma_mode),
    "laplace": lambda sigma=0.1, **_: Laplace(sigma),
    "laplace-learned": lambda sigma_mode="shared", **_: Laplace(learn=sigma_mode),
}, returns=Likelihood)


def register_likelihood(name: str, factory: Callable[..., Likelihood]) -> Callable[..., Likelihood]:
    """Make `factory` the likelihood `name` (for `--likelihood name`, `Config(likelihood=name)`).

    Contract: the factory is called with keyword arguments only, `factory(sigma=..., sigma_mode=...,
    **more)` (more options may be passed, so end the signature with `**options`), and returns a
    `Likelihood`: an nn.Module whose `forward(out)` turns the decoder's output (`params_per_pixel`
    channels per image channel) into p(x|z) with event shape (C, H, W), with `mean(out)` for pictures,
    `discrete` (True for a probability mass function: the data are then binarized by default) and
    `in_support(x)` for the data check. A name already taken is an InputError."""
    return LIKELIHOODS.register(name, factory)


def make_likelihood(name: str, **options) -> Likelihood:
    """The likelihood `name`; factories take the options they need (`sigma`, `sigma_mode`)."""
    return LIKELIHOODS.build(name, **options)
