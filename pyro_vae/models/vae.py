"""The VAE as a Pyro program: model() is p(z) p(x|z), guide() is q(z|x); the autoencoder baseline,
the same program with a point-mass guide and a flat p(z); and the VAE's model kind ("vae").

Sites: latent "z", observation "x", both inside the data plate "data" (dim -1). Nothing about
training lives here, so both functions run under any Pyro handler (trace, Predictive, Importance,
MCMC on z). Each registers the parameters it uses in Pyro's param store, as `pyro.module` does, so
`pyro.infer.SVI` with a `pyro.optim` optimizer trains them (param_store.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from ..data import Dataset
from ..errors import InputError
from ..param_store import RegisteringModule
from .guides import DEFAULT_GUIDE, Diagonal, GuideFamily, make_guide
from .kind import (
    MODEL_KINDS,
    ModelKind,
    check_discrete,
    check_exemplar,
    check_kl_weight,
    check_labels,
    check_no_condition,
    check_parts,
)
from .likelihoods import Likelihood, make_likelihood
from .nets import make_networks
from .priors import make_prior


class VAE(RegisteringModule):
    """p(x, z) = p(z) p(x|z) with p(x|z) = likelihood(decoder(z)); q(z|x) = family(encoder(x)), the
    posterior family (guides.py) a diagonal Gaussian N(encoder(x)) by default. model() registers the
    parameters of the decoder, prior and likelihood, guide() those of the encoder and family, in Pyro's
    param store under their state_dict names prefixed "vae$$$" (`param_prefix`), e.g.
    "vae$$$decoder.net.0.weight"; each tensor under one name, the first it has in named_parameters()
    (the VampPrior's encoder is the guide's: its tensors are "vae$$$encoder..." in the model too).
    Values loaded into the store under those names are copied into the parameters at the first call
    (param_store.py). (Inside param_sites(False), neither registers anything; loaded values are still
    copied in.) Checkpoints are vae.state_dict(), which holds the same tensors."""

    is_autoencoder = False
    model_kind = "vae"
    param_prefix = "vae"

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, likelihood: Likelihood,
        family: GuideFamily | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood
        self.family = Diagonal() if family is None else family
        self._guide_parts = ("encoder", "family") if list(self.family.parameters()) else ("encoder",)

    def model(self, x: Tensor | None = None, n: int | None = None) -> Tensor:
        """p(z) p(x|z) for a batch x (N, C, H, W); with x=None it generates n examples."""
        self.register_parts("decoder", "prior", "likelihood")
        with pyro.plate("data", n if x is None else x.shape[0]):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: Tensor, n: int | None = None) -> Tensor:
        """q(z|x) = family(encoder(x)), reparameterized (by default N(z; mu(x), diag sigma(x)^2),
        z = mu + sigma * eps)."""
        self.register_parts(*self._guide_parts)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))

    def posterior(self, x: Tensor) -> dist.Distribution:
        """q(z|x) as a distribution, without running Pyro (for plots and diagnostics)."""
        return self.family(*self.encoder(x))

    def sample_latents(self, n: int) -> Tensor:
        """n draws of z from the prior p(z): what `decode` turns into generated images."""
        return self.prior().sample((n,))

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x|z): what a picture of a decoded z shows."""
        return self.likelihood.mean(self.decoder(z))


MODELS = ("vae", "ae")  # a VAE, or the deterministic autoencoder baseline


class FlatLatent(nn.Module):
    """The autoencoder's 'prior': p(z) proportional to 1 on R^z_dim, log p(z) = 0 (improper; it cannot
    be sampled). It makes the ELBO of a point-mass guide exactly the reconstruction log-likelihood."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    def forward(self) -> dist.Distribution:
        return dist.ImproperUniform(constraints.real, (), (self.z_dim,))


class AutoEncoder(VAE):
    """The deterministic autoencoder baseline, still a Pyro program: the guide is a point mass at the
    code c(x) (the encoder's loc), the model's z has a flat density, so -ELBO = -log p(x | decoder(c(x))),
    the reconstruction loss alone. No prior, no KL, no bound on log p(x); `sample_latents` draws
    N(0, I) noise, to show what decoding random codes gives without a prior to match."""

    is_autoencoder = True
    model_kind = "ae"

    def posterior(self, x: Tensor) -> dist.Distribution:
        """The point mass q(z|x) = delta(z - c(x))."""
        loc, _ = self.encoder(x)
        return dist.Delta(loc, event_dim=1)

    def sample_latents(self, n: int) -> Tensor:
        """n draws of N(0, I) noise in code space."""
        z_dim = self.prior.z_dim
        return torch.randn(n, z_dim, device=next(self.decoder.parameters()).device)


def build_vae(
    x_shape: Sequence[int],
    encoder: str = "mlp",
    hidden: Sequence[int] = (400,),
    z_dim: int = 20,
    prior: str = "normal",
    likelihood: str = "bernoulli",
    model: str = "vae",
    guide: str = DEFAULT_GUIDE,
    encoder_scale: str = "softplus",
    **options,
) -> VAE:
    """A VAE (or, with model='ae', the AutoEncoder) from registry names. `options` go to the likelihood,
    prior and guide factories (e.g. sigma, sigma_mode, prior_components, guide_rank, flows, pseudo_inputs);
    the prior also gets the guide's encoder (its (loc, scale) outputs) and the data shape. `encoder_scale`
    says how the encoder makes q's standard deviation (nets.ENCODER_SCALES)."""
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if model == "ae" and guide != DEFAULT_GUIDE:
        raise InputError(f"--model ae is a deterministic autoencoder (a point-mass guide); --guide {guide} "
                         "applies to --model vae only")
    lik = make_likelihood(likelihood, **options)
    family = make_guide(guide, z_dim, **options)
    c, h, w = x_shape
    enc, dec = make_networks(encoder, x_shape, hidden, z_dim, (c * lik.params_per_pixel, h, w),
                             extra=family.extra, scale=encoder_scale)
    if model == "ae":
        return AutoEncoder(enc, dec, FlatLatent(z_dim), lik)
    gaussian = enc if not family.extra else GaussianOutputs(enc)
    p_z = make_prior(prior, z_dim, encoder=gaussian, x_shape=tuple(x_shape), **options)
    return VAE(enc, dec, p_z, lik, family)


class GaussianOutputs(nn.Module):
    """The encoder's (loc, scale) alone, without the guide family's extra features: what a prior built
    from the encoder (the VampPrior's q(z|u_k)) takes."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)[:2]


class VAEKind(ModelKind):
    """pyro-vae's VAE (--model vae): every setting of the parts (prior, likelihood, guide, estimator,
    networks), no labels and no discrete latent."""

    name = "vae"
    builds = "vae"  # build_vae's model: the VAE, or the autoencoder
    auto_cuda_graph = True  # one GPU, one process: measured equal to eager and 10x faster (docs/scaling.md)
    exemplar_prior = True

    def check(self, config) -> None:
        check_parts(config)
        check_exemplar(config, self)
        check_labels(config, self)
        check_no_condition(config, self)
        check_discrete(config, self)
        check_kl_weight(config)

    def build(self, config, x_shape: tuple[int, ...]) -> VAE:
        return build_vae(
            x_shape, encoder=config.encoder, hidden=config.hidden, z_dim=config.z_dim,
            prior=config.prior, likelihood=config.likelihood, sigma=config.sigma,
            sigma_mode=config.sigma_mode, prior_components=config.prior_components, model=self.builds,
            guide=config.guide, guide_rank=config.guide_rank, flows=config.flows,
            exemplar_subset=config.exemplar_subset, exemplar_k=config.exemplar_k,
            encoder_scale=config.encoder_scale, pseudo_inputs=config.pseudo_inputs,
        )

    def start(self, model: VAE, config, data: Dataset) -> None:
        super().start(model, config, data)  # --weight-init
        init_prior(model, config, data)


def init_prior(vae: VAE, config, data: Dataset) -> None:
    """With --prior-init data, start the VampPrior's pseudo-inputs at random training examples; with
    --prior-init authors, draw them from N(0.05, 0.01^2) as the authors' code does."""
    if config.prior_init == "data":
        vae.prior.init_from(data.train_x, torch.Generator().manual_seed(config.seed))
    elif config.prior_init == "authors":
        vae.prior.init_normal(torch.Generator().manual_seed(config.seed))


VAE_KIND = MODEL_KINDS.builtin(VAEKind())
