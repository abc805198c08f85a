"""Importance weights w = p(x, z) / q(z|x), z ~ q(z|x), kept for every draw: the log p(x) estimate,
its Monte Carlo error, the ELBO, and the Pareto k-hat that says whether the estimate can be trusted.

The IWAE estimate log p(x) ~ log (1/k) sum_k w_k is consistent, but its error is governed by the
tail of the weights. PSIS (Vehtari, Simpson, Gelman, Yao & Gabry 2024) fits a generalized Pareto
distribution to the largest weights; its shape k-hat estimates 1/alpha, where alpha is the number of
finite moments of w. Above k-hat = 0.7 the estimate is not to be trusted, whatever its k.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...inference.estimators import log_weights
from ..evaluate import MAX_ELEMENTS, importance_chunks

KHAT_GOOD = 0.5  # below: the importance-sampled estimate converges at the usual rate
KHAT_THRESHOLD = 0.7  # above: not to be trusted (Vehtari et al. 2024)


@torch.no_grad()
def importance_log_weights(
    model: Callable, guide_for: Callable[[slice], Callable], x: Tensor, k: int,
    max_elements: int = MAX_ELEMENTS, progress: bool = False, desc: str = "importance weights",
) -> Tensor:
    """log w_{kn} = log p(x_n, z_k) - log q(z_k|x_n), z_k ~ q(z|x_n), shape (k, N), computed in
    chunks of examples and draws. `guide_for(rows)` is the guide for the examples x[rows] (a guide
    with per-example parameters needs to know which ones it is given)."""
    out = torch.empty(k, x.shape[0], dtype=x.dtype, device=x.device)
    chunks = importance_chunks(x, k, max_elements)
    for rows, draws in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        out[draws, rows] = log_weights(model, guide_for(rows), x[rows], draws.stop - draws.start)
    return out


def log_px_estimate(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: log p(x) ~ logsumexp_k(log w_k) - log k, and its delta-method Monte Carlo standard
    error sd_k(w_k / mean w) / sqrt(k) (itself unreliable where k-hat > 0.7). Shapes (N,)."""
    k = log_w.shape[0]
    log_px = log_w.logsumexp(0) - math.log(k)
    relative = torch.exp(log_w - log_px)  # w_k / mean(w), mean 1
    return log_px, relative.std(0) / math.sqrt(k) if k > 1 else torch.full_like(log_px, math.nan)


def elbo_estimate(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: ELBO = E_q[log w] ~ mean_k log w_k, and its standard error sd_k(log w) / sqrt(k)."""
    k = log_w.shape[0]
    return log_w.mean(0), log_w.std(0) / math.sqrt(k) if k > 1 else torch.full_like(log_w[0], math.nan)


MIN_TAIL = 5  # draws in the tail that the generalized Pareto fit needs


def pareto_khat(log_w: Tensor) -> Tensor:
    """Per example, the PSIS shape estimate k-hat of the weights' upper tail (arviz-stats' `psislw`, draws
    independent so r_eff = 1), fitted to the largest M of the k weights (floor(k / 5) up to k = 225,
    floor(3 sqrt(k)) above); with M < 5 (k < 25) no fit is possible and k-hat is inf (unreliable), as
    ArviZ 0.x reported it. A tail the fit rejects (arviz-stats 1.x returns nan, e.g. for every M = 5
    tail, whose first quartile is its minimum) is inf too: never nan.
    Shape (N,)."""
    from arviz_stats.base import array_stats  # ArviZ is heavy: imported on use, not by `import pyro_vae`

    k = log_w.shape[0]
    if (math.floor(3 * math.sqrt(k)) if k > 225 else k // 5) < MIN_TAIL:
        return torch.full((log_w.shape[1],), math.inf, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # psislw warns on k > 0.7, which the caller reports itself
        # psislw takes LOO's log-likelihoods, whose importance weights are 1/p: pass -log w
        _, khat = array_stats.psislw(-log_w.T.double().cpu().numpy(), r_eff=1.0, axis=-1)
    khat = torch.as_tensor(khat, dtype=torch.float64)
    return torch.where(torch.isnan(khat), math.inf, khat)
