"""The deterministic baseline of a quadrant-completing CVAE (Sohn et al. 2015; Pyro's examples/cvae):
a network from the given quadrants c to a prediction of the missing pixels, scored by the Bernoulli
likelihood of the missing pixels,

    log p(x_m | c) = sum_{i missing} [x_i log lambda_i + (1 - x_i) log(1 - lambda_i)],
    lambda = sigmoid(f(c)),

which is its conditional log-likelihood (there is no latent). As a Pyro program model(x, c) observes
the missing pixels of x and guide(x, c) samples nothing, so the ELBO is that log-likelihood and Pyro's
SVI with Trace_ELBO trains it; the CVAE (cvae.py) reads its prediction, frozen, as its prior's input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..errors import InputError
from ..nets import _mlp
from ..param_store import RegisteringModule
from .conditions import MISSING, Quadrants, parse_condition

IMAGE_DIMS = 3  # (C, H, W): one event per example


def missing_pixels_bernoulli(logits: Tensor, missing: Tensor) -> dist.Distribution:
    """prod over the pixels where `missing` (C, H, W) is True of Bernoulli(x_i; sigmoid(logits_i)), one
    event per image (the other pixels contribute log 1 = 0); unmasked where every pixel is missing. No
    support check: grey values in [0, 1] are scored by the usual relaxation."""
    pixels = dist.Bernoulli(logits=logits, validate_args=False)
    if not bool(missing.all()):
        pixels = pixels.mask(missing)
    return pixels.to_event(IMAGE_DIMS)


class BaselineNet(RegisteringModule):
    """lambda = sigmoid(MLP(c)): the missing pixels' probabilities given the quadrants c (missing pixels
    at MISSING). Its parameters reach Pyro's param store under "baseline$$$net...", registered by model()
    (param_store.py)."""

    param_prefix = "baseline"

    def __init__(self, x_shape: Sequence[int], condition: Quadrants, hidden: Sequence[int] = (400,)):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.condition = condition
        d = math.prod(self.x_shape)
        self.net = _mlp([d, *hidden, d])
        self.register_buffer("missing", condition.missing(self.x_shape))

    def logits(self, c: Tensor) -> Tensor:
        """The logits of every pixel, shaped like c (..., C, H, W)."""
        return self.net(c.flatten(-3)).unflatten(-1, self.x_shape)

    def predict(self, c: Tensor) -> Tensor:
        """c with its missing pixels replaced by their predicted probabilities (the baseline's single
        completion, and the CVAE's prior network's input)."""
        return torch.where(c == MISSING, torch.sigmoid(self.logits(c)), c)

    def log_likelihood(self, x: Tensor, c: Tensor) -> Tensor:
        """log p(x_m | c) per example, in nats: shape (N,)."""
        return missing_pixels_bernoulli(self.logits(c), self.missing).log_prob(x)

    def model(self, x: Tensor | None, c: Tensor) -> Tensor:
        """p(x_m | c): the missing pixels of x observed; with x=None one Bernoulli draw of them."""
        self.register_parts("net")
        with pyro.plate("data", c.shape[0]):
            return pyro.sample("x", missing_pixels_bernoulli(self.logits(c), self.missing), obs=x)

    def guide(self, x: Tensor | None, c: Tensor) -> None:
        """No latent: nothing to sample (the ELBO is log p(x_m | c) itself)."""


def build_baseline(x_shape: Sequence[int], condition: str | Quadrants,
                   hidden: Sequence[int] = (400,)) -> BaselineNet:
    """The baseline for `condition` ("quadrants:N" or a Quadrants); a class condition has no quadrants
    to predict (an InputError)."""
    if isinstance(condition, str):
        condition = parse_condition(condition, x_shape)
    if not isinstance(condition, Quadrants):
        raise InputError(f"the NN baseline predicts missing quadrants; --condition {condition.name} has "
                         "none to predict: use --condition quadrants:N")
    return BaselineNet(x_shape, condition, hidden)
