"""The four networks of the two-level hierarchical VAE (hvae.py), as in the VampPrior paper's code
(Tomczak & Welling 2018, jmtomczak/vae_vampprior, HVAE_2level and convHVAE_2level):

    q(z2|x)      = N(mu, sigma^2)(x)            TopEncoder
    q(z1|x, z2)  = N(mu, sigma^2)(x, z2)        JointEncoder: an x branch and a z2 branch, joined
    p(z1|z2)     = N(mu, sigma^2)(z2)           ConditionalPrior
    p(x|z1, z2)  = likelihood(out(z1, z2))      JointDecoder

Every Gaussian layer predicts a mean and a log-variance, the log-variance clamped to [-6, 2] by a
hardtanh as in the authors' code (`clamped_scale`: sigma = exp(logvar / 2), between e^-3 and e).
Dense layers are gated (GatedDense, `gated=True`, the authors') or Linear + ReLU; `conv` replaces
the x branches by the authors' gated convolutions (two of stride 2: a 28x28 image leaves 6 x 7 x 7 =
294 features, an 8x8 one 6 x 2 x 2) and the decoder's last part by gated convolutions at full
resolution. Any number of leading batch dimensions is allowed (particle plates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .nets import GatedDense

LOGVAR_RANGE = (-6.0, 2.0)  # the authors' Hardtanh on every predicted log-variance
CONV_CHANNELS = 64  # the gated convolutions of the conv decoder


def clamped_scale(raw: Tensor) -> Tensor:
    """sigma = exp(hardtanh(raw, -6, 2) / 2): the raw output read as a log-variance, clamped."""
    return torch.exp(0.5 * F.hardtanh(raw, *LOGVAR_RANGE))


def _dense(sizes: Sequence[int], gated: bool) -> nn.Sequential:
    """Hidden layers only, each GatedDense (gated) or Linear + ReLU: sizes[0] -> ... -> sizes[-1]."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [GatedDense(a, b)] if gated else [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class GatedConv2d(nn.Module):
    """A gated convolution (Dauphin et al. 2017; the VampPrior paper's conv networks):
    h = conv_h(x) * sigmoid(conv_g(x)), both with the same kernel, stride and padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def _conv_features(channels: int, kernels: Sequence[int]) -> nn.Sequential:
    """The authors' gated conv stack on x: channels -> 32 -> 32 (stride 2) -> 64 -> 64 (stride 2) -> 6,
    kernel sizes `kernels` (padding keeps the size at stride 1), then flattened."""
    widths = (channels, 32, 32, 64, 64, 6)
    strides = (1, 2, 1, 2, 1)
    return nn.Sequential(*(GatedConv2d(a, b, k, s, k // 2) for a, b, k, s
                           in zip(widths[:-1], widths[1:], kernels, strides, strict=True)), nn.Flatten())


class ImageFeatures(nn.Module):
    """x (..., C, H, W) -> features (..., F): flattened through dense layers (sizes[1:]), or the gated
    conv stack of the authors (`kernels`) when conv. `features` is F."""

    def __init__(self, x_shape: Sequence[int], sizes: Sequence[int], gated: bool, conv: bool,
                 kernels: Sequence[int] = (7, 3, 5, 3, 3)):
        super().__init__()
        self.conv = conv
        if conv:
            self.net = _conv_features(x_shape[0], kernels)
            with torch.no_grad():
                self.features = self.net(torch.zeros(1, *x_shape)).shape[-1]
        else:
            self.net = _dense([math.prod(x_shape), *sizes], gated)
            self.features = sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv:
            return self.net(x.flatten(-3))
        return self.net(x.reshape(-1, *x.shape[-3:])).reshape(*x.shape[:-3], self.features)


class GaussianHead(nn.Module):
    """features -> (mu, sigma): two Linear layers, sigma = clamped_scale(log-variance)."""

    def __init__(self, features: int, z_dim: int):
        super().__init__()
        self.loc = nn.Linear(features, z_dim)
        self.logvar = nn.Linear(features, z_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.loc(h), clamped_scale(self.logvar(h))


def _join(a: Tensor, b: Tensor) -> Tensor:
    """[a, b] along the last dimension, the leading (batch) dimensions broadcast: x's features (N, F)
    beside z2's (K, N, F) under a particle plate."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], dim=-1)


class TopEncoder(nn.Module):
    """q(z2|x): x -> features (dense layers `hidden`, or the conv stack) -> (mu, sigma). This is also
    the VampPrior's q(z2|u_k) (priors.py)."""

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int, gated: bool, conv: bool):
        super().__init__()
        self.features = ImageFeatures(x_shape, hidden, gated, conv)
        self.head = GaussianHead(self.features.features, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.features(x))


class JointEncoder(nn.Module):
    """q(z1|x, z2): an x branch (one dense layer of width w, or the conv stack with 3x3 kernels) and a
    z2 branch (one dense layer to the x branch's width), concatenated, one dense layer of width w,
    then (mu, sigma). w = hidden[-1]."""

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int, gated: bool, conv: bool):
        super().__init__()
        width = hidden[-1]
        self.x_branch = ImageFeatures(x_shape, [width], gated, conv, kernels=(3, 3, 3, 3, 3))
        features = self.x_branch.features
        self.z_branch = _dense([z_dim, features], gated)
        self.joint = _dense([2 * features, width], gated)
        self.head = GaussianHead(width, z_dim)

    def forward(self, x: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.joint(_join(self.x_branch(x), self.z_branch(z2))))


class ConditionalPrior(nn.Module):
    """p(z1|z2): z2 -> dense layers (reversed `hidden`) -> (mu, sigma)."""

    def __init__(self, hidden: Sequence[int], z_dim: int, gated: bool):
        super().__init__()
        self.net = _dense([z_dim, *reversed(hidden)], gated)
        self.head = GaussianHead(hidden[0], z_dim)

    def forward(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.net(z2))


class JointDecoder(nn.Module):
    """p(x|z1, z2)'s raw parameters, shaped `out_shape` (C', H, W): a z1 branch and a z2 branch (one
    dense layer of width w = hidden[-1] each), concatenated, then
    * dense: one dense layer of width w and a Linear layer to C' H W outputs;
    * conv: one dense layer to an image (C, H, W) of the input's channels, four 3x3 gated
      convolutions of 64 channels at full resolution, and a 1x1 convolution to C' channels."""

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int,
                 out_shape: Sequence[int], gated: bool, conv: bool):
        super().__init__()
        width = hidden[-1]
        self.out_shape, self.x_shape, self.conv = tuple(out_shape), tuple(x_shape), conv
        self.z1_branch = _dense([z_dim, width], gated)
        self.z2_branch = _dense([z_dim, width], gated)
        if conv:
            c = x_shape[0]
            self.joint = _dense([2 * width, math.prod(x_shape)], gated)
            widths = (c, CONV_CHANNELS, CONV_CHANNELS, CONV_CHANNELS, CONV_CHANNELS)
            self.out = nn.Sequential(*(GatedConv2d(a, b, 3, 1, 1) for a, b in zip(widths[:-1], widths[1:],
                                                                                strict=True)),
                                     nn.Conv2d(CONV_CHANNELS, out_shape[0], 1))
        else:
            self.joint = _dense([2 * width, width], gated)
            self.out = nn.Linear(width, math.prod(out_shape))

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        h = self.joint(_join(self.z1_branch(z1), self.z2_branch(z2)))
        if not self.conv:
            return self.out(h).unflatten(-1, self.out_shape)
        batch = h.shape[:-1]
        return self.out(h.reshape(-1, *self.x_shape)).reshape(*batch, *self.out_shape)
