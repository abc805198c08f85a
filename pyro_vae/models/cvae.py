"""The conditional VAE of Sohn et al. (2015) as one Pyro program that takes the condition c as an input:

    model(x, c):  z ~ p(z | c) = N(mu_p(c), diag sigma_p(c)^2),  x ~ p(x | z, c) = Bernoulli(sigmoid(g(z, c)))
    guide(x, c):  z ~ q(z | x, c) = N(mu_q(x, c), diag sigma_q(x, c)^2)

The ELBO is a bound on the conditional log-likelihood,
log p(x | c) >= E_q[log p(x | z, c)] - KL(q(z | x, c) || p(z | c)), the KL in closed form between the two
diagonal Gaussians under TraceMeanField_ELBO (`--estimator analytic`).

The condition (conditions.py) is `quadrants:N` (c: the image with its missing pixels at -1; the
likelihood scores the missing pixels only, so the bound is on log p(x_m | x_given)) or `class` (c: the
one-hot label; the likelihood scores the whole image). The networks read c as a vector h(c): for
quadrants, with a baseline (nn_baseline.py), the image with its gaps filled by the baseline's
prediction, as in Sohn et al. and Pyro's examples/cvae (the baseline is frozen: trained first, its
parameters never registered here); without one, c itself; for a class, the one-hot label.

Sites: latent "z", observation "x", in the data plate "data" (dim -1): every estimator of the registry
(mc, analytic, iwae, stl, iwae-dreg) trains it, passing (x, c) through to model and guide. model()
registers the prior network and decoder, guide() the recognition network, in Pyro's param store under
"cvae$$$<name>" (param_store.py), so Pyro's own SVI trains it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..errors import InputError
from ..nets import _gaussian_params, _mlp
from ..param_store import RegisteringModule
from .conditions import Condition, Quadrants, parse_condition
from .nn_baseline import BaselineNet, missing_pixels_bernoulli


class CVAE(RegisteringModule):
    """p(z | c) p(x | z, c) and q(z | x, c), each network an MLP over [its inputs, h(c)] (see the
    module's docstring). `baseline`: a trained BaselineNet whose prediction fills the missing quadrants
    in h(c) (frozen: its parameters stop requiring gradients)."""

    is_autoencoder = False
    is_classifier = False
    param_prefix = "cvae"

    def __init__(self, x_shape: Sequence[int], condition: Condition, hidden: Sequence[int] = (400,),
                 z_dim: int = 20, baseline: BaselineNet | None = None):
        super().__init__()
        if baseline is not None and not isinstance(condition, Quadrants):
            raise InputError(f"a baseline fills missing quadrants; --condition {condition.name} has none: "
                             "build the CVAE without one, or use --condition quadrants:N")
        self.x_shape, self.condition, self.z_dim = tuple(x_shape), condition, z_dim
        d, f = math.prod(self.x_shape), condition.features(self.x_shape)
        self.recognition = _mlp([d + f, *hidden, 2 * z_dim])
        self.prior_net = _mlp([f, *hidden, 2 * z_dim])
        self.decoder = _mlp([z_dim + f, *reversed(hidden), d])
        self.baseline = None if baseline is None else baseline.requires_grad_(False)
        self.register_buffer("missing", condition.missing(self.x_shape))

    def features(self, c: Tensor) -> Tensor:
        """h(c), (N, F): the condition as the networks read it (the baseline's filled image, if any)."""
        if self.baseline is not None:
            with torch.no_grad():
                c = self.baseline.predict(c)
        return c.flatten(1)

    def prior(self, h: Tensor) -> dist.Distribution:
        """p(z | c) = N(mu_p(h), diag sigma_p(h)^2)."""
        return dist.Normal(*_gaussian_params(self.prior_net(h))).to_event(1)

    def likelihood(self, z: Tensor, h: Tensor) -> dist.Distribution:
        """p(x | z, c): Bernoulli over the predicted pixels (all of them for a class condition)."""
        joined = torch.cat([z, h.expand(*z.shape[:-1], h.shape[-1])], dim=-1)
        return missing_pixels_bernoulli(self.decoder(joined).unflatten(-1, self.x_shape), self.missing)

    def posterior(self, x: Tensor, c: Tensor) -> dist.Distribution:
        """q(z | x, c) = N(mu_q(x, h), diag sigma_q(x, h)^2), without running Pyro."""
        return dist.Normal(*_gaussian_params(self.recognition(torch.cat([x.flatten(1), self.features(c)],
                                                                        dim=-1)))).to_event(1)

    def model(self, x: Tensor | None, c: Tensor) -> Tensor:
        """p(z | c) p(x | z, c) for a batch of conditions c; x=None draws x."""
        self.register_parts("prior_net", "decoder")
        h = self.features(c)
        with pyro.plate("data", h.shape[0]):
            z = pyro.sample("z", self.prior(h))
            return pyro.sample("x", self.likelihood(z, h), obs=x)

    def guide(self, x: Tensor, c: Tensor) -> Tensor:
        """q(z | x, c), reparameterized."""
        self.register_parts("recognition")
        with pyro.plate("data", c.shape[0]):
            return pyro.sample("z", self.posterior(x, c))

    @torch.no_grad()
    def complete(self, c: Tensor) -> Tensor:
        """One sampled completion per condition: z ~ p(z | c), the mean of p(x | z, c) at the predicted
        pixels and c's given pixels elsewhere (for a class condition, the mean image), (N, C, H, W)."""
        h = self.features(c)
        mean = self.likelihood(self.prior(h).sample(), h).mean
        return torch.where(self.missing, mean, c) if isinstance(self.condition, Quadrants) else mean


def build_cvae(x_shape: Sequence[int], condition: str | Condition, hidden: Sequence[int] = (400,),
               z_dim: int = 20, n_classes: int | None = None,
               baseline: BaselineNet | None = None) -> CVAE:
    """A CVAE for examples of shape x_shape under `condition` ("quadrants:N", "class" with n_classes, or
    a Condition), its quadrants filled by `baseline`'s prediction where one is given."""
    if isinstance(condition, str):
        condition = parse_condition(condition, x_shape, n_classes)
    return CVAE(x_shape, condition, hidden, z_dim, baseline)
