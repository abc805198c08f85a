"""The estimators of an ELBO with a discrete latent (M2's class y, models/m2.py), the relaxation's
temperature schedule, and the labelled subset of a semi-supervised run.

For an unlabelled x the bound is U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)); the three estimators of it:
* 'enum': the sum over y computed exactly (parallel enumeration; Pyro's TraceEnum_ELBO); z sampled.
* 'score': y ~ q(y|x) sampled; the gradient w.r.t. q(y|x)'s parameters is the score function
  (REINFORCE) grad log q(y|x) (c(x, y, z) - b(x)), c the downstream cost, b(x) a learned baseline
  (Pyro's TraceGraph_ELBO with nn_baseline); unbiased for the gradient of U(x).
* 'relaxed': y = softmax((log pi + g) / tau), g ~ Gumbel, in the guide and (with uniform pi) in the
  model: the Concrete relaxation, reparameterized (Jang et al. 2017; Maddison et al. 2017), with
  Pyro's Trace_ELBO on a surrogate: log p(y) and log q(y|x) are the categorical log-mass
  sum_k y_k log pi_k of the soft y (m2.GumbelSoftmax), which is not a density on the simplex, nor the
  Concrete density y is drawn from, so the value is a bound on neither M2 nor the relaxed model (it
  can exceed their log p(x); tests/test_m2.py shows one); it tends to M2's ELBO as tau -> 0.
"""

from __future__ import annotations

import torch
from pyro.infer import ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from torch import Tensor

from ..errors import InputError
from ..sites import MAX_PLATE_NESTING
from .elbo import OnDeviceTrace_ELBO

UNLABELLED = -1  # the label of an example without one
DISCRETE = ("enum", "score", "relaxed")  # how the sum over a discrete latent y is estimated


class ScoreFunction_ELBO(TraceGraph_ELBO):
    """TraceGraph_ELBO (score-function gradients with Rao-Blackwellized downstream costs and the
    sites' baselines) as a differentiable loss: its value is -ELBO, its gradient that of Pyro's
    surrogate loss (score-function terms and the baselines' squared-error loss)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """-ELBO, with the surrogate loss's gradient."""
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return surrogate + (-elbo - surrogate).detach()


def make_discrete_estimator(discrete: str) -> ELBO:
    """The ELBO estimator for M2 with `discrete` = 'enum', 'score' or 'relaxed' (one particle: M2 refuses
    --particles)."""
    options = {"max_plate_nesting": MAX_PLATE_NESTING}
    if discrete == "enum":
        return TraceEnum_ELBO(strict_enumeration_warning=False, **options)
    if discrete == "score":
        return ScoreFunction_ELBO(**options)
    if discrete == "relaxed":
        return OnDeviceTrace_ELBO(**options)
    raise InputError(f"unknown --discrete {discrete!r}: choose one of {', '.join(DISCRETE)}")


def temperature(start: float, final: float | None, step: int, total_steps: int) -> float:
    """The relaxation's temperature at `step` of `total_steps`: geometric from `start` to `final`,
    tau_t = start * (final / start) ** (t / (T - 1)); constant `start` where final is None."""
    if final is None or total_steps <= 1:
        return start
    return start * (final / start) ** (min(step, total_steps - 1) / (total_steps - 1))


def choose_labelled(labels: Tensor, n: int, seed: int) -> Tensor:
    """The indices of `n` examples balanced over the classes (n // C of each, the remainder going to
    the first classes), drawn by a permutation seeded with `seed`: the labelled subset of a run."""
    classes = labels.unique()
    if n > labels.numel():
        raise InputError(f"--labels {n} asks for more labelled examples than the {labels.numel()} "
                         "training examples; lower --labels")
    if n < len(classes):
        raise InputError(f"--labels {n} cannot cover the {len(classes)} classes (at least one label each); "
                         f"use --labels {len(classes)} or more")
    generator = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(n, len(classes))
    chosen = []
    for i, c in enumerate(classes.tolist()):
        members = (labels == c).nonzero().squeeze(-1)
        want = per_class + (i < extra)
        if want > len(members):
            raise InputError(f"--labels {n} needs {want} examples of class {c}, and the training set has "
                             f"{len(members)}; lower --labels")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:want]])
    return torch.cat(chosen).sort().values


def mask_labels(labels: Tensor, labelled: Tensor) -> Tensor:
    """The labels with UNLABELLED everywhere but at the indices `labelled`."""
    masked = torch.full_like(labels, UNLABELLED)
    masked[labelled] = labels[labelled]
    return masked

