"""The optimal guide q*: one free Gaussian per example, fitted by SVI with the decoder held fixed,
starting from the encoder's q(z|x). Cremer, Li & Duvenaud (2018, "Inference suboptimality in
variational autoencoders") split log p(x) - L[q] into

    approximation gap  log p(x) - L[q*]   (the family is too poor for p(z|x))
    amortization gap   L[q*] - L[q]       (the encoder does not find the family's best member).

For a richer family (full-rank Gaussian) L[q*_full] - L[q] also contains what the richer family gains.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions.transforms import ReshapeTransform
from tqdm.auto import tqdm

from ...inference.estimators import make_estimator
from ...inference.program import Program
from ..evaluate import MAX_ELEMENTS, example_chunks

FAMILIES = ("diagonal", "full-rank")
SVI_PARTICLES = 32  # draws of z per example and SVI step
SVI_LR = 0.01  # Adam, annealed to 0 by a cosine schedule so the last iterates settle


class PerExampleGaussian(nn.Module):
    """q*_n(z) = N(loc_n, diag scale_n^2) ("diagonal") or N(loc_n, L_n L_n^T) ("full-rank"), one
    Gaussian per example n over a vector z (N, D), with unconstrained parameters: log scale, and the
    strict lower triangle of L_n."""

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
        """q*_n for the examples `rows`, batch shape (n,), event shape (D,)."""
        scale = self.log_scale[rows].exp()
        if self.family == "diagonal":
            return dist.Normal(self.loc[rows], scale).to_event(1)
        scale_tril = self.lower[rows].tril(-1) + torch.diag_embed(scale)
        return dist.MultivariateNormal(self.loc[rows], scale_tril=scale_tril)


class OptimalGuide(nn.Module):
    """q*_n(z) = prod_s q*_{n,s}(z_s): a PerExampleGaussian for each latent site s of the program
    (its value flattened to a vector per example; full-rank within a site, independent across sites),
    sampled in the model's data plate, so it stands in for the program's guide."""

    def __init__(self, moments: dict[str, tuple[Tensor, Tensor]], family: str, plate: str):
        super().__init__()
        self.names, self.plate = list(moments), plate
        self.event_shapes = {name: loc.shape[1:] for name, (loc, _) in moments.items()}
        self.factors = nn.ModuleList(
            PerExampleGaussian(loc.flatten(1), scale.flatten(1), family) for loc, scale in moments.values())

    def __getitem__(self, name: str) -> PerExampleGaussian:
        """The factor q*_s of the latent site `name`."""
        return self.factors[self.names.index(name)]

    def distributions(self, rows: slice = slice(None)) -> dict[str, dist.Distribution]:
        """q*_{n,s} for the examples `rows`, per site, with the site's own event shape."""
        result = {}
        for name, factor in zip(self.names, self.factors, strict=True):
            q, shape = factor.distribution(rows), self.event_shapes[name]
            if q.event_shape != shape:
                q = dist.TransformedDistribution(q, [ReshapeTransform(q.event_shape, shape)])
            result[name] = q
        return result

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per site, the mean and standard deviation of q*, shaped (N, *event)."""
        result = {}
        for name, factor in zip(self.names, self.factors, strict=True):
            q, n = factor.distribution(), factor.loc.shape[0]
            result[name] = (q.mean.reshape(n, *self.event_shapes[name]),
                            q.stddev.reshape(n, *self.event_shapes[name]))
        return result

    def guide_for(self, rows: slice = slice(None)) -> Callable:
        """A Pyro guide for the examples x[rows], with the program's data plate and latent sites."""

        def guide(x: Tensor, *args, **kwargs) -> None:
            with pyro.plate(self.plate, x.shape[0]):
                for name, q in self.distributions(rows).items():
                    pyro.sample(name, q)

        return guide


@contextmanager
def frozen(params: Iterable[Tensor]) -> Iterator[None]:
    """Turn off gradients of `params` for the duration (so the decoder stays fixed and no graph is
    built through it), then restore them. pyro.module's warning that it skips a frozen module's
    parameters is silenced meanwhile."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(?s).*was not registered in the param store", UserWarning)
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def fit_optimal_guide(
    program: object, x: Tensor, family: str = "diagonal", steps: int = 500, particles: int = SVI_PARTICLES,
    lr: float = SVI_LR, start: OptimalGuide | None = None, progress: bool = False,
    max_elements: int = MAX_ELEMENTS,
) -> OptimalGuide:
    """q* = argmax over per-example Gaussians (one per latent site) of sum_n ELBO_n(q_n) (the terms
    are independent), by SVI (Trace_ELBO, Adam with a cosine-annealed step) from the means and
    standard deviations of `start` (default: the program's q(z|x_n)); a full-rank q* starts without
    correlations. The model's parameters are held fixed. Examples are fitted in chunks of at most
    `max_elements` particles x examples x pixels."""
    program = Program.of(program)
    with torch.no_grad():
        moments = program.posterior_moments(x) if start is None else start.moments()
    q_star = OptimalGuide(moments, family, program.sites(x).plate)
    elbo = make_estimator("mc", particles)
    n = x.shape[0]
    with frozen(program.parameters(x).values()):
        for rows in example_chunks(x, particles, max_elements):
            # a fresh Adam per chunk: the other rows get zero gradients and so do not move
            optimizer = torch.optim.Adam(q_star.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
            guide = q_star.guide_for(rows)
            desc = f"SVI for q* ({family}, examples {rows.start + 1}-{rows.stop} of {n})"
            for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
                optimizer.zero_grad()
                elbo.differentiable_loss(program.model, guide, x[rows]).backward()
                optimizer.step()
                schedule.step()
    return q_star
