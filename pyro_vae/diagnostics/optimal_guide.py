"""The optimal guide q*: one free Gaussian per example, fitted by SVI with the decoder held fixed,
starting from the encoder's q(z|x). Cremer, Li & Duvenaud (2018, "Inference suboptimality in
variational autoencoders") split log p(x) - L[q] into

    approximation gap  log p(x) - L[q*]   (the family is too poor for p(z|x))
    amortization gap   L[q*] - L[q]       (the encoder does not find the family's best member).

For a richer family (full-rank Gaussian) L[q*_full] - L[q] also contains what the richer family gains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..estimators import make_estimator
from ..evaluate import MAX_ELEMENTS, example_chunks
from ..model import VAE

FAMILIES = ("diagonal", "full-rank")
SVI_PARTICLES = 32  # draws of z per example and SVI step
SVI_LR = 0.01  # Adam, annealed to 0 by a cosine schedule so the last iterates settle


class PerExampleGaussian(nn.Module):
    """q*_n(z) = N(loc_n, diag scale_n^2) ("diagonal") or N(loc_n, L_n L_n^T) ("full-rank"), one
    Gaussian per example n, with unconstrained parameters: log scale, and the strict lower
    triangle of L_n."""

    def __init__(self, loc: Tensor, scale: Tensor, family: str = "diagonal"):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
        self.family = family
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(scale.detach().log())
        if family == "full-rank":
            self.lower = nn.Parameter(torch.zeros(*loc.shape, loc.shape[-1], dtype=loc.dtype,
                                                  device=loc.device))

    def distribution(self, rows: slice = slice(None)) -> dist.Distribution:
        """q*_n for the examples `rows`, batch shape (n,), event shape (z_dim,)."""
        scale = self.log_scale[rows].exp()
        if self.family == "diagonal":
            return dist.Normal(self.loc[rows], scale).to_event(1)
        scale_tril = self.lower[rows].tril(-1) + torch.diag_embed(scale)
        return dist.MultivariateNormal(self.loc[rows], scale_tril=scale_tril)

    def guide_for(self, rows: slice = slice(None)) -> Callable:
        """A Pyro guide for the examples x[rows], with the VAE's sites: plate "data", latent "z"."""

        def guide(x: Tensor) -> Tensor:
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("z", self.distribution(rows))

        return guide


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off gradients of `module`'s parameters for the duration (so the decoder stays fixed and
    no graph is built through it), then restore them."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def fit_optimal_guide(
    vae: VAE, x: Tensor, family: str = "diagonal", steps: int = 500, particles: int = SVI_PARTICLES,
    lr: float = SVI_LR, start: PerExampleGaussian | None = None, progress: bool = False,
    max_elements: int = MAX_ELEMENTS,
) -> PerExampleGaussian:
    """q* = argmax over per-example Gaussians of sum_n ELBO_n(q_n) (the terms are independent), by
    SVI (Trace_ELBO, Adam with a cosine-annealed step) from the means and standard deviations of
    `start` (default: the encoder's q(z|x_n)); a full-rank q* starts without correlations. Examples
    are fitted in chunks of at most `max_elements` particles x examples x pixels."""
    with torch.no_grad():
        q = vae.posterior(x) if start is None else start.distribution()
        q_star = PerExampleGaussian(q.mean, q.stddev, family)
    elbo = make_estimator("mc", particles)
    n = x.shape[0]
    with frozen(vae):
        for rows in example_chunks(x, particles, max_elements):
            # a fresh Adam per chunk: the other rows get zero gradients and so do not move
            optimizer = torch.optim.Adam(q_star.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
            guide = q_star.guide_for(rows)
            desc = f"SVI for q* ({family}, examples {rows.start + 1}-{rows.stop} of {n})"
            for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
                optimizer.zero_grad()
                elbo.differentiable_loss(vae.model, guide, x[rows]).backward()
                optimizer.step()
                schedule.step()
    return q_star
