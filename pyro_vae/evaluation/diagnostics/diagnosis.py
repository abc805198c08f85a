"""`diagnose`: how good is the amortized q(z|x) of a trained VAE, or of any model/guide pair that meets
the Program contract with real-valued latent sites (any names, several)? For a sample of test examples:
log p(x) (importance-sampled with q(z|x), the reference; and with each q* as proposal, from the draws
that estimate L[q*]), the amortized ELBO L[q], the optimal ELBOs L[q*] of per-example Gaussians
(diagonal and full-rank), the approximation and amortization gaps, PSIS k-hat of the weights
p(x, z) / q(z|x) (and p(x, z) / q*(z)), and for a few examples the true posterior by NUTS against q.
All bounds in nats per example; the standard errors are over the sampled examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor

from ...errors import InputError
from ...inference.program import Program
from ...models.kind import kind_of
from ...renames import renamed_keywords
from ...rng import forked_rng
from ...stats import mean_se
from .importance import (
    KHAT_GOOD,
    KHAT_THRESHOLD,
    elbo_estimate,
    importance_log_weights,
    log_px_estimate,
    pareto_khat,
)
from .nuts import NutsResult, chain_diagnostics, inference_data, marginal_discrepancy, nuts_posterior
from .optimal_guide import FAMILIES, SVI_PARTICLES, fit_optimal_guide

R_HAT_OK = 1.01  # Vehtari et al. 2021: above it the chains have not mixed
KHAT_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
KEY = {"diagonal": "diagonal", "full-rank": "full_rank"}  # family -> JSON key


@dataclass
class Diagnosis:
    """What `diagnose` measured: the summary (diagnose.json), per-example tensors, and the NUTS draws
    with their ArviZ InferenceData (None when no example was given to NUTS)."""

    summary: dict[str, Any]
    per_example: dict[str, Tensor]
    nuts: NutsResult | None
    posterior: Any


def _mean_se(values: Tensor) -> dict[str, float]:
    """The mean and its standard error (stats.mean_se) as the summary records them."""
    return dict(zip(("mean", "se"), mean_se(values), strict=True))


def _khat_summary(khat: Tensor) -> dict[str, Any]:
    """The share of examples above the 0.7 threshold and below 0.5, and quantiles of k-hat."""
    return {"share_above_threshold": float((khat > KHAT_THRESHOLD).double().mean()),
            "share_below_good": float((khat < KHAT_GOOD).double().mean()),
            "khat_quantiles": {str(q): float(khat.quantile(q)) for q in KHAT_QUANTILES}}


def _real_valued(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _check(program: Program, x: Tensor, n_examples: int, mcmc_examples: int, k: int) -> None:
    kind_of(program).refuse("diagnose", "the model")
    guide_trace = poutine.trace(program.guide).get_trace(x[:2])
    for name in program.sites(x).latent:
        support = guide_trace.nodes[name]["fn"].support
        if not _real_valued(support):
            raise InputError(f"latent site {name!r} has support {support}, not the real numbers: diagnose "
                             "fits Gaussians q* and runs NUTS on real-valued latent sites only")
    if not 1 <= n_examples <= x.shape[0]:
        raise InputError(f"--n-examples must be between 1 and the {x.shape[0]} test examples of the run, "
                         f"got {n_examples}")
    if not 0 <= mcmc_examples <= n_examples:
        raise InputError(f"--mcmc-examples must be between 0 and --n-examples ({n_examples}), "
                         f"got {mcmc_examples}")
    if k < 2:
        raise InputError(f"--eval-k must be at least 2 (k-hat and standard errors need several draws), "
                         f"got {k}")


def sample_examples(n_total: int, n: int, seed: int) -> Tensor:
    """n distinct example indices drawn uniformly from range(n_total) with `seed`, in ascending order."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


@renamed_keywords(k="eval_k")
def diagnose(
    program: object, x: Tensor, n_examples: int = 100, mcmc_examples: int = 5, eval_k: int = 5000,
    svi_steps: int = 500, num_samples: int = 500, warmup: int = 500, chains: int = 2, seed: int = 0,
    progress: bool = False,
) -> Diagnosis:
    """Inference diagnostics on `n_examples` examples drawn from x (the first `mcmc_examples` of them
    also by NUTS): log p(x) >= L[q*] >= L[q], with log p(x) - L[q*] the approximation gap and
    L[q*] - L[q] the amortization gap (Cremer, Li & Duvenaud 2018). `program`: our VAE, an object
    with .model and .guide, a (model, guide) tuple or a Program (its modules as they are: put them
    in eval mode first if they have dropout or batch norm). Seeded with `seed`, on forked generators:
    the caller's random state is as it was afterwards."""
    program = Program.of(program)
    with forked_rng(x.device):  # checking the pair traces it: a draw too
        _check(program, x, n_examples, mcmc_examples, eval_k)
        pyro.set_rng_seed(seed)
        return _diagnose(program, x, n_examples, mcmc_examples, eval_k, svi_steps, num_samples, warmup,
                         chains, seed, progress)


def _diagnose(program: Program, x: Tensor, n_examples: int, mcmc_examples: int, k: int, svi_steps: int,
              num_samples: int, warmup: int, chains: int, seed: int, progress: bool) -> Diagnosis:
    index = sample_examples(x.shape[0], n_examples, seed)
    xs = x[index.to(x.device)]
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    log_w = importance_log_weights(program.model, lambda rows: program.guide, xs, k, progress=progress,
                                   desc="importance weights of q")
    per: dict[str, Tensor] = {"index": index}
    per["log_px"], per["log_px_mc_se"] = log_px_estimate(log_w)
    per["elbo_amortized"], per["elbo_amortized_mc_se"] = elbo_estimate(log_w)
    per["khat"] = pareto_khat(log_w)
    seconds["importance_sampling"] = time.perf_counter() - start

    q_star = None  # the full-rank q* starts from the diagonal one: it can only add correlations
    for family in FAMILIES:
        start = time.perf_counter()
        q_star = fit_optimal_guide(program, xs, family, steps=svi_steps, start=q_star, progress=progress)
        lw = importance_log_weights(program.model, q_star.guide_for, xs, k, progress=progress,
                                    desc=f"ELBO of q* ({family})")
        name = f"elbo_optimal_{KEY[family]}"
        per[name], per[f"{name}_mc_se"] = elbo_estimate(lw)
        # the same draws are importance samples with q* as proposal: a second estimate of log p(x)
        proposal = f"log_px_q_star_{KEY[family]}"
        per[proposal], per[f"{proposal}_mc_se"] = log_px_estimate(lw)
        per[f"khat_q_star_{KEY[family]}"] = pareto_khat(lw)
        per[f"approximation_gap_{KEY[family]}"] = per["log_px"] - per[name]
        per[f"amortization_gap_{KEY[family]}"] = per[name] - per["elbo_amortized"]
        seconds[f"svi_{KEY[family]}"] = time.perf_counter() - start

    summary: dict[str, Any] = {
        "n_examples": n_examples, "k": k, "svi_steps": svi_steps, "svi_particles": SVI_PARTICLES,
        "seed": seed, "device": str(x.device),
        "bounds": {name: _mean_se(per[name]) for name in
                   ("log_px", "log_px_q_star_diagonal", "log_px_q_star_full_rank", "elbo_amortized",
                    "elbo_optimal_diagonal", "elbo_optimal_full_rank")},
        # > 0: importance sampling with q* found more mass than with q; the reference falls short
        "reference_shortfall": _mean_se(per["log_px_q_star_full_rank"] - per["log_px"]),
        "gaps": {KEY[f]: {"approximation": _mean_se(per[f"approximation_gap_{KEY[f]}"]),
                          "amortization": _mean_se(per[f"amortization_gap_{KEY[f]}"])} for f in FAMILIES},
        "psis": {"khat_threshold": KHAT_THRESHOLD, **_khat_summary(per["khat"]),
                 **{f"q_star_{KEY[f]}": _khat_summary(per[f"khat_q_star_{KEY[f]}"]) for f in FAMILIES}},
    }

    nuts, posterior = None, None
    if mcmc_examples:
        start = time.perf_counter()
        nuts = nuts_posterior(program, xs[:mcmc_examples], num_samples, warmup, chains, seed, progress)
        posterior = inference_data(nuts, xs[:mcmc_examples], index[:mcmc_examples])
        summary["mcmc"] = _compare_with_q(nuts, posterior, index[:mcmc_examples])
        summary["mcmc"].update(num_samples=num_samples, warmup=warmup, chains=chains)
        seconds["nuts"] = time.perf_counter() - start
    summary["seconds"] = seconds
    summary["per_example"] = {name: values.tolist() for name, values in per.items()}
    return Diagnosis(summary, per, nuts, posterior)


def _compare_with_q(nuts: NutsResult, posterior, index: Tensor) -> dict[str, Any]:
    """Per NUTS example: chain diagnostics, and the posterior mean/std against q's."""
    chains = chain_diagnostics(posterior)
    flat = nuts.z.flatten(0, 1).double()
    m, s = flat.mean(0), flat.std(0)
    mu, sigma = nuts.q_loc.double(), nuts.q_scale.double()
    discrepancy = marginal_discrepancy(nuts)
    examples = []
    for i in range(len(index)):
        examples.append({
            "index": int(index[i]),
            "r_hat_max": float(chains["r_hat"][i].max()),
            "ess_bulk_min": float(chains["ess_bulk"][i].min()),
            "ess_tail_min": float(chains["ess_tail"][i].min()),
            # |E_q z_u - E_p z_u| in posterior standard deviations, averaged over coordinates u
            "mean_shift_in_posterior_sd": float(((mu[i] - m[i]).abs() / s[i]).mean()),
            "max_mean_shift_in_posterior_sd": float(((mu[i] - m[i]).abs() / s[i]).max()),
            # geometric mean over u of sd_q(z_u) / sd_p(z_u): below 1, q is too narrow
            "q_sd_over_posterior_sd": float((sigma[i] / s[i]).log().mean().exp()),
            "top_coordinates": discrepancy[i].argsort(descending=True)[:2].tolist(),
            "posterior_mean": m[i].tolist(), "posterior_sd": s[i].tolist(),
            "q_mean": mu[i].tolist(), "q_sd": sigma[i].tolist(),
        })
    r_hat_max = max(e["r_hat_max"] for e in examples)
    return {"examples": examples, "r_hat_max": r_hat_max, "mixed": r_hat_max <= R_HAT_OK,
            "ess_bulk_min": min(e["ess_bulk_min"] for e in examples),
            "ess_tail_min": min(e["ess_tail_min"] for e in examples),
            "divergences": nuts.divergences, "step_size": nuts.step_size, "coordinates": nuts.coordinates}
