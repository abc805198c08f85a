"""The KL weight beta of a beta-VAE and its linear warm-up (KL annealing), applied the Pyro way:
poutine.scale on every latent site, in both model and guide, so every ELBO estimator sees

    -ELBO_beta = -E_q[log p(x|z)] + beta * sum_s KL(q(z_s|x) || p(z_s))

summed over the latent sites s, whatever their names (Trace_ELBO scales log p(z_s) and log q(z_s|x)
by beta; TraceMeanField_ELBO scales its closed-form KL). Evaluation never applies it: reported ELBOs
are the true, unweighted bound.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from pyro.poutine.messenger import Message
from pyro.poutine.scale_messenger import ScaleMessenger

from ..sites import is_sample_site


class LatentScaleMessenger(ScaleMessenger):
    """poutine.scale restricted to the latent sites: those named in `sites`, or with sites=None every
    unobserved sample site (the latent sites of a model or guide that meets the Program contract)."""

    def __init__(self, scale: float, sites: Collection[str] | None = None):
        super().__init__(scale)
        self.sites = None if sites is None else frozenset(sites)

    def _process_message(self, msg: Message) -> None:
        if self.sites is None:
            latent = is_sample_site(msg) and not msg["is_observed"]
        else:
            latent = msg["name"] in self.sites
        if latent:
            super()._process_message(msg)


def scale_latents(fn: Callable, beta: float, sites: Collection[str] | None = None) -> Callable:
    """`fn` with the log-densities of its latent sites multiplied by beta (> 0): the sites named in
    `sites` (pass Program.sites(x).latent), or every unobserved sample site when None; fn itself if
    beta is 1."""
    return fn if beta == 1.0 else LatentScaleMessenger(beta, sites)(fn)


def kl_weight(beta: float, anneal_epochs: int, step: int, steps_per_epoch: int) -> float:
    """beta_t = beta * min(1, t / (anneal_epochs * steps_per_epoch)) for the t-th step (t = step + 1,
    so the first step has a small positive weight); beta when annealing is off."""
    if not anneal_epochs:
        return beta
    return beta * min(1.0, (step + 1) / (anneal_epochs * steps_per_epoch))
