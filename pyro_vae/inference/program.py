"""The contract a model/guide pair meets, and what the library learns from it by tracing.

A *program* is a Pyro model p(z) p(x|z) and guide q(z|x), given as two callables taking the batch x
(N, C, H, W) as first argument (a `(model, guide)` tuple), or as one object with `.model` and
`.guide` methods (our `VAE`, Pyro's example VAE, a user's class). The contract:

* every per-example sample site lies inside one data plate of size N at dim -1;
* the model has one observed site (any name): the data, `obs=x` (any reshape of x, e.g. (N, 784));
* the latent sites are the guide's unobserved sample sites (any names, one or several), each also
  sampled in the model; nothing else is sampled in the guide;
* parameters reach Pyro's param store the Pyro way (`pyro.module`, `pyro.param`, `PyroModule`), so
  they appear as param sites in the traces (the parameters of an nn.Module owner that do not are
  taken from the module, see `Program.parameters`).

Nothing here relies on site names: `Program.sites` finds them from one trace. What a figure needs
beyond this (decoding a z into a picture) is read from the observed site's distribution: its
`.mean`, reshaped to the shape of x. An object may offer more, used when present:
`model_kind` (the name of its kind, models/kind.py: what evaluate, compare, diagnose and the figures do
with it), `is_autoencoder` (a point-mass guide, no bound on log p(x): the autoencoder's kind) and
`sample_latents(n)` (draws of z where the model's prior cannot be sampled, as for the autoencoder's flat
prior; a dict of draws by site name for several latent sites).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from ..errors import InputError
from ..sites import sample_sites
from .iwae import PARTICLE_DIM

MOMENT_DRAWS = 64  # guide draws per example for a mean or standard deviation with no closed form


@dataclass(frozen=True)
class Sites:
    """The names of a program's sites, as its traces show them."""

    latent: tuple[str, ...]  # the guide's unobserved sample sites, in the order the guide samples them
    observed: str  # the model's observed site
    plate: str  # the data plate (size N, dim -1) the observed site lies in


class Program:
    """A model/guide pair seen through Pyro's handlers: its sites, parameters, posterior means and
    decoded pictures, for any site names (see the module's docstring for the contract)."""

    def __init__(self, model: Callable, guide: Callable, owner: object | None = None):
        self.model, self.guide = model, guide
        self.owner = owner if owner is not None else getattr(model, "__self__", None)
        self._sites: Sites | None = None
        self._drawn_given: tuple[str, ...] | None = None

    @classmethod
    def of(cls, program: object, guide: Callable | None = None) -> Program:
        """A Program from (model, guide) callables (two arguments or one tuple), or from one object
        with .model and .guide."""
        if isinstance(program, Program):
            return program
        if guide is not None:
            return cls(program, guide)
        if isinstance(program, tuple) and len(program) == 2 and all(map(callable, program)):
            return cls(*program)
        model, guide = getattr(program, "model", None), getattr(program, "guide", None)
        if not (callable(model) and callable(guide)):
            raise InputError(f"{type(program).__name__} is not a model/guide pair: pass model and guide "
                             "callables, or an object with .model(x) and .guide(x) methods")
        return cls(model, guide, owner=program)

    def traces(self, x: Tensor, *conditions: Tensor) -> tuple[Trace, Trace]:
        """One model trace replayed on one guide trace, for the batch x (and a conditional pair's
        `conditions`, one row per example of x, passed after it: model(x, c), guide(x, c))."""
        guide_trace = poutine.trace(self.guide).get_trace(x, *conditions)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(x, *conditions)
        return model_trace, guide_trace

    def sites(self, x: Tensor, *conditions: Tensor) -> Sites:
        """The latent and observed site names, found by tracing model and guide on x[:2] (and the first
        two rows of each condition) once, and checked against the contract: an InputError names what
        does not fit."""
        if self._sites is None:
            self._sites = self._find_sites(x[:2], *(c[:2] for c in conditions))
        return self._sites

    def _find_sites(self, x: Tensor, *conditions: Tensor) -> Sites:
        model_trace, guide_trace = self.traces(x, *conditions)
        latent = tuple(name for name, site in sample_sites(guide_trace) if not site["is_observed"])
        observed = [name for name, site in sample_sites(model_trace) if site["is_observed"]]
        if len(observed) != 1:
            raise InputError(f"the model must have exactly one observed sample site (obs=x); it has "
                             f"{len(observed)}: {', '.join(map(repr, observed)) or 'none'}")
        if not latent:
            raise InputError("the guide samples no latent site: nothing to infer")
        for name in latent:
            if name not in model_trace.nodes:
                raise InputError(f"latent site {name!r} is sampled in the guide but not in the model")
        for trace in (model_trace, guide_trace):
            for name, site in sample_sites(trace):
                if name in latent or name == observed[0]:
                    _check_per_example(name, site, x.shape[0])
        plate = next(f.name for f in model_trace.nodes[observed[0]]["cond_indep_stack"] if f.dim == -1)
        return Sites(latent, observed[0], plate)

    def parameters(self, x: Tensor, *conditions: Tensor) -> dict[str, Tensor]:
        """The pair's trainable tensors by name (the tensors an optimizer steps); `conditions` as in
        parameter_groups."""
        groups = self.parameter_groups(x, *conditions)
        return {name: p for group in groups.values() for name, p in group.items()}

    def parameter_groups(self, x: Tensor, *conditions: Tensor) -> dict[str, dict[str, Tensor]]:
        """The trainable tensors split by what they parameterize: "guide" (variational, phi) holds the
        param sites of a guide trace on x[:2], "model" (generative, theta) those of the model trace
        that the guide does not use; both unconstrained, by param-store name. The parameters of an
        nn.Module owner that reach no param site (a plain nn.Module inside it) join "guide" if the
        guide's draws or log-density depend on them, else "model". `conditions`: a conditional pair's c
        (its first two rows go with x[:2])."""
        model_trace, guide_trace = self.traces(x[:2], *(c[:2] for c in conditions))
        groups: dict[str, dict[str, Tensor]] = {"guide": {}, "model": {}}
        seen: set[int] = set()
        for group, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "param" and id(value := site["value"].unconstrained()) not in seen:
                    groups[group][name] = value
                    seen.add(id(value))
        if isinstance(self.owner, torch.nn.Module):
            rest = {n: p for n, p in self.owner.named_parameters() if p.requires_grad and id(p) not in seen}
            if rest:
                used = _reached(guide_trace, list(rest.values()))
                for name, p in rest.items():
                    groups["guide" if id(p) in used else "model"][name] = p
        return groups

    def posterior_moments(self, x: Tensor, *conditions: Tensor,
                          draws: int = MOMENT_DRAWS) -> dict[str, tuple[Tensor, Tensor]]:
        """Per latent site, the mean and standard deviation of q(z|x) (q(z|x, c) for a conditional pair's
        `conditions`, passed after x as in traces()), each shaped like the site's
        value (N, *event) (for a discrete site, its most likely value and 0): in closed form where the guide's
        distribution has them, else estimated from `draws` joint draws of the guide: so for a site whose q
        is drawn given an earlier continuous latent site (z1 of q(z2|x) q(z1|x, z2)), whose distribution in
        one trace is q(z1|x, z2) at one draw of z2, not the marginal q(z1|x))."""
        drawn_given = self.drawn_given_continuous(x, *conditions)
        with torch.no_grad():
            guide_trace = poutine.trace(self.guide).get_trace(x, *conditions)
            moments, sampled = {}, None
            for name in self.sites(x, *conditions).latent:
                site = guide_trace.nodes[name]
                shape = site["value"].shape
                if site["fn"].support.is_discrete:  # a class has no mean: its most likely value, no spread
                    mode = site["fn"].mode.expand(shape)
                    moments[name] = (mode, torch.zeros(shape, device=mode.device))
                    continue
                closed = None if name in drawn_given else _closed_form_moments(site["fn"], shape)
                if closed is not None:
                    moments[name] = closed
                    continue
                if sampled is None:
                    with pyro.plate("draws", draws, dim=PARTICLE_DIM):
                        sampled = poutine.trace(self.guide).get_trace(x, *conditions)
                value = sampled.nodes[name]["value"]
                moments[name] = (value.mean(0), value.std(0))
        return moments

    def drawn_given_continuous(self, x: Tensor, *conditions: Tensor) -> tuple[str, ...]:
        """The latent sites whose guide distribution is computed from the value of another continuous
        latent site (z1 in q(z2|x) q(z1|x, z2)), found once by Pyro's provenance tracking
        (pyro.infer.inspect.get_dependencies: one run of the guide on x[:2], without gradients, the RNG
        forked); () for a single latent site."""
        if self._drawn_given is None:
            latent = self.sites(x, *conditions).latent
            if len(latent) < 2:
                self._drawn_given = ()
            else:
                args = (x[:2], *(c[:2] for c in conditions))
                upstream = get_dependencies(self.guide, args)["prior_dependencies"]
                continuous = set(self.continuous_sites(x, *conditions))
                self._drawn_given = tuple(n for n in latent
                                          if any(u != n and u in continuous for u in upstream.get(n, ())))
        return self._drawn_given

    def posterior_means(self, x: Tensor) -> Tensor:
        """E_q[z|x] for every continuous latent site (a discrete one, such as a class, has no mean),
        flattened and concatenated per example: shape (N, D)."""
        continuous = self.continuous_sites(x)
        means = [mean.reshape(x.shape[0], -1) for name, (mean, _) in self.posterior_moments(x).items()
                 if name in continuous]
        return torch.cat(means, dim=-1)

    def continuous_sites(self, x: Tensor, *conditions: Tensor) -> tuple[str, ...]:
        """The latent sites whose values are not discrete (all but, e.g., a class y), by one guide trace
        (of x[:2] and a conditional pair's `conditions`' first two rows)."""
        with torch.no_grad():
            guide_trace = poutine.trace(self.guide).get_trace(x[:2], *(c[:2] for c in conditions))
        return tuple(n for n in self.sites(x, *conditions).latent
                     if not guide_trace.nodes[n]["fn"].support.is_discrete)

    @torch.no_grad()
    def decode(self, x_like: Tensor, latents: dict[str, Tensor] | None = None) -> Tensor:
        """The mean of p(x|z) with the latent sites set to `latents` (drawn from the model's prior
        where not given), shaped like x_like, whose first dimension is the number of pictures. An
        InputError says why not where the observed distribution has no mean or not one value per
        entry of x."""
        model = poutine.condition(self.model, data=latents) if latents else self.model
        trace = poutine.trace(model).get_trace(x_like)
        observed = self.sites(x_like).observed
        try:
            mean = trace.nodes[observed]["fn"].mean
        except (NotImplementedError, AttributeError):
            raise InputError(f"the distribution of the observed site {observed!r} "
                             f"({type(trace.nodes[observed]['fn']).__name__}) has no .mean: there is "
                             "no picture to show for a z") from None
        if mean.numel() != x_like.numel():
            raise InputError(f"the mean of the observed site {observed!r} has shape {tuple(mean.shape)}, "
                             f"not one value per entry of x {tuple(x_like.shape)}")
        return mean.reshape(x_like.shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of p(x|z) at z = E_q[z|x] (each latent site at its guide mean)."""
        return self.decode(x, {name: mean for name, (mean, _) in self.posterior_moments(x).items()})

    @torch.no_grad()
    def sample(self, x_like: Tensor) -> Tensor:
        """Pictures generated from the prior: the mean of p(x|z), z ~ p(z), one per row of x_like (or,
        where the object offers `sample_latents`, z from it: one tensor for a single latent site, or a
        dict of the latent sites' draws by name)."""
        sample_latents = getattr(self.owner, "sample_latents", None)
        if callable(sample_latents):
            latents = sample_latents(x_like.shape[0])
            if not isinstance(latents, dict):
                (name,) = self.sites(x_like).latent
                latents = {name: latents}
            return self.decode(x_like, latents)
        try:
            return self.decode(x_like)
        except NotImplementedError:
            raise InputError("the model's prior cannot be sampled (e.g. an improper density): there are "
                             "no samples to show; offer sample_latents(n) on the object") from None


def check_conditions(x: Tensor, conditions: tuple[Tensor, ...]) -> None:
    """A conditional pair's conditions must be tensors with one row per example of x (an InputError)."""
    for c in conditions:
        if not torch.is_tensor(c) or c.dim() == 0 or c.shape[0] != x.shape[0]:
            shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise InputError(f"the condition c must be a tensor with one row per example of x ({x.shape[0]} "
                             f"rows), got {shape}: pass c[:n] for x[:n]")


def _closed_form_moments(fn: object, shape: torch.Size) -> tuple[Tensor, Tensor] | None:
    """The mean and standard deviation of the distribution `fn`, expanded to `shape`; None where it
    has no closed form for them (a flow)."""
    try:
        return fn.mean.expand(shape), fn.stddev.expand(shape)
    except (NotImplementedError, AttributeError):
        return None


def _reached(trace: Trace, params: list[Tensor]) -> set[int]:
    """ids of the tensors in `params` that the trace's draws z or its log-density log q(z|x) depend on
    (the draws too: a point mass's density does not depend on where it sits)."""
    total = sum(site["fn"].log_prob(site["value"]).sum() + site["value"].sum()
                for _, site in sample_sites(trace))
    if not torch.is_tensor(total) or not total.requires_grad:
        return set()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}


def _check_per_example(name: str, site: dict, n: int) -> None:
    """A site must lie in a plate of size n at dim -1 (the data plate): a global latent cannot be
    scored per example (IWAE, per-example evaluation)."""
    if not any(frame.dim == -1 and frame.size == n for frame in site["cond_indep_stack"]):
        raise InputError(f"site {name!r} is not inside the data plate (a plate of size N at dim -1): "
                         "pyro-vae scores every site per example, so a global latent or an observation "
                         "outside the plate is not supported")

