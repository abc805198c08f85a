"""The KL weight beta of a beta-VAE and its linear warm-up (KL annealing), applied the Pyro way:
poutine.scale on the latent site, in both model and guide, so every ELBO estimator sees

    -ELBO_beta = -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))

(Trace_ELBO scales log p(z) and log q(z|x) by beta; TraceMeanField_ELBO scales its closed-form KL).
Evaluation never applies it: reported ELBOs are the true, unweighted bound.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from pyro.poutine.messenger import Message
from pyro.poutine.scale_messenger import ScaleMessenger

LATENT_SITES = ("z",)


class SiteScaleMessenger(ScaleMessenger):
    """poutine.scale restricted to the sample sites named in `sites`."""

    def __init__(self, scale: float, sites: Collection[str] = LATENT_SITES):
        super().__init__(scale)
        self.sites = frozenset(sites)

    def _process_message(self, msg: Message) -> None:
        if msg["name"] in self.sites:
            super()._process_message(msg)


def scale_latents(fn: Callable, beta: float, sites: Collection[str] = LATENT_SITES) -> Callable:
    """`fn` with the log-densities of its latent sites multiplied by beta (> 0); fn itself if beta is 1."""
    return fn if beta == 1.0 else SiteScaleMessenger(beta, sites)(fn)


def kl_weight(beta: float, anneal_epochs: int, step: int, steps_per_epoch: int) -> float:
    """beta_t = beta * min(1, t / (anneal_epochs * steps_per_epoch)) for the t-th step (t = step + 1,
    so the first step has a small positive weight); beta when annealing is off."""
    if not anneal_epochs:
        return beta
    return beta * min(1.0, (step + 1) / (anneal_epochs * steps_per_epoch))
