"""The benchmark's reference: the same VAE as pyro-vae's default (MLP encoder and decoder, q(z|x) a
diagonal Gaussian with scale softplus(raw) + 1e-4, N(0, I) prior, Bernoulli likelihood) written by
hand in plain PyTorch, the way one would without Pyro.

Loss per example = -ELBO = -log p(x|z) + KL, z = mu + sigma * eps; the KL is Monte Carlo
(`mc`: log q(z|x) - log p(z) at the sampled z) or closed form (`analytic`:
1/2 sum(sigma^2 + mu^2 - 1 - log sigma^2)), exactly as pyro-vae's `mc` and `analytic` estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MIN_SCALE = 1e-4  # as pyro_vae.models.nets.MIN_SCALE


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ReferenceVAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = Bernoulli(sigmoid(decoder(z))), q(z|x) = N(mu(x), diag sigma(x)^2).
    Parameter names match pyro-vae's VAE (encoder.net.*, decoder.net.*), so state dicts transfer."""

    def __init__(self, x_shape: Sequence[int], hidden: Sequence[int] = (400,), z_dim: int = 20):
        super().__init__()
        self.x_shape = tuple(x_shape)
        d = math.prod(self.x_shape)
        self.encoder = nn.Module()
        self.encoder.net = _mlp([d, *hidden, 2 * z_dim])
        self.decoder = nn.Module()
        self.decoder.net = _mlp([z_dim, *reversed(hidden), d])

    def loss(self, x: Tensor, estimator: str = "mc", eps: Tensor | None = None) -> Tensor:
        """-ELBO averaged over the batch, in nats per example; `eps` ~ N(0, I) may be given."""
        x = x.flatten(1)
        loc, raw = self.encoder.net(x).chunk(2, dim=-1)
        scale = F.softplus(raw) + MIN_SCALE
        eps = torch.randn_like(loc) if eps is None else eps
        z = loc + scale * eps
        logits = self.decoder.net(z)
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        if estimator == "analytic":
            kl = 0.5 * (scale.square() + loc.square() - 1).sum(-1) - scale.log().sum(-1)
        elif estimator == "mc":  # log N(z; mu, sigma) - log N(z; 0, 1); the 2 pi terms cancel
            kl = (0.5 * (z.square() - eps.square()) - scale.log()).sum(-1)
        else:
            raise ValueError(f"unknown estimator {estimator!r}: mc or analytic")
        return (nll + kl).mean()


def make_reference_step(
    vae: ReferenceVAE, estimator: str = "mc", lr: float = 1e-3, compile: bool = False, fused: bool = False
) -> Callable[[Tensor], Tensor]:
    """One training step x -> loss (zero_grad, forward, backward, Adam step), the plain way; with
    `compile`, the loss and its backward go through torch.compile; with `fused`, Adam(fused=True)."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, fused=fused or None)
    loss_fn = torch.compile(vae.loss) if compile else vae.loss

    def step(x: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, estimator)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
