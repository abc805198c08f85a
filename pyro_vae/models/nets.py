"""Encoder and decoder networks. Encoders map x (..., C, H, W) to the parameters (loc, scale) of a
diagonal Gaussian q(z|x), followed by `extra` features where the guide family needs more (guides.py);
decoders map z (..., z_dim) to the raw parameters of p(x|z), shaped like
the image (..., C', H, W). Any number of leading batch dimensions is allowed (particle plates)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError

MIN_SCALE = 1e-4  # floor on every learned standard deviation (q's, a prior's): log densities stay finite
LOG_VARIANCE_RANGE = (-6.0, 2.0)  # --encoder-scale clamped-logvar: the authors' Hardtanh on log sigma^2


class GatedDense(nn.Module):
    """A gated linear layer (Dauphin et al. 2017; the VampPrior paper's networks):
    h = (W1 x + b1) * sigmoid(W2 x + b2)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def _mlp(sizes: Sequence[int], gated: bool = False) -> nn.Sequential:
    """Hidden layers (Linear then ReLU, or with gated=True GatedDense), then a last Linear layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i == len(sizes) - 2:
            layers.append(nn.Linear(a, b))
        elif gated:
            layers.append(GatedDense(a, b))
        else:
            layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def positive_scale(raw: Tensor) -> Tensor:
    """A positive standard deviation from an unconstrained value: softplus(raw) + MIN_SCALE."""
    return F.softplus(raw) + MIN_SCALE


def clamped_logvar_scale(raw: Tensor) -> Tensor:
    """A standard deviation from a log-variance clamped as the VampPrior authors' encoder clamps it:
    sigma = exp(hardtanh(raw, -6, 2) / 2), in [e^-3, e^1] (gradient 0 outside the range)."""
    return torch.exp(0.5 * F.hardtanh(raw, *LOG_VARIANCE_RANGE))


# how an encoder turns its raw output into q's standard deviation (--encoder-scale)
ENCODER_SCALES = {"softplus": positive_scale, "clamped-logvar": clamped_logvar_scale}


def _gaussian_params(h: Tensor, scale: str = "softplus") -> tuple[Tensor, Tensor]:
    """Split the last dimension into loc and scale = ENCODER_SCALES[scale](raw) (by default
    softplus(raw) + MIN_SCALE)."""
    loc, raw = h.chunk(2, dim=-1)
    return loc, ENCODER_SCALES[scale](raw)


def _guide_params(h: Tensor, extra: int, scale: str = "softplus") -> tuple[Tensor, ...]:
    """(loc, scale) from the last dimension of h, followed, where the guide family needs `extra` more
    outputs (guides.py), by those features: (loc, scale, features)."""
    if not extra:
        return _gaussian_params(h, scale)
    return (*_gaussian_params(h[..., :-extra], scale), h[..., -extra:])


class MLPEncoder(nn.Module):
    """x -> flatten -> MLP(hidden) -> (loc, scale) of q(z|x), plus `extra` features for the guide."""

    gated = False  # hidden layers: Linear + ReLU, or GatedDense

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int, extra: int = 0,
                 scale: str = "softplus"):
        super().__init__()
        self.extra, self.scale = extra, scale
        self.net = _mlp([math.prod(x_shape), *hidden, 2 * z_dim + extra], self.gated)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return _guide_params(self.net(x.flatten(-3)), self.extra, self.scale)


class MLPDecoder(nn.Module):
    """z -> MLP(reversed hidden) -> raw likelihood parameters shaped `out_shape`."""

    gated = False

    def __init__(self, z_dim: int, hidden: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = _mlp([z_dim, *reversed(hidden), math.prod(out_shape)], self.gated)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).unflatten(-1, self.out_shape)


class GatedMLPEncoder(MLPEncoder):
    """MLPEncoder with GatedDense hidden layers."""

    gated = True


class GatedMLPDecoder(MLPDecoder):
    """MLPDecoder with GatedDense hidden layers."""

    gated = True


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32, 64 channels), then MLP(hidden) -> (loc, scale) of q(z|x), plus
    `extra` features for the guide."""

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int, extra: int = 0,
                 scale: str = "softplus"):
        super().__init__()
        self.extra, self.scale = extra, scale
        c, h, w = x_shape
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten()
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, c, h, w)).shape[-1]
        self.head = _mlp([flat, *hidden, 2 * z_dim + extra])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        batch = x.shape[:-3]
        h = F.relu(self.conv(x.reshape(-1, *x.shape[-3:])))
        return _guide_params(self.head(h).reshape(*batch, -1), self.extra, self.scale)


class ConvDecoder(nn.Module):
    """MLP(reversed hidden) -> 64 x ceil(H/4) x ceil(W/4) -> two stride-2 transposed convolutions
    -> crop to `out_shape`."""

    def __init__(self, z_dim: int, hidden: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        c, h, w = out_shape
        self.out_shape = tuple(out_shape)
        self.grid = (64, math.ceil(h / 4), math.ceil(w / 4))
        self.head = nn.Sequential(_mlp([z_dim, *reversed(hidden), math.prod(self.grid)]), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, c, 4, 2, 1)
        )

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        out = self.deconv(self.head(z).reshape(-1, *self.grid))
        c, h, w = self.out_shape
        return out[..., :h, :w].reshape(*batch, c, h, w)


NETWORKS = {"mlp": (MLPEncoder, MLPDecoder), "gated-mlp": (GatedMLPEncoder, GatedMLPDecoder),
            "conv": (ConvEncoder, ConvDecoder)}


def make_networks(
    kind: str, x_shape: Sequence[int], hidden: Sequence[int], z_dim: int, out_shape: Sequence[int],
    extra: int = 0, scale: str = "softplus",
) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair of architecture `kind` ('mlp', 'gated-mlp' or 'conv'); the encoder also
    outputs `extra` features for a guide family that needs them (guides.py), initially 0 (the last
    layer's weights and biases for them are zeroed), and makes q's scale as ENCODER_SCALES[scale] says."""
    if kind not in NETWORKS:
        raise InputError(f"unknown encoder {kind!r}: choose one of {', '.join(NETWORKS)}")
    if scale not in ENCODER_SCALES:
        raise InputError(f"unknown encoder scale {scale!r}: choose one of {', '.join(ENCODER_SCALES)}")
    if kind == "conv" and len(x_shape) == 3 and min(x_shape[1:]) < 4:
        raise InputError(f"--encoder conv needs images of at least 4x4 pixels, got {tuple(x_shape)}")
    enc_cls, dec_cls = NETWORKS[kind]
    if not extra:
        return enc_cls(x_shape, hidden, z_dim, scale=scale), dec_cls(z_dim, hidden, out_shape)
    encoder = enc_cls(x_shape, hidden, z_dim, extra, scale=scale)
    last = [m for m in encoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # the extra outputs start at 0: a richer guide starts as the diagonal one
        last.weight[-extra:].zero_()
        last.bias[-extra:].zero_()
    return encoder, dec_cls(z_dim, hidden, out_shape)


WEIGHT_INITS = ("default", "he")  # --weight-init


@torch.no_grad()
def he_init(module: nn.Module) -> None:
    """He-normal initialization of every nn.Linear inside `module`, as the VampPrior authors' he_init:
    weight ~ N(0, 2 / fan_in) elementwise; biases keep PyTorch's default (uniform on +-1/sqrt(fan_in)).
    Draws from torch's global random stream."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
