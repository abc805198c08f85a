"""Pyro's Trace_ELBO and TraceMeanField_ELBO, with a `differentiable_loss` that never waits for the
device: the `mc` and `analytic` estimators.

Pyro's `differentiable_loss` returns loss + (surrogate - float(surrogate)): the value of the ELBO
estimate, the gradient of the surrogate (which adds the score-function terms of non-reparameterized
sites). It adds up the loss from `.item()` of every site and checks the surrogate for NaN on the
host: each a host-device synchronization, every step. Here the loss stays a tensor, with the same
value and gradient, and there is no NaN check: the caller checks finiteness on the device
(step.SVIStep does). Only `differentiable_loss` changes: `loss` and `loss_and_grads`, which
pyro.infer.SVI calls, are Pyro's own, floats and warnings included.

The score-function 'reward' log r (log p - log q of every model site, detached, kept by plate) is
Pyro's own private `_compute_log_r`, the one Trace_ELBO calls, not a copy: our surrogate stays Trace_ELBO's
as Pyro changes. Should a Pyro release move or change it, importing this module fails, or
tests/test_estimators.py's comparison with Trace_ELBO on a score-function site does.

Each also answers `per_example_bound(model, guide, x)`: one draw of every example's ELBO, the value
`compare` measures (the IWAE family's are in iwae.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r  # Trace_ELBO's own, private: see the note below
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from torch.distributions import kl_divergence

from ..sites import sample_sites
from .iwae import particle_traces, weights


def _sum(terms: list[Tensor]) -> Tensor | float:
    """The sum of the terms (0 for none), without a leading 0 + (one operation fewer)."""
    return reduce(operator.add, terms) if terms else 0.0


class _OnDeviceLoss:
    """differentiable_loss = the mean over particles of `_particle_loss(model_trace, guide_trace)`, a
    tensor whose value is -ELBO and whose gradient is the estimator's."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """-ELBO estimate, with the estimator's gradient: Pyro's value and gradient, no host sync."""
        traces = self._get_traces(model, guide, args, kwargs)
        return _sum([self._particle_loss(m, g) for m, g in traces]) / self.num_particles


class OnDeviceTrace_ELBO(_OnDeviceLoss, Trace_ELBO):
    """Trace_ELBO (`mc`): ELBO = sum log p(x, z) - sum log q(z|x) at z ~ q(z|x), the KL term by Monte
    Carlo; its differentiable_loss stays on the device (module docstring)."""

    def per_example_bound(self, model, guide, *args, **kwargs) -> Tensor:
        """One draw of every example's ELBO, (1/K) sum_k [log p(x, z_k) - log q(z_k|x)] with K =
        num_particles vectorized draws, shape (N,), unscaled (no poutine.scale, subsampling factor or
        KL weight)."""
        return weights(model, guide, self.num_particles, *args, **kwargs).log_w.mean(0)

    def _particle_loss(self, model_trace: Trace, guide_trace: Trace) -> Tensor:
        """-ELBO = sum log q(z|x) - sum log p(x, z) of one particle (costs - gains), with the gradient of
        Trace_ELBO's surrogate: a reparameterized guide site's log q enters as its entropy term (which
        is log q); a non-reparameterized one as entropy term - log_r * score function, plus the
        difference to log q, detached, for the value."""
        gains = [site["log_prob_sum"] for _, site in sample_sites(model_trace)]
        costs = []
        log_r = None
        for _, site in sample_sites(guide_trace):
            _, score_function, entropy = site["score_parts"]
            if is_identically_zero(score_function) and not is_identically_zero(entropy):
                costs.append(entropy.sum())
                continue
            surrogate = 0.0 if is_identically_zero(entropy) else entropy.sum()
            if not is_identically_zero(score_function):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                surrogate = surrogate - (log_r.sum_to(site["cond_indep_stack"]) * score_function).sum()
            costs.append(surrogate + (site["log_prob_sum"] - surrogate).detach())
        return _sum(costs) - _sum(gains)


class OnDeviceTraceMeanField_ELBO(_OnDeviceLoss, TraceMeanField_ELBO):
    """TraceMeanField_ELBO (`analytic`): ELBO = sum log p(x|z) - sum KL(q(z|x) || p(z)), the KL in
    closed form where torch has it (log q(z|x) - log p(z) at the sampled z where not). Assumes, as
    Pyro's does, a mean-field guide with reparameterized latent sites; its differentiable_loss stays
    on the device (module docstring)."""

    def per_example_bound(self, model, guide, *args, **kwargs) -> Tensor:
        """One draw of every example's ELBO = recon - KL (mean_field_terms, K = num_particles), shape
        (N,), unscaled."""
        recon, kl = mean_field_terms(model, guide, self.num_particles, *args, **kwargs)
        return recon - kl

    def _particle_loss(self, model_trace: Trace, guide_trace: Trace) -> Tensor:
        """-ELBO = sum KL - sum log p(x|z) of one particle (costs - gains), as
        TraceMeanField_ELBO._differentiable_loss_particle computes it."""
        gains, costs = [], []
        for name, model_site in sample_sites(model_trace):
            if model_site["is_observed"]:
                gains.append(model_site["log_prob_sum"])
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:  # Monte Carlo: log q - log p at the sampled z
                costs.append(guide_site["score_parts"].entropy_term.sum())
                gains.append(model_site["log_prob_sum"])
                continue
            kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
            if torch.is_tensor(kl):
                assert kl.shape == guide_site["fn"].batch_shape, "KL(q || p) is not shaped like q's batch"
                costs.append(kl.sum())
            else:
                costs.append(kl * guide_site["fn"].batch_shape.numel())
        for name, guide_site in sample_sites(guide_trace):  # auxiliary guide sites: their log q
            if name not in model_trace.nodes:
                assert guide_site["infer"].get("is_auxiliary"), f"guide site {name!r} is not in the model"
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                costs.append(guide_site["score_parts"].entropy_term.sum())
        return _sum(costs) - _sum(gains)


def mean_field_terms(model: Callable, guide: Callable, num_particles: int, *args,
                     **kwargs) -> tuple[Tensor, Tensor]:
    """Per example, shapes (N,), unscaled and unmasked: recon = (1/K) sum_k log p(x|z_k) (the observed
    sites) and kl = KL(q(z|x) || p(z)) summed over the latent sites, in closed form where torch has it,
    else (1/K) sum_k [log q(z_k|x) - log p(z_k)]; z_k ~ q(z|x), K = num_particles vectorized draws."""
    model_trace, guide_trace = particle_traces(model, guide, num_particles, *args, **kwargs)
    device = next(site["unscaled_log_prob"].device for _, site in sample_sites(model_trace))
    recon, kl = torch.zeros((), device=device), torch.zeros((), device=device)
    for name, site in sample_sites(model_trace):
        if site["is_observed"]:
            recon = recon + site["unscaled_log_prob"]
            continue
        q = guide_trace.nodes[name]
        try:
            kl = kl + kl_divergence(q["fn"], site["fn"])
        except NotImplementedError:
            kl = kl + q["unscaled_log_prob"] - site["unscaled_log_prob"]
    n = recon.shape[-1] if recon.dim() else kl.shape[-1]
    return recon.expand(num_particles, n).mean(0), kl.expand(num_particles, n).mean(0)
