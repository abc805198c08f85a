"""A model kind of a test's own, from outside the package: a VAE whose latent has two sites, z1 and z2
(two halves of --z-dim, each with a N(0, I) prior), registered as "two-site". With
`--plugin tests.plugins.two_site_kind --model two-site` it trains, evaluates, samples, compares and
reports from the command line; nothing in pyro_vae names it."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_vae.errors import InputError
from pyro_vae.models import register_model
from pyro_vae.models.likelihoods import make_likelihood
from pyro_vae.models.nets import make_networks
from pyro_vae.models.vae import VAEKind
from pyro_vae.param_store import RegisteringModule


class TwoSiteVAE(RegisteringModule):
    """p(z1) p(z2) p(x | z1, z2), q(z1|x) q(z2|x): the encoder's (loc, scale) split in two sites."""

    model_kind = "two-site"  # evaluate, figures and compare find the kind from the model
    param_prefix = "two_site"

    def __init__(self, x_shape: tuple[int, ...], hidden: list[int], z_dim: int, likelihood: str, **options):
        super().__init__()
        self.likelihood = make_likelihood(likelihood, **options)
        c, h, w = x_shape
        self.encoder, self.decoder = make_networks("mlp", x_shape, hidden, z_dim,
                                                   (c * self.likelihood.params_per_pixel, h, w))
        self.z_dim, self.split = z_dim, z_dim // 2

    def _prior(self, n: int, width: int, device: torch.device) -> dist.Distribution:
        return dist.Normal(torch.zeros(n, width, device=device), 1.0).to_event(1)

    def model(self, x: Tensor) -> Tensor:
        self.register_parts("decoder", "likelihood")
        n, device = x.shape[0], x.device
        with pyro.plate("data", n):
            z1 = pyro.sample("z1", self._prior(n, self.split, device))
            z2 = pyro.sample("z2", self._prior(n, self.z_dim - self.split, device))
            return pyro.sample("x", self.likelihood(self.decoder(torch.cat([z1, z2], -1))), obs=x)

    def guide(self, x: Tensor) -> None:
        self.register_parts("encoder")
        loc, scale = self.encoder(x)[:2]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(loc[..., :self.split], scale[..., :self.split]).to_event(1))
            pyro.sample("z2", dist.Normal(loc[..., self.split:], scale[..., self.split:]).to_event(1))


class TwoSiteKind(VAEKind):
    """The VAE's settings, objective, metrics and figures; its own model. A prior, guide family or
    network of the VAE's other than the defaults does not apply, and is refused in one line."""

    name = "two-site"
    figures = ("samples.png", "reconstructions.png", "latent_map.png")  # a traversal takes one site

    def check(self, config) -> None:
        super().check(config)
        if (config.prior, config.guide, config.encoder) != ("normal", "diagonal", "mlp"):
            raise InputError("--model two-site has a N(0, I) prior on each site, a diagonal guide and MLP "
                             "networks: leave --prior, --guide and --encoder at their defaults")
        if config.z_dim < 2:
            raise InputError(f"--model two-site splits --z-dim in two sites: it needs 2 or more, got "
                             f"{config.z_dim}")

    def build(self, config, x_shape: tuple[int, ...]) -> TwoSiteVAE:
        return TwoSiteVAE(x_shape, config.hidden, config.z_dim, config.likelihood, sigma=config.sigma,
                          sigma_mode=config.sigma_mode)


register_model("two-site", TwoSiteKind())
