"""ELBO estimator registry (name -> pyro.infer.ELBO) and per-example importance weights.

`mc` is Trace_ELBO: the KL term is estimated by Monte Carlo, log q(z|x) - log p(z) at the sampled z.
`analytic` is TraceMeanField_ELBO: where torch knows KL(q || p) in closed form it is used instead
(for a diagonal Gaussian q and N(0, I) prior: 1/2 sum(sigma^2 + mu^2 - 1 - log sigma^2)); both are
unbiased for the same ELBO and differ only in variance. Both are Pyro's classes with a
differentiable_loss that does not wait for the device (elbo.py).
`iwae` is the importance-weighted bound log (1/K) sum_k w_k per example, `stl` the ELBO with the
score term dropped, `iwae-dreg` IWAE with doubly reparameterized gradients (all three in iwae.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from pyro.infer import ELBO
from torch import Tensor
from torch.distributions import kl_divergence

from ..errors import InputError
from ..registry import Registry
from ..sites import MAX_PLATE_NESTING, sample_sites
from .elbo import OnDeviceTrace_ELBO, OnDeviceTraceMeanField_ELBO
from .iwae import IWAE, STL, DReG, particle_traces, weights

ESTIMATORS = Registry("estimator", {
    "mc": OnDeviceTrace_ELBO, "analytic": OnDeviceTraceMeanField_ELBO,
    "iwae": IWAE, "stl": STL, "iwae-dreg": DReG,
}, returns=ELBO)


def register_estimator(name: str, factory: Callable[..., ELBO]) -> Callable[..., ELBO]:
    """Make `factory` the estimator `name` (for `--estimator name`, `make_estimator(name)`).

    Contract: the factory is called with keyword arguments only, `factory(num_particles=K,
    vectorize_particles=K > 1, max_plate_nesting=...)`, as pyro.infer.ELBO subclasses take them, and
    returns a pyro.infer.ELBO whose `differentiable_loss(model, guide, x)` is -bound summed over the
    examples of x. A subclass of Trace_ELBO (or of any ELBO) is such a factory. A name already taken
    is an InputError."""
    return ESTIMATORS.register(name, factory)


def make_estimator(estimator: str | ELBO = "mc", particles: int = 1) -> ELBO:
    """The ELBO estimator `estimator` with `particles` vectorized samples per example; a
    pyro.infer.ELBO object is returned as it is."""
    if isinstance(estimator, ELBO):
        return estimator
    if particles < 1:
        raise InputError(f"--particles must be a positive integer, got {particles}")
    return ESTIMATORS.build(estimator, num_particles=particles, vectorize_particles=particles > 1,
                            max_plate_nesting=MAX_PLATE_NESTING)


def traces(model: Callable, guide: Callable, x: Tensor, num_particles: int, *conditions: Tensor):
    """Guide and model traces with `num_particles` vectorized samples of z per example; every
    site's log_prob has shape (num_particles, N). `conditions` follow x into model and guide (a
    conditional pair's c)."""
    model_trace, guide_trace = particle_traces(model, guide, num_particles, x, *conditions)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    return model_trace, guide_trace


def log_weights(model: Callable, guide: Callable, x: Tensor, num_particles: int) -> Tensor:
    """log w_k(x) = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x): shape (num_particles, N), one
    column per example, without any poutine.scale or subsampling factor (a scaled bound applies its
    scale after the logsumexp, not before)."""
    return weights(model, guide, num_particles, x).log_w


def analytic_kl_sites(model: Callable, guide: Callable, x: Tensor, *conditions: Tensor) -> dict[str, bool]:
    """For each latent site of the guide, whether torch has KL(q || p) in closed form for it, i.e.
    whether TraceMeanField_ELBO uses the analytic KL there (it falls back to Monte Carlo, log q - log p
    at the sampled z, where it has not). `conditions`: a conditional pair's c, one row per example."""
    model_trace, guide_trace = traces(model, guide, x[:1], 1, *(c[:1] for c in conditions))
    sites = {}
    for name, site in sample_sites(guide_trace):
        if not site["is_observed"]:
            try:
                kl_divergence(site["fn"], model_trace.nodes[name]["fn"])
                sites[name] = True
            except NotImplementedError:
                sites[name] = False
    return sites


def check_analytic_kl(estimator: str | ELBO, model: Callable, guide: Callable, x: Tensor,
                      *conditions: Tensor) -> dict | None:
    """With the `analytic` estimator: warn (once per call) naming every latent site whose KL is
    estimated by Monte Carlo instead, and return the record {"analytic_kl_sites": [...],
    "monte_carlo_kl_sites": [...]} for the run's summary; None for other estimators."""
    if estimator != "analytic":
        return None
    sites = analytic_kl_sites(model, guide, x, *conditions)
    fallback = [name for name, analytic in sites.items() if not analytic]
    if fallback:
        warnings.warn(
            f"--estimator analytic: torch has no closed-form KL(q || p) for latent site(s) "
            f"{', '.join(repr(n) for n in fallback)}; there the KL term is estimated by Monte Carlo "
            "(log q - log p at the sampled z), as with --estimator mc", UserWarning, stacklevel=2)
    return {"analytic_kl_sites": [n for n, a in sites.items() if a], "monte_carlo_kl_sites": fallback}
