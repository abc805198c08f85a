"""Per-example scores of a model/guide pair, in nats (sum over pixels): the ELBO and its two terms,
the importance-sampled log p(x), the active units, the squared reconstruction error and, for a model
that classifies, whether its most likely class is the label. What each model kind reports is made of
these (models/kind.py); evaluate.py, train.py, training/tensorboard.py and compare use them through the
kinds."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..renames import renamed_keywords
from ..stats import mean_se
from .elbo import mean_field_terms
from .iwae import weights
from .program import Program

MAX_ELEMENTS = 2**24  # particles x examples x pixels per chunk: bounds memory (~64 MB a tensor)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[z_u]) > 0.01


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def example_chunks(x: Tensor, particles: int, max_elements: int = MAX_ELEMENTS) -> list[slice]:
    """Slices of x's examples, each holding at most max_elements particles x examples x pixels (and at
    least one example)."""
    return _chunks(x.shape[0], max(1, max_elements // max(1, particles * x[0].numel())))


def importance_chunks(x: Tensor, k: int, max_elements: int = MAX_ELEMENTS) -> list[tuple[slice, slice]]:
    """(examples, draws) slices that cover x's examples x k draws, examples outermost; a chunk holds
    at most max_elements draws x examples x pixels (and at least one draw of one example)."""
    k_chunk = max(1, min(k, max_elements // max(1, x[0].numel())))
    return [(rows, draws) for rows in example_chunks(x, k_chunk, max_elements)
            for draws in _chunks(k, k_chunk)]


@torch.no_grad()
@renamed_keywords(k="eval_k")
def iwae_log_px(
    model: Callable, guide: Callable, x: Tensor, eval_k: int, max_elements: int = MAX_ELEMENTS,
    progress: bool = False, conditions: tuple[Tensor, ...] = (),
) -> Tensor:
    """Per-example IWAE estimate log p(x) ~ logsumexp_k(log w_k) - log K over K = eval_k draws, with
    w_k = p(x, z_k) / q(z_k|x); computed in chunks of particles and examples so memory stays bounded.
    Shape (N,).
    `conditions`: tensors with one row per example, passed after x to model and guide (a conditional
    pair's c: then the estimate is of log p(x | c))."""
    dtype = x.dtype if x.is_floating_point() else None  # float64 data keep float64 weights
    log_sum = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=dtype)
    chunks = importance_chunks(x, eval_k, max_elements)
    for rows, draws in tqdm(chunks, desc=f"log p(x), k={eval_k}", disable=not progress, leave=False):
        lw = weights(model, guide, draws.stop - draws.start, x[rows], *(c[rows] for c in conditions)).log_w
        log_sum[rows] = torch.logaddexp(log_sum[rows], lw.logsumexp(0))
    return log_sum - math.log(eval_k)


@torch.no_grad()
def elbo_terms(
    model: Callable, guide: Callable, x: Tensor, samples: int = 1, conditions: tuple[Tensor, ...] = ()
) -> dict[str, Tensor]:
    """Per-example ELBO = recon - kl: recon = E_q[log p(x|z)] (Monte Carlo over `samples`), and
    kl = KL(q(z|x) || p(z)) in closed form where torch has it, else Monte Carlo; unscaled (any
    poutine.scale, e.g. a KL weight, is ignored: these are the true terms). Shapes (N,). `conditions`:
    as in iwae_log_px (then the terms are of log p(x | c), with KL(q(z|x,c) || p(z|c)))."""
    recon, kl = [], []
    for rows in example_chunks(x, samples):
        r, k = mean_field_terms(model, guide, samples, x[rows], *(c[rows] for c in conditions))
        recon.append(r)
        kl.append(k)
    recon_t, kl_t = torch.cat(recon), torch.cat(kl)
    return {"elbo": recon_t - kl_t, "recon": recon_t, "kl": kl_t}


@torch.no_grad()
def active_units(program: object, x: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent units u with Var_x(E_q[z_u | x]) > threshold (Burda et al. 2016), over the
    coordinates of every latent site (Program.posterior_means). The variance is estimated as the
    covariance over x of two independent estimates of the posterior mean: the same as the variance
    where the mean is in closed form; where it is estimated from guide draws (a flow), the draws'
    noise, which would otherwise add sigma^2 / draws to every unit's variance, cancels."""
    program = Program.of(program)
    means = [torch.cat([program.posterior_means(x[rows]) for rows in _chunks(x.shape[0], 4096)])
             for _ in range(2)]
    if len(means[0]) < 2:
        return 0
    a, b = (m - m.mean(0) for m in means)
    return int(((a * b).sum(0) / (len(a) - 1) > threshold).sum())


@torch.no_grad()
def reconstruction_error(program: Program, x: Tensor) -> Tensor:
    """||x - mean of p(x | z = E_q[z|x])||^2 summed over pixels, per example: shape (N,)."""
    return torch.cat([(program.reconstruct(x[rows]) - x[rows]).square().flatten(1).sum(1)
                      for rows in _chunks(x.shape[0], 4096)])


PREDICT_BATCH = 2000  # test examples classified at a time


@torch.no_grad()
def labelled_correct(model: object, x: Tensor, labels: Tensor) -> Tensor:
    """1.0 where `model.predict` (q(y|x)'s most likely class) gives the label, else 0.0, per example: its
    mean is the accuracy, its standard error sqrt(a (1 - a) / (n - 1))."""
    predicted = torch.cat([model.predict(batch) for batch in x.split(PREDICT_BATCH)])
    return (predicted == labels).double()


def test_accuracy(model: object, data) -> tuple[float, float]:
    """The test accuracy of `model.predict` on data.test_x against data.test_y, and its standard error
    over the test examples."""
    return mean_se(labelled_correct(model, data.test_x, data.test_y))
