"""The true posterior p(z|x) by NUTS on every latent site of the program's model (whatever their names;
z below is all of them, flattened and concatenated per example), the model's parameters held fixed,
for a few examples at once (their posteriors are independent, so one chain over all of them samples
each). Chains run one after another (no worker processes), each with its own seed and its own start
drawn from q(z|x); ArviZ judges them (rank-normalized split R-hat, bulk and tail ESS) and holds the
draws as an InferenceData for users' own analysis. Because the examples share one chain, they share
its step size and tree depth: one example with a hard posterior makes all of them slower to sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value
from torch import Tensor

from ...inference.program import Program
from .optimal_guide import frozen

MAX_TREE_DEPTH = 8  # at most 2^8 leapfrog steps per draw


@dataclass
class NutsResult:
    """Draws z of shape (chains, draws, examples, D), q(z|x)'s mean and standard deviation (examples,
    D), per chain the divergent transitions and the step size that warm-up adapted, and the label of
    each of the D coordinates ("site_u": coordinate u of the flattened latent site)."""

    z: Tensor
    q_loc: Tensor
    q_scale: Tensor
    divergences: list[int]
    step_size: list[float]
    coordinates: list[str]


TAIL_PROBS = (0.05, 0.95)  # the tail ESS: the smaller of the ESS of these two quantiles (Vehtari et al. 2021)


def _arviz_stats():
    """ArviZ's array-level statistics (arviz-stats, the 1.x line's statistics package), imported on use."""
    from arviz_stats.base import array_stats

    return array_stats


def _flat(values: dict[str, Tensor], names: tuple[str, ...], batch_dims: int) -> Tensor:
    """The sites' values flattened after their first `batch_dims` dimensions, concatenated."""
    return torch.cat([values[name].flatten(batch_dims) for name in names], dim=-1)


def nuts_posterior(
    program: object, x: Tensor, num_samples: int = 500, warmup: int = 500, chains: int = 2, seed: int = 0,
    progress: bool = False,
) -> NutsResult:
    """Draws from p(z|x) proportional to p(z) p(x|z) for every example of x (NUTS with a diagonal
    mass matrix adapted during warm-up), `chains` chains of `num_samples` draws after `warmup`, each
    started from a draw of the guide. The sites' supports come from the guide (Pyro would derive them
    from the prior, which it cannot do for a mixture). The potential is compiled with Pyro's
    jit_compile (torch.jit.trace, about twice as fast on CPU; the decoder has no data-dependent
    branches for the trace to freeze)."""
    program = Program.of(program)
    names = program.sites(x).latent
    with torch.no_grad():
        moments = program.posterior_moments(x)
        q_loc = _flat({n: m for n, (m, _) in moments.items()}, names, 1)
        q_scale = _flat({n: s for n, (_, s) in moments.items()}, names, 1)
    coordinates = [f"{name}_{u}" for name in names for u in range(moments[name][0][0].numel())]
    draws, divergences, step_size = [], [], []
    with frozen(program.parameters(x).values()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", FutureWarning)
        for chain in range(chains):
            pyro.set_rng_seed(seed + chain)
            with torch.no_grad():
                guide_trace = poutine.trace(program.guide).get_trace(x)
            start = {name: guide_trace.nodes[name]["value"].detach() for name in names}
            transforms = {name: biject_to(guide_trace.nodes[name]["fn"].support) for name in names}
            kernel = NUTS(program.model, max_plate_nesting=1, max_tree_depth=MAX_TREE_DEPTH,
                          jit_compile=True, ignore_jit_warnings=True, transforms=transforms,
                          init_strategy=init_to_value(values=start))
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                        disable_progbar=not progress)
            mcmc.run(x)
            draws.append(_flat(mcmc.get_samples(), names, 2).detach())
            divergences.append(len(mcmc.diagnostics()["divergences"]["chain 0"]))
            step_size.append(float(kernel.step_size))
    return NutsResult(torch.stack(draws), q_loc, q_scale, divergences, step_size, coordinates)


def inference_data(result: NutsResult, x: Tensor, example_index: Tensor):
    """ArviZ's InferenceData (an xarray DataTree, arviz-base's from_dict): posterior z (chain, draw,
    example, latent), and as constant_data q(z|x)'s loc and scale and the examples themselves
    (flattened to pixels). Written by `to_netcdf`, read back with xarray.open_datatree."""
    from arviz_base import from_dict  # ArviZ is heavy: imported on use, not by `import pyro_vae`

    coords = {"example": example_index.cpu().numpy(), "latent": range(result.z.shape[-1]),
              "pixel": range(x[0].numel())}
    return from_dict(
        {"posterior": {"z": result.z.cpu().double().numpy()},
         "constant_data": {"q_loc": result.q_loc.cpu().double().numpy(),
                           "q_scale": result.q_scale.cpu().double().numpy(),
                           "x": x.flatten(1).cpu().double().numpy()}},
        coords=coords,
        dims={"z": ["example", "latent"], "q_loc": ["example", "latent"],
              "q_scale": ["example", "latent"], "x": ["example", "pixel"]},
    )


def chain_diagnostics(idata) -> dict[str, Tensor]:
    """ArviZ's rank-normalized split R-hat and bulk/tail effective sample sizes of every
    coordinate of z, each of shape (examples, D)."""
    stats = _arviz_stats()
    z = idata["posterior"]["z"].transpose("chain", "draw", ...).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"r_hat": torch.as_tensor(stats.rhat(z, chain_axis=0, draw_axis=1, method="rank")),
                "ess_bulk": torch.as_tensor(stats.ess(z, chain_axis=0, draw_axis=1, method="bulk")),
                "ess_tail": torch.as_tensor(stats.ess(z, chain_axis=0, draw_axis=1, method="tail",
                                                      prob=TAIL_PROBS))}


def marginal_discrepancy(result: NutsResult) -> Tensor:
    """Per example and coordinate u, KL(N(m_u, s_u^2) || N(mu_u, sigma_u^2)) between the moment-matched
    posterior marginal (m, s from the draws) and q's marginal (mu, sigma): how far q is from p(z|x)
    along u, in nats. Shape (examples, D)."""
    flat = result.z.flatten(0, 1)
    m, s = flat.mean(0), flat.std(0)
    mu, sigma = result.q_loc, result.q_scale
    return torch.log(sigma / s) + (s**2 + (m - mu) ** 2) / (2 * sigma**2) - 0.5
