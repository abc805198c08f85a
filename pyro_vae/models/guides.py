"""Guide registry: name -> factory of the posterior family q(z|x), a module that turns the encoder's
outputs into a reparameterized distribution over z (event shape (z_dim,)).

The encoder always gives loc mu(x) and scale sigma(x) (z_dim each); a family that needs more asks
for `extra` further outputs ("features" h(x)), which the encoder's last layer adds:

* `diagonal` (default)  q = N(mu, diag sigma^2); no extra outputs.
* `fullrank`            q = N(mu, L L^T), L lower-triangular with diagonal sigma and the strict lower
                        triangle from h (z(z-1)/2 outputs).
* `lowrank`             q = N(mu, diag sigma^2 + W W^T), W (z_dim x R) from h (--guide-rank R).
* `iaf`                 z = f_N o ... o f_1(z0), z0 ~ N(mu, diag sigma^2), each f_t an affine
                        autoregressive step z_i -> m_i(z_<i, h) + s_i(z_<i, h) z_i conditioned on h
                        (Kingma et al. 2016), the order of z reversed between steps (--flows N);
                        log q(z) = log N(z0) - sum_t sum_i log s_i.

`register_guide` adds one of your own (its docstring states the contract).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn

from ..errors import InputError
from ..registry import Registry

DEFAULT_GUIDE = "diagonal"
DEFAULT_FLOWS = 2  # IAF steps when --flows is not given
DEFAULT_RANK = 1  # rank R of the lowrank guide when --guide-rank is not given


class GuideFamily(nn.Module):
    """A posterior family: `forward(loc, scale, features)` returns q(z|x), reparameterized, with
    event shape (z_dim,) and the batch shape of loc. `extra` is the number of encoder outputs it
    reads as `features` (None when 0). Its own parameters (a flow's) are the guide's too."""

    extra: int = 0

    def forward(self, loc: Tensor, scale: Tensor, features: Tensor | None = None) -> dist.Distribution:
        raise NotImplementedError


class Diagonal(GuideFamily):
    """q(z|x) = N(mu(x), diag sigma(x)^2)."""

    def forward(self, loc: Tensor, scale: Tensor, features: Tensor | None = None) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)


class FullRank(GuideFamily):
    """q(z|x) = N(mu(x), L(x) L(x)^T): L has diagonal sigma(x) > 0 and its strict lower triangle
    from the z(z-1)/2 features."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.extra = z_dim * (z_dim - 1) // 2
        self.register_buffer("rows_cols", torch.tril_indices(z_dim, z_dim, -1), persistent=False)

    def forward(self, loc: Tensor, scale: Tensor, features: Tensor | None = None) -> dist.Distribution:
        rows, cols = self.rows_cols
        scale_tril = torch.diag_embed(scale)
        scale_tril[..., rows, cols] = features
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)


class LowRank(GuideFamily):
    """q(z|x) = N(mu(x), diag sigma(x)^2 + W(x) W(x)^T), W of shape (z_dim, rank) from the features."""

    def __init__(self, z_dim: int, rank: int):
        super().__init__()
        self.z_dim, self.rank = z_dim, rank
        self.extra = z_dim * rank

    def forward(self, loc: Tensor, scale: Tensor, features: Tensor | None = None) -> dist.Distribution:
        factor = features.unflatten(-1, (self.z_dim, self.rank))
        return dist.LowRankMultivariateNormal(loc, factor, scale.square())


class IAF(GuideFamily):
    """Inverse autoregressive flow on the diagonal Gaussian: `flows` conditional affine
    autoregressive steps (MADE networks with one hidden layer of 4 z_dim units, conditioned on
    z_dim features of x), the order of z reversed between steps. Sampling and scoring the sample
    cost one network pass per step; scoring another z (as STL/DReG do at stopped parameters)
    inverts each step, z_dim passes."""

    def __init__(self, z_dim: int, flows: int):
        super().__init__()
        self.extra = z_dim
        order = torch.arange(z_dim)
        self.steps = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(z_dim, z_dim, [4 * z_dim], permutation=order))
            for _ in range(flows))
        self.register_buffer("reverse", order.flip(0), persistent=False)

    def forward(self, loc: Tensor, scale: Tensor, features: Tensor | None = None) -> dist.Distribution:
        transforms = []
        for i, step in enumerate(self.steps):
            if i:  # a Permute object per position: each caches its own (x, y), so scoring the sample
                transforms.append(Permute(self.reverse))  # that was just drawn inverts no step
            transforms.append(step.condition(features))
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)


def _rank(z_dim: int, guide_rank: int | None) -> int:
    rank = DEFAULT_RANK if guide_rank is None else guide_rank
    if not 1 <= rank < z_dim:
        raise InputError(f"--guide-rank must be between 1 and z_dim - 1 = {z_dim - 1} (a rank of z_dim or "
                         f"more is --guide fullrank), got {rank}")
    return rank


def _flows(flows: int | None) -> int:
    n = DEFAULT_FLOWS if flows is None else flows
    if n < 1:
        raise InputError(f"--flows must be a positive number of IAF steps, got {n}")
    return n


GUIDES = Registry("guide", {
    "diagonal": lambda **_: Diagonal(),
    "fullrank": lambda z_dim, **_: FullRank(z_dim),
    "lowrank": lambda z_dim, guide_rank=None, **_: LowRank(z_dim, _rank(z_dim, guide_rank)),
    "iaf": lambda z_dim, flows=None, **_: IAF(z_dim, _flows(flows)),
}, returns=GuideFamily)


def register_guide(name: str, factory: Callable[..., GuideFamily]) -> Callable[..., GuideFamily]:
    """Make `factory` the guide `name` (for `--guide name`, `Config(guide=name)`, `build_vae`).

    Contract: the factory is called with keyword arguments only, `factory(z_dim=..., guide_rank=...,
    flows=..., **more)` (guide_rank and flows are None unless given; end the signature with
    `**options`), and returns a GuideFamily: a module with an int attribute `extra` (how many encoder
    outputs beyond loc and scale it needs) whose call `family(loc, scale, features)` returns a
    reparameterized q(z|x) with event shape (z_dim,) and the batch shape of loc (features is None
    when extra is 0). A name already taken is an InputError."""
    return GUIDES.register(name, factory)


def make_guide(name: str, z_dim: int, **options) -> GuideFamily:
    """The posterior family `name` for a `z_dim`-dimensional latent."""
    return GUIDES.build(name, z_dim=z_dim, **options)
