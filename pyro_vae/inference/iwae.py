"""Per-example importance weights, and the estimators built on them as pyro.infer.ELBO objects:
the importance-weighted bound (IWAE) and two lower-variance reparameterized gradients (STL, DReG).

With K particles z_k ~ q(z|x) per example, drawn by reparameterization z_k = z(eps_k; phi), and
log w_k = log p_theta(x, z_k) - log q_phi(z_k|x):

* `IWAE`  the bound IWAE_K(x) = log (1/K) sum_k w_k (Burda et al. 2016): K=1 is an ELBO sample,
  and E[IWAE_K] rises with K towards log p(x). Gradient: autograd through z_k.
* `STL`   the ELBO (1/K) sum_k log w_k, with log q evaluated at stopped variational parameters
  ("sticking the landing", Roeder et al. 2017): the score term grad_phi log q, zero in
  expectation, is dropped; the estimator's variance vanishes where q(z|x) = p(z|x).
* `DReG`  the IWAE bound with the doubly reparameterized gradient (Tucker et al. 2018):
  decoder sum_k w~_k grad_theta log w_k, encoder sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi),
  w~ = softmax_k(log w). At K=1 it is STL.

The bound is per example: the logsumexp over particles runs inside the data plate, and the scale of
the sites (N/n from a subsampled plate, or a poutine.scale) multiplies each example's bound after
the logsumexp, so a scaled minibatch bound is unbiased for the full-data one. Pyro's
RenyiELBO(alpha=0) scales before the logsumexp and takes it over the whole batch (pyro#3104).

The traces are built as Trace_ELBO builds its own (Pyro's get_importance_trace), so under Pyro's
validation the same checks run: a model latent missing from the guide warns, a log density whose
shape disagrees with its plates raises. What the gradients assume is checked on every call and
refused with an InputError: latent sites with rsample (all three). STL and DReG stop the variational
parameters' gradient by detaching each site's distribution; where latent sites depend on one another
(a hierarchical guide, z1 drawn given z2) that would cut a path, so there they score the draws again
instead (`_PerExampleBound.dependent_surrogate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.inspect import get_dependencies
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.util import check_if_enumerated, warn_if_nan
from torch import Tensor

from ..errors import InputError
from ..sites import MAX_PLATE_NESTING, sample_sites

PARTICLE_DIM = -MAX_PLATE_NESTING - 1


def particle_traces(model: Callable, guide: Callable, num_particles: int, *args,
                    **kwargs) -> tuple[Trace, Trace]:
    """Model and guide traces with `num_particles` vectorized draws of every latent site per example
    (a plate at PARTICLE_DIM, left of the data plate), built as Trace_ELBO builds its own: by Pyro's
    get_importance_trace, which drops the plates' subsample sites and computes the model's log
    densities and the guide's score parts ("unscaled_log_prob" too). Under pyro's validation it runs
    Trace_ELBO's checks: check_model_guide_match (a model latent missing from the guide warns, as
    does a guide site missing from the model), check_site_shape (a log density whose shape
    disagrees with its plates raises) and check_if_enumerated."""
    model_trace, guide_trace = get_importance_trace(
        "flat", -PARTICLE_DIM, _in_particles(model, num_particles), _in_particles(guide, num_particles),
        args, kwargs)
    if is_validation_enabled():
        check_if_enumerated(guide_trace)
    return model_trace, guide_trace


def _in_particles(fn: Callable, num_particles: int) -> Callable:
    """fn run inside the particle plate (a plate of its own per function, as Pyro's ELBO does)."""
    return pyro.plate("particles", num_particles, dim=PARTICLE_DIM)(fn)


@dataclass
class Weights:
    """One draw of K particles per example: log w (K, N), unscaled; the same sum with each site's
    log density times its scale, as Trace_ELBO sums them; the scale shared by every site (None where
    the sites disagree, e.g. a KL weight); the guide's latent sites' names and values (K, N, *event),
    and the names of those without rsample."""

    log_w: Tensor
    scaled_log_w: Tensor
    scale: Tensor | float | None
    latent_names: list[str]
    latents: list[Tensor]
    not_reparameterized: list[str]


def _log_prob(site: dict, stop_params: bool = False) -> Tensor:
    """log fn(value), masked as the site says but not scaled (the trace's "unscaled_log_prob");
    stop_params: at detached parameters. Pyro's `detach` deep-copies the distribution with every
    tensor in it detached: a Cholesky or low-rank factor, and a flow's networks, their conditioning
    context and cached values too (a flow then scores `value` by inverting its steps); the value keeps
    its path (tests/test_guides.py)."""
    log_p = detach(site["fn"]).log_prob(site["value"]) if stop_params else site["unscaled_log_prob"]
    return scale_and_mask(log_p, 1.0, site["mask"])


def _scaled_log_prob(site: dict) -> Tensor:
    """log fn(value) times the site's scale, masked as the site says."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])


def _common_scale(sites: list[dict], device: torch.device) -> Tensor | float | None:
    """The scale every site shares (1.0, N/n under subsampling, or a poutine.scale), else None. Number
    scales (Pyro's plates, our KL weight) are compared on the host, with no wait for the device; only a
    scale given as a tensor is compared on the device."""
    scale = sites[0]["scale"]
    for site in sites[1:]:
        if not _same_scale(site["scale"], scale, device):
            return None
    return scale


def _same_scale(a: Tensor | float, b: Tensor | float, device: torch.device) -> bool:
    if a is b:
        return True
    if not (torch.is_tensor(a) or torch.is_tensor(b)):
        return a == b
    return torch.equal(torch.as_tensor(a, device=device), torch.as_tensor(b, device=device))


def weights(model: Callable, guide: Callable, num_particles: int, *args, stop_q_params: bool = False,
            **kwargs) -> Weights:
    """log w_k(x) = log p(x, z_k) - log q(z_k|x) for z_k ~ q(z|x), shape (num_particles, N);
    stop_q_params=True evaluates log q at detached variational parameters (z keeps its path to them).
    Every sample site must be per example, i.e. inside the data plate at dim -1."""
    return trace_weights(*particle_traces(model, guide, num_particles, *args, **kwargs), num_particles,
                         stop_q_params)


def trace_weights(model_trace: Trace, guide_trace: Trace, num_particles: int,
                  stop_q_params: bool = False) -> Weights:
    """The Weights of traces made by particle_traces with num_particles (see `weights`)."""
    model_sites = [s for _, s in sample_sites(model_trace)]
    latent_sites = [s for _, s in sample_sites(guide_trace) if not s["is_observed"]]
    for site in model_sites + latent_sites:
        if not any(frame.dim == -1 for frame in site["cond_indep_stack"]):
            raise InputError(
                f"sample site {site['name']!r} is outside the data plate: per-example importance weights "
                "need every sample site inside the plate at dim -1 (one latent per example)"
            )
    terms = [(_log_prob(s), s["scale"]) for s in model_sites]
    terms += [(-_log_prob(s, stop_q_params), s["scale"]) for s in latent_sites]
    log_w = sum(lp for lp, _ in terms)
    shape = (num_particles, log_w.shape[-1])
    return Weights(
        log_w=log_w.expand(shape),
        scaled_log_w=sum(lp * scale for lp, scale in terms).expand(shape),
        scale=_common_scale(model_sites + latent_sites, log_w.device),
        latent_names=[s["name"] for s in latent_sites],
        latents=[s["value"] for s in latent_sites],
        not_reparameterized=[s["name"] for s in latent_sites if not s["fn"].has_rsample],
    )


class _PerExampleBound(ELBO):
    """A bound b(x) computed per example; the loss is -sum_n scale_n b(x_n), and its gradient is the
    gradient of a per-example surrogate that subclasses define. Particles are always vectorized (the
    `vectorize_particles` argument is accepted for Pyro's signature); the data plate must be the only
    plate (max_plate_nesting=1)."""

    stop_q_params = False

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING,
                 vectorize_particles: bool = True, **kwargs):
        if max_plate_nesting != MAX_PLATE_NESTING:
            raise ValueError(f"{type(self).__name__} supports max_plate_nesting={MAX_PLATE_NESTING} "
                             "(the data plate) only")
        if num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
        super().__init__(num_particles=num_particles, max_plate_nesting=MAX_PLATE_NESTING,
                         vectorize_particles=True, **kwargs)
        self._dependence: dict = {}  # (guide, latent names) -> whether they depend on one another

    def _get_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        """Model and guide traces of one vectorized draw of all particles (particle_traces: Pyro's
        get_importance_trace, and its checks under validation)."""
        return particle_traces(model, guide, self.num_particles, *args, **kwargs)

    def _weights(self, model, guide, args: tuple, kwargs: dict, stop_q_params: bool = False) -> Weights:
        return trace_weights(*self._get_trace(model, guide, args, kwargs), self.num_particles, stop_q_params)

    def bound(self, log_w: Tensor) -> Tensor:
        """The bound per example from log w (K, N), unscaled: shape (N,)."""
        raise NotImplementedError

    def scaled_bound(self, w: Weights) -> Tensor:
        """The bound per example, scaled, shape (N,): the value of the loss."""
        raise NotImplementedError

    def bound_and_surrogate(self, w: Weights) -> tuple[Tensor, Tensor]:
        """Per example and scaled, shape (N,): the bound's value, and the function whose gradient
        is used."""
        raise NotImplementedError

    def per_example_bound(self, model, guide, *args, **kwargs) -> Tensor:
        """One draw of every example's bound b(x_n) with num_particles particles, shape (N,), in nats:
        unscaled (no poutine.scale, subsampling factor or KL weight), the value `compare` measures.
        The value does not depend on how the gradient is taken, so check_guide does not run."""
        return self.bound(self._weights(model, guide, args, kwargs).log_w)

    def shared_scale(self, w: Weights) -> Tensor | float:
        """The one scale of every site, which multiplies a bound taken after a logsumexp."""
        if w.scale is None:
            raise InputError(f"{type(self).__name__} needs every sample site to have the same scale (it "
                             "multiplies each example's bound after the logsumexp); a poutine.scale on "
                             "some sites only, such as a KL weight beta != 1, has no importance-weighted "
                             "meaning: use --estimator mc, analytic or stl with it")
        return w.scale

    def check_guide(self, guide: Callable, w: Weights, args: tuple, kwargs: dict) -> bool:
        """Refuse, with an InputError, a latent site without rsample (the gradient runs through z_k);
        for STL and DReG (stop_q_params) return whether some latent site is drawn given another (then
        `dependent_surrogate` takes the gradient: detaching a site's distribution, as the independent
        case does, would also cut the path through the other latent that its parameters are computed
        from, and DReG's hook would weight such a path twice).

        Dependence is found by Pyro's provenance tracking (pyro.infer.inspect.get_dependencies): one
        extra run of the guide, without gradients and with the RNG forked, the first time this
        estimator object meets the guide with these latent sites; nothing for a guide with a single
        latent site (every guide of the registries)."""
        name = type(self).__name__
        if w.not_reparameterized:
            verb = "is" if len(w.not_reparameterized) == 1 else "are"
            raise InputError(f"{name} needs every latent site of the guide reparameterized (rsample); "
                             f"{_names(w.not_reparameterized)} {verb} not: use --estimator mc (Trace_ELBO, "
                             "with its score-function gradient) for such a guide")
        if not self.stop_q_params or len(w.latent_names) < 2:
            return False
        key = (guide, tuple(w.latent_names))
        try:
            if key in self._dependence:
                return self._dependence[key]
        except TypeError:  # a guide that cannot be hashed: checked on every call
            key = None
        dependencies = get_dependencies(guide, args, kwargs)["prior_dependencies"]
        dependent = any(u != site and u in dependencies.get(site, ())
                        for site in w.latent_names for u in w.latent_names)
        if key is not None:
            self._dependence[key] = dependent
        return dependent

    def path_weights(self, w: Weights) -> tuple[Tensor, Tensor | None]:
        """For `dependent_surrogate`: the weight c_k of each particle's path term, shape (K, N), and the
        factor h_k applied to the gradient arriving at its latent values (None: no factor)."""
        raise NotImplementedError

    def dependent_surrogate(self, model, guide, w: Weights, args: tuple, kwargs: dict) -> Tensor:
        """The per-example surrogate (N,) whose gradient is the path derivative, for a guide whose
        latent sites depend on one another: with z_k the draws of `w`, z^_k = z_k with the gradient
        arriving there multiplied by h_k, and zbar_k = z_k detached,

            sum_k c_k [log p(x, z^_k) - log q(z^_k|x) + log q(zbar_k|x) - stop(log q(zbar_k|x))],

        each density rescored by running model or guide again with its latent sites set to those values
        (poutine.condition; the guide twice). The last two terms cancel the score term grad_phi log q
        that the second one carries, so phi gets its gradient along z_k = z(eps_k; phi) alone,
        through every latent the draw is computed from, h_k applied once where the objective meets z_k
        (never again between z1 and the z2 it is drawn given). Each site's density carries its scale."""
        weight, factor = self.path_weights(w)
        live, fixed = {}, {}
        for name, z in zip(w.latent_names, w.latents, strict=True):
            fixed[name] = z.detach()
            live[name] = z.view_as(z)
            if factor is not None and live[name].requires_grad:
                shaped = factor.reshape(factor.shape + (1,) * (z.dim() - factor.dim()))
                live[name].register_hook(lambda grad, shaped=shaped: grad * shaped)
        model_trace = self._rescored(model, live, args, kwargs)
        guide_live, guide_fixed = (self._rescored(guide, values, args, kwargs) for values in (live, fixed))
        latent = set(w.latent_names)
        terms = [_scaled_log_prob(site) for _, site in sample_sites(model_trace)]
        for name, site in sample_sites(guide_live):
            if name in latent:
                score = _scaled_log_prob(guide_fixed.nodes[name])
                terms += [-_scaled_log_prob(site), score - score.detach()]
        per_particle = sum(terms).expand(w.log_w.shape)
        return (weight * per_particle).sum(0)

    def _rescored(self, fn: Callable, values: dict[str, Tensor], args: tuple, kwargs: dict) -> Trace:
        """A trace of `fn` run inside the particle plate with its latent sites set to `values`."""
        conditioned = _in_particles(poutine.condition(fn, data=values), self.num_particles)
        return poutine.trace(conditioned).get_trace(*args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """-sum_n scale_n b(x_n): its value is the bound's, its gradient the estimator's."""
        w = self._weights(model, guide, args, kwargs, self.stop_q_params)
        if self.check_guide(guide, w, args, kwargs):
            value = self.scaled_bound(w)
            surrogate = self.dependent_surrogate(model, guide, w, args, kwargs)
        else:
            value, surrogate = self.bound_and_surrogate(w)
        if surrogate is not value:
            value = value.detach() + (surrogate - surrogate.detach())
        return -value.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """-sum_n scale_n b(x_n) as a float, without gradients (a warning if it is NaN, as Pyro's)."""
        with torch.no_grad():
            return warn_if_nan(self.differentiable_loss(model, guide, *args, **kwargs).item(), "loss")

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after backpropagating the estimator's gradient into every parameter
        that requires one (what pyro.infer.SVI calls)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return warn_if_nan(loss.detach().item(), "loss")


def _names(names: list[str], what: str = "site") -> str:
    """'site 'a'' or 'sites 'a', 'b'' (with `what` for 'site')."""
    return f"{what}{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}"


def _iwae(log_w: Tensor) -> Tensor:
    """IWAE_K = logsumexp_k(log w_k) - log K, per example."""
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


class IWAE(_PerExampleBound):
    """Importance-weighted bound IWAE_K(x) = log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x)
    (Burda et al. 2016), per example, with the plain reparameterized gradient.

    Tighter than the ELBO for K > 1, but its encoder gradient's signal-to-noise ratio falls like
    1/sqrt(K) (Rainforth et al. 2018); `DReG` has the same value and a better encoder gradient.
    Assumes every latent site is per example and reparameterized (checked); latent sites may depend
    on one another (z2 drawn given z1): autograd follows every path.
    """

    def bound(self, log_w: Tensor) -> Tensor:
        return _iwae(log_w)

    def scaled_bound(self, w: Weights) -> Tensor:
        return self.shared_scale(w) * self.bound(w.log_w)

    def bound_and_surrogate(self, w: Weights) -> tuple[Tensor, Tensor]:
        value = self.scaled_bound(w)
        return value, value


class STL(_PerExampleBound):
    """The ELBO (1/K) sum_k [log p(x, z_k) - log q_phi'(z_k|x)] with phi' = stop_gradient(phi) inside
    log q, while z_k = z(eps_k; phi) keeps its reparameterized path: "sticking the landing" (Roeder
    et al. 2017).

    Unbiased for the ELBO's gradient because the dropped score term has zero mean under q. Its
    variance vanishes where q(z|x) is the exact posterior; far from it, it can be larger than the
    full gradient's. Assumes reparameterized, per-example latent sites (checked: check_guide); sites
    drawn given one another get the path derivative through `dependent_surrogate`.
    """

    stop_q_params = True

    def bound(self, log_w: Tensor) -> Tensor:
        return log_w.mean(0)

    def scaled_bound(self, w: Weights) -> Tensor:
        return w.scaled_log_w.mean(0)  # linear in log w: each site keeps its own scale, as in Trace_ELBO

    def bound_and_surrogate(self, w: Weights) -> tuple[Tensor, Tensor]:
        value = self.scaled_bound(w)
        return value, value

    def path_weights(self, w: Weights) -> tuple[Tensor, Tensor | None]:
        """c_k = 1/K, no factor: the mean over particles of the path derivative."""
        return torch.full_like(w.log_w, 1.0 / w.log_w.shape[0]), None


class DReG(_PerExampleBound):
    """The IWAE bound with doubly reparameterized gradients (Tucker et al. 2018):
    decoder grad = sum_k w~_k grad_theta log w_k (IWAE's); encoder grad = sum_k w~_k^2 (d log w_k/d z_k)
    (d z_k/d phi), with w~ = softmax_k(log w) held constant and log q at stopped parameters.

    One backward pass: the surrogate sum_k w~_k log w_k gives the decoder's gradient, and a hook on
    each latent value z_k multiplies the gradient arriving there by w~_k, giving the encoder's.
    The hook on z_k assumes the guide's latent sites do not depend on one another (true for the VAE's
    single "z"): a site computed from another would receive the factor w~ twice, and its detached
    distribution would cut the path through the other; such a guide (found by check_guide) gets
    `dependent_surrogate`, which applies w~ once where the objective meets z_k. At K=1 this is STL.
    """

    stop_q_params = True

    def bound(self, log_w: Tensor) -> Tensor:
        return _iwae(log_w)

    def scaled_bound(self, w: Weights) -> Tensor:
        return self.shared_scale(w) * self.bound(w.log_w)

    def bound_and_surrogate(self, w: Weights) -> tuple[Tensor, Tensor]:
        scale = self.shared_scale(w)
        w_tilde = torch.softmax(w.log_w.detach(), dim=0)
        for z in w.latents:
            if z.requires_grad:
                factor = w_tilde.reshape(w_tilde.shape + (1,) * (z.dim() - w_tilde.dim()))
                z.register_hook(lambda grad, factor=factor: grad * factor)
        return scale * self.bound(w.log_w), scale * (w_tilde * w.log_w).sum(0)

    def path_weights(self, w: Weights) -> tuple[Tensor, Tensor | None]:
        """c_k = w~_k and the factor w~_k on the gradient at z_k: the decoder gets sum_k w~_k grad log w_k,
        the encoder sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi)."""
        self.shared_scale(w)  # the bound is scaled after its logsumexp: one scale for every site
        w_tilde = torch.softmax(w.log_w.detach(), dim=0)
        return w_tilde, w_tilde
