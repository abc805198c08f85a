"""Conditional models scored and trained from Python: the conditional log-likelihood by importance
sampling, beside the ELBO and the deterministic baseline's exact likelihood; and Pyro's SVI over
(x, c) batches.

A conditional pair is model(x, c) / guide(x, c) (models/cvae.py's CVAE, or your own), every site in
the data plate at dim -1. With k draws z_j ~ q(z | x, c) per example,

    log p(x | c) ~ log (1/k) sum_j p(x | z_j, c) p(z_j | c) / q(z_j | x, c),

a lower bound in expectation that rises with k towards log p(x | c) (Burda et al. 2016), and at least
the ELBO E_q[log p(x | z, c)] - KL(q(z | x, c) || p(z | c)) on average. For a quadrant condition the
likelihood covers the missing pixels, so this is log p(x_missing | x_given); Pyro's CVAE tutorial
reports the ELBO only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.optim
import torch
from pyro.infer import ELBO, SVI
from torch import Tensor

from ..data import batch_indices
from ..inference.estimators import make_estimator
from ..inference.program import Program
from ..renames import renamed_keywords
from ..rng import seeded
from ..stats import mean_se
from .evaluate import MAX_ELEMENTS, elbo_terms, iwae_log_px


def conditional_log_likelihood(program: object, x: Tensor, c: Tensor, k: int = 5000,
                               max_elements: int = MAX_ELEMENTS, progress: bool = False) -> Tensor:
    """Per example, shape (N,): log (1/k) sum_j w_j with w_j = p(x | z_j, c) p(z_j | c) / q(z_j | x, c),
    z_j ~ q(z | x, c); `program` a conditional pair (an object with .model(x, c) and .guide(x, c), or a
    (model, guide) tuple), in chunks of draws and examples (memory bounded by max_elements)."""
    pair = Program.of(program)
    return iwae_log_px(pair.model, pair.guide, x, k, max_elements, progress, conditions=(c,))


@dataclass
class ConditionalScores:
    """Per-example values, in nats, on the same examples: `log_lik`, the importance-sampled
    log p(x | c) with k draws; `elbo`, the ELBO (closed-form KL, `elbo_samples` draws for the
    reconstruction term); `baseline`, the baseline's exact log p(x_m | c) where one was scored."""

    log_lik: Tensor
    elbo: Tensor
    k: int
    baseline: Tensor | None = None

    def summary(self) -> dict[str, float | int]:
        """Means and standard errors over examples, and the paired differences (mean, s.e. of the
        per-example differences): log_lik - elbo (how much tighter the importance-sampled estimate is)
        and, with a baseline, log_lik - baseline and elbo - baseline (how much the CVAE beats it)."""
        values = {"log_lik": self.log_lik, "elbo": self.elbo}
        if self.baseline is not None:
            values["baseline"] = self.baseline
        pairs = [("log_lik", "elbo")] + ([("log_lik", "baseline"), ("elbo", "baseline")]
                                         if self.baseline is not None else [])
        out: dict[str, float | int] = {"k": self.k, "n_examples": int(self.log_lik.shape[0])}
        for name, v in values.items():
            out[name], out[f"{name}_se"] = mean_se(v.double())
        for a, b in pairs:
            out[f"{a}_minus_{b}"], out[f"{a}_minus_{b}_se"] = mean_se((values[a] - values[b]).double())
        return out


@torch.no_grad()
@renamed_keywords(k="eval_k")
def score_conditional(program: object, x: Tensor, c: Tensor, eval_k: int = 5000, elbo_samples: int = 10,
                      baseline: object | None = None, seed: int = 0,
                      progress: bool = False) -> ConditionalScores:
    """The importance-sampled log p(x | c) (eval_k draws per example), the ELBO and, given a `baseline` with
    .log_likelihood(x, c) (nn_baseline.BaselineNet), its log p(x_m | c), per example; seeded (the
    caller's random state is left as it was)."""
    pair = Program.of(program)
    with seeded(seed, x.device):
        log_lik = conditional_log_likelihood(pair, x, c, eval_k, progress=progress)
        elbo = elbo_terms(pair.model, pair.guide, x, elbo_samples, conditions=(c,))["elbo"]
    base = None if baseline is None else baseline.log_likelihood(x, c)
    return ConditionalScores(log_lik, elbo, eval_k, base)


def fit_svi(program: object, x: Tensor, c: Tensor, epochs: int = 10, batch_size: int = 128,
            lr: float = 1e-3, estimator: str | ELBO = "mc", particles: int = 1, seed: int = 0,
            on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train a conditional pair (or the baseline, whose guide samples nothing) with Pyro's own SVI and
    pyro.optim.Adam over shuffled (x, c) minibatches, the estimator by registry name (mc, analytic,
    iwae, stl, iwae-dreg) or a pyro.infer.ELBO; returns the mean loss per example of each epoch (-ELBO,
    or -bound). Parameters reach SVI through Pyro's param store, where the models register them; the
    random state is seeded inside and the caller's left as it was."""
    pair = Program.of(program)
    loss = make_estimator(estimator, particles)
    svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    losses = []
    with seeded(seed, x.device):
        order = torch.Generator(device=x.device).manual_seed(seed)
        for epoch in range(epochs):
            total = 0.0
            for rows in batch_indices(x.shape[0], batch_size, order, x.device):
                total += svi.step(x[rows], c[rows])
            losses.append(total / x.shape[0])
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    return losses
