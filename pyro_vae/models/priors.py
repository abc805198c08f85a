"""Prior registry: name -> factory of a module whose call returns p(z), a distribution with
event shape (z_dim,) and batch shape () on the module's device (the exemplar prior, while the trainer
has it leave each example's own exemplar out, batch shape (B,): one mixture per example of the batch).
Adding a prior is one entry here plus its tests.

Factories receive keyword options: `z_dim`, the guide's `encoder` and the data shape `x_shape`
(for the VampPrior and the exemplar prior), `prior_components` (None: the prior's own default),
`exemplar_subset` and `exemplar_k` (exemplar.py); each takes the ones it needs. `register_prior` adds
one of your own (its docstring states the contract).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn
from torch.distributions import Normal, register_kl
from torch.nn import functional as F

from ..errors import InputError
from ..registry import Registry
from .exemplar import ExemplarPrior
from .nets import MIN_SCALE, positive_scale

DEFAULT_COMPONENTS = {"mog": 10, "vamp": 500}  # K when --prior-components is not given


def _raw_scale(scale: float, shape: Sequence[int]) -> Tensor:
    """The unconstrained value r with softplus(r) + MIN_SCALE = scale, filled into `shape`."""
    target = torch.tensor(scale - MIN_SCALE)
    return torch.full(tuple(shape), float(target + torch.log(-torch.expm1(-target))))


def _components(prior: str, k: int | None) -> int:
    """The number of mixture components: `k`, or the prior's default when k is None."""
    if k is None:
        return DEFAULT_COMPONENTS[prior]
    if k < 1:
        raise InputError(f"--prior-components must be a positive integer, got {k}")
    return int(k)


class StandardNormal(nn.Module):
    """p(z) = N(0, I). Its mean and scale are buffers, so the prior moves with the model's device."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return UnitNormal(self.loc, self.scale).to_event(1)


class UnitNormal(dist.Normal):
    """N(0, 1) elementwise (loc and scale must be 0 and 1), with the terms that vanish left out:
    log p(z) = -z^2/2 - log sqrt(2 pi), and KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1 - log s^2)/2.
    Bit for bit what Normal computes at loc 0 and scale 1, in fewer operations (forward and backward)."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return -(value**2) / 2 - math.log(math.sqrt(2 * math.pi))


@register_kl(Normal, UnitNormal)
def _kl_normal_unit_normal(p: Normal, q: UnitNormal) -> Tensor:
    """KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1 - log s^2) / 2, as torch's Normal-Normal formula
    computes it when q's loc is 0 and scale 1."""
    var = p.scale.pow(2)
    return 0.5 * (var + p.loc.pow(2) - 1 - var.log())


class LearnedNormal(nn.Module):
    """p(z) = N(mu, diag sigma^2) with mu and sigma = softplus(r) + MIN_SCALE learned; starts at N(0, I).
    The KL from a diagonal Gaussian q(z|x) stays in closed form."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(z_dim))
        self.raw_scale = nn.Parameter(_raw_scale(1.0, (z_dim,)))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, positive_scale(self.raw_scale)).to_event(1)


class DiagonalNormalMixture(TorchDistribution):
    """p(z) = sum_k softmax(logits)_k N(z; loc_k, diag scale_k^2), parameters of shape (K,) and
    (K, D), with any batch shape. Expanding it (as a plate does) keeps the (K, D) parameters: no
    (..., K, D) tensor is ever made. log_prob expands the quadratic form into three contractions over
    d (matrix products), sum_d (z_d - mu_kd)^2 P_kd = z^2 . P_k - 2 z . (mu_k P_k) + mu_k^2 . P_k
    with P = 1/scale^2, computed in float64: the three terms are of size |z|^2 P and cancel when z is
    near a narrow component (in float32 the error reaches 12 nats at scale 1e-3), and in float64 they
    stay below 1e-3 nats for scales down to MIN_SCALE (tests/test_vampprior.py)."""

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real,
                       "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, batch_shape: tuple[int, ...] = (),
                 validate_args: bool | None = None):
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> DiagonalNormalMixture:
        return DiagonalNormalMixture(self.logits, self.loc, self.scale, torch.Size(batch_shape),
                                     validate_args=self._validate_args)

    @property
    def _weights(self) -> Tensor:
        return torch.softmax(self.logits, -1)

    @property
    def mean(self) -> Tensor:
        return (self._weights @ self.loc).expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        """The diagonal of the covariance: sum_k w_k (scale_k^2 + mu_k^2) - mean^2."""
        w = self._weights
        return (w @ (self.scale**2 + self.loc**2) - (w @ self.loc) ** 2).expand(self.batch_shape
                                                                               + self.event_shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """Draw a component k ~ Categorical(softmax(logits)), then z ~ N(loc_k, diag scale_k^2)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits).sample(shape)
            eps = torch.randn(shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc[k] + self.scale[k] * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """log sum_k w_k N(z; loc_k, diag scale_k^2), shape z.shape[:-1] (broadcast with batch_shape)."""
        if self._validate_args:
            self._validate_sample(z)
        wide = torch.float64
        loc, precision = self.loc.to(wide), self.scale.to(wide).pow(-2)  # (K, D)
        z64 = z.to(wide)
        quad = (z64.pow(2) @ precision.T - 2 * z64 @ (loc * precision).T
                + (loc.pow(2) * precision).sum(-1))  # (..., K)
        log_norm = -0.5 * self.loc.shape[-1] * math.log(2 * math.pi) - self.scale.log().sum(-1)
        log_weights = torch.log_softmax(self.logits, -1)
        out = torch.logsumexp(log_weights + log_norm + (-0.5 * quad).to(z.dtype), -1)
        return out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))


def _mixture(logits: Tensor, loc: Tensor, scale: Tensor) -> dist.Distribution:
    """sum_k softmax(logits)_k N(z; loc_k, diag scale_k^2), loc and scale of shape (K, z_dim)."""
    return DiagonalNormalMixture(logits, loc, scale)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), K components with learned weights pi = softmax(logits),
    means (initialised from N(0, I), so the components start spread out) and diagonal scales (start at 1).
    No closed-form KL from q(z|x): `analytic` estimators fall back to Monte Carlo on this site."""

    def __init__(self, z_dim: int, components: int | None = None):
        super().__init__()
        k = _components("mog", components)
        self.logits = nn.Parameter(torch.zeros(k))
        self.loc = nn.Parameter(torch.randn(k, z_dim))
        self.raw_scale = nn.Parameter(_raw_scale(1.0, (k, z_dim)))

    def forward(self) -> dist.Distribution:
        return _mixture(self.logits, self.loc, positive_scale(self.raw_scale))


PSEUDO_INPUTS = ("free", "hardtanh")  # --pseudo-inputs: the parameter itself, or through Hardtanh(0, 1)
AUTHORS_INIT = (0.05, 0.01)  # --prior-init authors: the mean and std of the authors' pseudo-input weights


class VampPrior(nn.Module):
    """VampPrior (Tomczak & Welling 2018): p(z) = 1/K sum_k q(z | u_k), the uniform mixture of the
    guide's posteriors at K learned pseudo-inputs u_k in data space, shape (K, C, H, W). The
    pseudo-inputs pass through the guide's own `encoder` (the same module, so the two are trained
    together). With pseudo_inputs='free' u_k is the parameter itself; with 'hardtanh' u_k =
    hardtanh(w_k, 0, 1) = min(max(w_k, 0), 1) of a parameter w_k, as in the authors' code, so every u_k
    stays in [0, 1] (the gradient is 0 where w_k is outside). The parameter starts as uniform noise on
    [0, 1], the range of the built-in datasets; `init_from(x)` starts it at data, `init_normal()` at
    N(0.05, 0.01^2) elementwise as the authors' code does (through the Hardtanh: nearly black images of
    mean 0.05). No closed-form KL from q(z|x)."""

    def __init__(self, encoder: nn.Module, x_shape: Sequence[int],
                 components: int | None = None, pseudo_inputs: str = "free"):
        super().__init__()
        if pseudo_inputs not in PSEUDO_INPUTS:
            raise InputError(f"unknown pseudo_inputs {pseudo_inputs!r}: choose one of "
                             f"{', '.join(PSEUDO_INPUTS)}")
        k = _components("vamp", components)
        self.encoder = encoder
        self.clamped = pseudo_inputs == "hardtanh"
        self.pseudo_inputs = nn.Parameter(torch.rand(k, *x_shape))

    @torch.no_grad()
    def init_from(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Set the pseudo-inputs to K examples of `x` (N, C, H, W) drawn at random (with replacement
        when N < K)."""
        k = self.pseudo_inputs.shape[0]
        if x.shape[1:] != self.pseudo_inputs.shape[1:]:
            raise InputError(f"pseudo-inputs have shape {tuple(self.pseudo_inputs.shape[1:])}, "
                             f"data examples {tuple(x.shape[1:])}")
        index = (torch.randperm(x.shape[0], generator=generator)[:k] if x.shape[0] >= k
                 else torch.randint(x.shape[0], (k,), generator=generator))
        self.pseudo_inputs.copy_(x[index.to(x.device)])

    @torch.no_grad()
    def init_normal(self, generator: torch.Generator | None = None) -> None:
        """Draw the pseudo-input parameter from N(mean, std^2) elementwise, (mean, std) = AUTHORS_INIT."""
        mean, std = AUTHORS_INIT
        draw = torch.randn(self.pseudo_inputs.shape, generator=generator)
        self.pseudo_inputs.copy_(mean + std * draw)

    def inputs(self) -> Tensor:
        """The pseudo-inputs u_k as the encoder sees them, shape (K, C, H, W)."""
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0) if self.clamped else self.pseudo_inputs

    def forward(self) -> dist.Distribution:
        loc, scale = self.encoder(self.inputs())
        return _mixture(loc.new_zeros(loc.shape[0]), loc, scale)


PRIORS = Registry("prior", {
    "normal": lambda z_dim, **_: StandardNormal(z_dim),
    "learned": lambda z_dim, **_: LearnedNormal(z_dim),
    "mog": lambda z_dim, prior_components=None, **_: MixtureOfGaussians(z_dim, prior_components),
    "vamp": lambda z_dim, encoder, x_shape, prior_components=None, pseudo_inputs="free", **_: VampPrior(
        encoder, x_shape, prior_components, pseudo_inputs),
    "exemplar": lambda z_dim, encoder, x_shape, exemplar_subset=None, exemplar_k=None, **_: ExemplarPrior(
        encoder, x_shape, exemplar_subset, exemplar_k),
}, returns=nn.Module)


def register_prior(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Make `factory` the prior `name` (for `--prior name`, `Config(prior=name)`, `build_vae`).

    Contract: the factory is called with keyword arguments only, `factory(z_dim=..., encoder=...,
    x_shape=..., prior_components=..., **more)` (prior_components is None unless given; more options
    may be passed, so end the signature with `**options`), and returns an nn.Module whose call
    `module()` returns p(z): a distribution with event shape (z_dim,) and batch shape (), on the
    device of the module's parameters and buffers. A name already taken is an InputError."""
    return PRIORS.register(name, factory)


def make_prior(name: str, z_dim: int, **options) -> nn.Module:
    """The prior `name` for a `z_dim`-dimensional latent; factories take the options they need."""
    return PRIORS.build(name, z_dim=z_dim, **options)
