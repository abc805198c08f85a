"""The hierarchical VAE with two stochastic layers (the VampPrior paper's HVAE and ConvHVAE, Tomczak &
Welling 2018), as one Pyro program:

    model  p(z2) p(z1|z2) p(x|z1, z2)        guide  q(z2|x) q(z1|x, z2)

Sites: latents "z2" then "z1" (in both, in that order), observation "x", all inside the data plate
"data" (dim -1). p(z2) is any prior of the registry (priors.py), the VampPrior included: its
pseudo-inputs go through q(z2|x)'s network. The networks are hvae_nets.py's. Every estimator sees
two latent sites; the analytic one has KL(q(z1|x, z2) || p(z1|z2)) in closed form (Normal/Normal,
at the sampled z2) and KL(q(z2|x) || p(z2)) where the prior allows it.

Parameters reach Pyro's param store as the VAE's do (model.py, param_store.py): model() registers
the prior, p(z1|z2), the decoder and the likelihood, guide() the two encoders, under their
state_dict names prefixed "hvae$$$".

Its model kind ("hvae", HVAEKind) is the VAE's (settings, objective, metrics, evaluation, figures)
with its own building and its own guide: a guide family (--guide) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from torch import Tensor, nn

from ..errors import InputError
from ..param_store import RegisteringModule
from .hvae_nets import ConditionalPrior, JointDecoder, JointEncoder, TopEncoder
from .kind import MODEL_KINDS, check_encoder_scale
from .likelihoods import Likelihood, make_likelihood
from .nets import NETWORKS
from .priors import make_prior
from .vae import VAEKind

HVAE_ENCODERS = ("mlp", "gated-mlp", "conv")  # conv: the authors' ConvHVAE (gated convolutions)


class HVAE(RegisteringModule):
    """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1, z2) with q(z1, z2|x) = q(z2|x) q(z1|x, z2), every
    conditional a diagonal Gaussian from a network but p(z2) (the prior module) and p(x|z1, z2)
    (likelihood(decoder(z1, z2)))."""

    model_kind = "hvae"
    param_prefix = "hvae"

    def __init__(self, q_z2: nn.Module, q_z1: nn.Module, p_z1: nn.Module, decoder: nn.Module,
                 prior: nn.Module, likelihood: Likelihood):
        super().__init__()
        self.q_z2 = q_z2  # first: the VampPrior reaches it too, and its tensors keep the name "q_z2..."
        self.q_z1 = q_z1
        self.p_z1 = p_z1
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood

    def model(self, x: Tensor | None = None, n: int | None = None) -> Tensor:
        """p(z2) p(z1|z2) p(x|z1, z2) for a batch x (N, C, H, W); with x=None it generates n examples."""
        self.register_parts("prior", "p_z1", "decoder", "likelihood")
        with pyro.plate("data", n if x is None else x.shape[0]):
            z2 = pyro.sample("z2", self.prior())
            z1 = pyro.sample("z1", dist.Normal(*self.p_z1(z2)).to_event(1))
            return pyro.sample("x", self.likelihood(self.decoder(z1, z2)), obs=x)

    def guide(self, x: Tensor, n: int | None = None) -> Tensor:
        """q(z2|x) q(z1|x, z2), both reparameterized: z2 = mu(x) + sigma(x) eps2, then
        z1 = mu(x, z2) + sigma(x, z2) eps1."""
        self.register_parts("q_z2", "q_z1")
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.posterior(x))
            return pyro.sample("z1", self.posterior_z1(x, z2))

    def posterior(self, x: Tensor) -> dist.Distribution:
        """q(z2|x), the top layer's posterior, as a distribution (without running Pyro)."""
        return dist.Normal(*self.q_z2(x)).to_event(1)

    def posterior_z1(self, x: Tensor, z2: Tensor) -> dist.Distribution:
        """q(z1|x, z2) as a distribution, for a draw z2 of q(z2|x)."""
        return dist.Normal(*self.q_z1(x, z2)).to_event(1)

    def sample_latents(self, n: int) -> dict[str, Tensor]:
        """n draws of (z2, z1) from p(z2) p(z1|z2), by site name: what `decode` turns into images."""
        z2 = self.prior().sample((n,))
        return {"z2": z2, "z1": dist.Normal(*self.p_z1(z2)).to_event(1).sample()}

    def decode(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The mean of p(x|z1, z2): what a picture of decoded latents shows."""
        return self.likelihood.mean(self.decoder(z1, z2))


def build_hvae(
    x_shape: Sequence[int],
    encoder: str = "gated-mlp",
    hidden: Sequence[int] = (300, 300),
    z_dim: int = 40,
    prior: str = "normal",
    likelihood: str = "bernoulli",
    **options,
) -> HVAE:
    """An HVAE with z1 and z2 of z_dim each, from registry names; `encoder` 'mlp' or 'gated-mlp'
    (dense layers `hidden`, the authors' HVAE with gated ones) or 'conv' (the authors' ConvHVAE).
    `options` go to the likelihood and prior factories (sigma, sigma_mode, prior_components,
    exemplar_subset, exemplar_k, pseudo_inputs)."""
    if encoder not in HVAE_ENCODERS:
        known = f"choose one of {', '.join(HVAE_ENCODERS)}"
        raise InputError(f"unknown encoder {encoder!r} for --model hvae: {known}" if encoder not in NETWORKS
                         else f"--encoder {encoder} is not built for --model hvae: {known}")
    lik = make_likelihood(likelihood, **options)
    gated, conv = encoder != "mlp", encoder == "conv"
    x_shape = tuple(x_shape)
    out_shape = (x_shape[0] * lik.params_per_pixel, *x_shape[1:])
    q_z2 = TopEncoder(x_shape, hidden, z_dim, gated, conv)
    return HVAE(
        q_z2, JointEncoder(x_shape, hidden, z_dim, gated, conv), ConditionalPrior(hidden, z_dim, gated),
        JointDecoder(x_shape, hidden, z_dim, out_shape, gated, conv),
        make_prior(prior, z_dim, encoder=q_z2, x_shape=x_shape, **options), lik,
    )


class HVAEKind(VAEKind):
    """--model hvae: the VAE's settings but a guide family (its guide is q(z2|x) q(z1|x, z2), diagonal
    Gaussians from its own networks), its objective, metrics, evaluation and figures; z1 and z2 of
    --z-dim each; the exemplar prior, like every prior, on z2."""

    name = "hvae"
    figures = ("samples.png", "reconstructions.png", "latent_map.png")  # a traversal takes one site

    def check(self, config) -> None:
        super().check(config)
        if config.guide != "diagonal":
            raise InputError(f"--guide {config.guide} is a family for --model vae's single latent; "
                             "--model hvae has its own guide q(z2|x) q(z1|x, z2) (diagonal Gaussians): "
                             "drop --guide")
        check_encoder_scale(config, self)  # its networks clamp their log-variances (clamped_scale)

    def build(self, config, x_shape: tuple[int, ...]) -> HVAE:
        return build_hvae(x_shape, encoder=config.encoder, hidden=config.hidden, z_dim=config.z_dim,
                          prior=config.prior, likelihood=config.likelihood, sigma=config.sigma,
                          sigma_mode=config.sigma_mode, prior_components=config.prior_components,
                          exemplar_subset=config.exemplar_subset, exemplar_k=config.exemplar_k,
                          pseudo_inputs=config.pseudo_inputs)

    def evaluation_notes(self, result: dict, config) -> list[str]:
        return [f"active units {result['active_units']} of {2 * config.z_dim} (z1 and z2); "
                f"{result['n_examples']} test examples"]


HVAE_KIND = MODEL_KINDS.builtin(HVAEKind())
