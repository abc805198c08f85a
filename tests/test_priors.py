"""Priors: each log_prob against an independent computation, sample moments, gradients through the
ELBO, Pyro's handlers, and every prior x likelihood pair giving a finite differentiable loss."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from torch.nn import functional as F

from pyro_vae.config import Config
from pyro_vae.data import load_dataset
from pyro_vae.errors import InputError
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.models.exemplar import ExemplarPrior, use_training_set
from pyro_vae.models.kind import check_config
from pyro_vae.models.likelihoods import LIKELIHOODS
from pyro_vae.models.priors import MIN_SCALE, PRIORS, VampPrior, make_prior
from pyro_vae.models.vae import VAE, build_vae

Z_DIM, SHAPE, HIDDEN, K = 3, (1, 8, 8), (16,), 4


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)


def make_vae(prior: str, likelihood: str = "bernoulli", **options) -> VAE:
    options.setdefault("prior_components", K)
    vae = build_vae(SHAPE, hidden=HIDDEN, z_dim=Z_DIM, prior=prior, likelihood=likelihood, **options)
    use_training_set(vae, torch.rand(2 * K, *SHAPE, generator=torch.Generator().manual_seed(8)))  # exemplars
    return vae


@torch.no_grad()
def scramble(vae: VAE) -> None:
    """Move the prior's own parameters away from their initial values (spread-out, unequal
    components), so that a test cannot pass by the symmetry of the starting point."""
    g = torch.Generator().manual_seed(3)
    draws = {"logits": lambda shape: torch.randn(shape, generator=g),
             "loc": lambda shape: 3 * torch.randn(shape, generator=g),
             "raw_scale": lambda shape: 0.7 * torch.randn(shape, generator=g),
             "pseudo_inputs": lambda shape: torch.rand(shape, generator=g),
             "log_variance": lambda shape: 0.7 * torch.randn(shape, generator=g)}
    for name, p in vae.prior.named_parameters():
        if name in draws:
            p.copy_(draws[name](p.shape))
    if isinstance(vae.prior, VampPrior | ExemplarPrior):  # spread the encoder's posteriors, too
        vae.encoder.net[-1].bias.copy_(2 * torch.randn(vae.encoder.net[-1].bias.shape, generator=g))


def normal_log_pdf(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, diag scale^2), summed over the last dimension, written out."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


@torch.no_grad()
def components(vae: VAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log weights (K,), means (K, z_dim), scales (K, z_dim)) of the prior, read off its parameters
    (a single component for the Gaussian priors)."""
    prior = vae.prior
    if isinstance(prior, VampPrior):  # 1/K sum_k q(z | u_k), through the guide's encoder
        loc, scale = vae.encoder(prior.pseudo_inputs)
        return torch.full((loc.shape[0],), -math.log(loc.shape[0])), loc, scale
    if isinstance(prior, ExemplarPrior):  # 1/N sum_n N(z | mu(x_n), sigma^2 I), all exemplars (none left out)
        loc = vae.encoder(prior.exemplars)[0]
        scale = (0.5 * prior.log_variance).exp().expand(loc.shape)
        return torch.full((loc.shape[0],), -math.log(loc.shape[0])), loc, scale
    if hasattr(prior, "logits"):
        return prior.logits.log_softmax(-1), prior.loc, F.softplus(prior.raw_scale) + MIN_SCALE
    if hasattr(prior, "raw_scale"):
        return torch.zeros(1), prior.loc[None], (F.softplus(prior.raw_scale) + MIN_SCALE)[None]
    return torch.zeros(1), torch.zeros(1, Z_DIM), torch.ones(1, Z_DIM)


def expected_log_prob(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """log p(z) = logsumexp_k (log w_k + log N(z; mu_k, sigma_k)), by hand."""
    log_w, loc, scale = components(vae)
    return torch.logsumexp(log_w + normal_log_pdf(z[..., None, :], loc, scale), dim=-1)


priors = pytest.mark.parametrize("prior", list(PRIORS))


# ----------------------------------------------------------------------------- the distribution


@priors
def test_prior_is_a_distribution_over_one_latent_vector(prior):
    vae = make_vae(prior)
    p = vae.prior()
    assert p.event_shape == (Z_DIM,) and p.batch_shape == ()
    assert p.sample().shape == (Z_DIM,)
    assert p.sample((5,)).shape == (5, Z_DIM)


@priors
def test_prior_follows_the_module_dtype(prior):
    """The prior's tensors are the module's, so `.to(device)` / `.double()` carries the distribution."""
    vae = make_vae(prior).double()
    p = vae.prior()
    assert p.sample().dtype == torch.float64
    assert p.log_prob(torch.zeros(Z_DIM, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.cuda
@priors
def test_prior_lives_on_the_module_device(prior):
    vae = make_vae(prior).cuda()
    p = vae.prior()
    assert p.sample().device.type == "cuda"
    assert p.log_prob(torch.zeros(Z_DIM, device="cuda")).device.type == "cuda"


@priors
def test_log_prob_matches_explicit_mixture_of_normal_densities(prior):
    vae = make_vae(prior)
    scramble(vae)
    z = 3 * torch.randn(7, 5, Z_DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(vae.prior().log_prob(z), expected_log_prob(vae, z))


def test_vamp_log_prob_is_the_average_of_the_encoder_densities_at_the_pseudo_inputs():
    """log p(z) = log (1/K sum_k N(z; mu(u_k), sigma(u_k))), the average taken in density space."""
    vae = make_vae("vamp")
    scramble(vae)
    vae.double()  # densities, not log densities: float64 keeps them away from underflow
    with torch.no_grad():
        z = vae.prior().sample((6,))
        loc, scale = vae.encoder(vae.prior.pseudo_inputs)
        densities = torch.stack([normal_log_pdf(z, loc[k], scale[k]).exp() for k in range(K)])
        torch.testing.assert_close(vae.prior().log_prob(z), densities.mean(0).log())


@priors
def test_model_site_z_has_the_prior_log_prob_under_plates(prior):
    """Inside the data plate and a vectorized particle plate, the model's z site scores z with p(z)."""
    vae = make_vae(prior)
    scramble(vae)
    x = torch.rand(5, *SHAPE).round()
    z = torch.randn(3, 5, Z_DIM, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), pyro.plate("particles", 3, dim=-2):
        trace = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["z"]["fn"].batch_shape == (3, 5)
    torch.testing.assert_close(trace.nodes["z"]["log_prob"], expected_log_prob(vae, z))


@priors
def test_samples_have_the_prior_mean_and_covariance(prior):
    """Mean sum_k w_k mu_k and covariance sum_k w_k (diag sigma_k^2 + mu_k mu_k^T) - mean mean^T,
    within 5 standard errors of the sample estimates (20 000 draws)."""
    n = 20_000
    vae = make_vae(prior)
    scramble(vae)
    with torch.no_grad():
        log_w, loc, scale = components(vae)
        w = log_w.exp()
        mean = (w[:, None] * loc).sum(0)
        second = (w[:, None, None] * (torch.diag_embed(scale**2) + loc[:, :, None] * loc[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        pyro.set_rng_seed(7)
        z = vae.prior().sample((n,))
    assert z.shape == (n, Z_DIM)
    assert ((z.mean(0) - mean).abs() < 5 * (cov.diagonal() / n).sqrt()).all()
    centred = z - z.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    se = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - cov).abs() < 5 * se).all(), (products.mean(0), cov)


def test_mixture_samples_visit_every_component_in_proportion():
    """Well separated components: the share of draws nearest each mean matches its weight."""
    n = 8000
    vae = make_vae("mog")
    with torch.no_grad():
        vae.prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        vae.prior.loc.copy_(20 * torch.eye(K, Z_DIM))
        vae.prior.raw_scale.fill_(-2.0)
        z = vae.prior().sample((n,))
    nearest = torch.cdist(z, vae.prior.loc).argmin(-1)
    share = torch.bincount(nearest, minlength=K) / n
    w = vae.prior.logits.detach().softmax(-1)
    assert ((share - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()


# ----------------------------------------------------------------------------- parameters


def test_learned_prior_starts_at_the_standard_normal():
    p = make_prior("learned", Z_DIM)()
    torch.testing.assert_close(p.base_dist.loc.detach(), torch.zeros(Z_DIM))
    torch.testing.assert_close(p.base_dist.scale.detach(), torch.ones(Z_DIM))


def test_mixture_means_start_spread_out():
    prior = make_prior("mog", Z_DIM, prior_components=10)
    assert prior.loc.shape == (10, Z_DIM)
    assert float(torch.pdist(prior.loc.detach()).min()) > 0.01
    assert prior.logits.shape == (10,) and prior.raw_scale.shape == (10, Z_DIM)


def test_default_number_of_components():
    """The issue's defaults: K = 10 for the mixture, K = 500 pseudo-inputs for the VampPrior."""
    vae = build_vae(SHAPE, hidden=HIDDEN, z_dim=Z_DIM, prior="vamp")
    assert vae.prior.pseudo_inputs.shape == (500, *SHAPE)
    assert make_prior("mog", Z_DIM).logits.shape == (10,)
    assert make_prior("mog", Z_DIM, prior_components=None).logits.shape == (10,)


def test_vamp_pseudo_inputs_go_through_the_guide_encoder():
    vae = make_vae("vamp", encoder="conv")
    assert vae.prior.encoder is vae.encoder
    assert vae.prior.pseudo_inputs.shape == (K, *SHAPE)
    # one set of encoder parameters, shared: the optimizer sees each once
    names = [name for name, _ in vae.named_parameters()]
    assert sum(name.endswith("pseudo_inputs") for name in names) == 1
    assert len(list(vae.parameters())) == len({id(p) for p in vae.parameters()})


def test_vamp_init_from_data_copies_examples():
    vae = make_vae("vamp")
    x = torch.rand(10, *SHAPE)
    vae.prior.init_from(x, torch.Generator().manual_seed(0))
    for u in vae.prior.pseudo_inputs.detach():
        assert any(torch.equal(u, row) for row in x)
    vae.prior.init_from(x[:2])  # fewer examples than components: drawn with replacement
    assert all(any(torch.equal(u, row) for row in x[:2]) for u in vae.prior.pseudo_inputs.detach())
    with pytest.raises(InputError, match="shape"):
        vae.prior.init_from(torch.rand(10, 1, 4, 4))


@pytest.mark.parametrize("prior", ["learned", "mog", "vamp"])
def test_prior_parameters_get_gradients_through_the_elbo(prior):
    vae = make_vae(prior)
    scramble(vae)
    x = torch.rand(6, *SHAPE).round()
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    own = {name: p for name, p in vae.prior.named_parameters() if not name.startswith("encoder.")}
    assert own
    for name, p in own.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, name


def test_vamp_prior_sends_gradients_into_the_encoder():
    """p(z) itself depends on the encoder: log p(z) at a fixed z has a gradient in its weights."""
    vae = make_vae("vamp")
    vae.prior().log_prob(torch.randn(4, Z_DIM)).sum().backward()
    assert all(float(p.grad.abs().max()) > 0 for p in vae.encoder.parameters())


@priors
def test_predictive_generates_from_every_prior(prior):
    vae = make_vae(prior)
    samples = Predictive(vae.model, num_samples=3, return_sites=["z", "x"])(None, n=5)
    assert samples["z"].shape == (3, 5, Z_DIM) and samples["x"].shape == (3, 5, *SHAPE)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("k", [0, -3])
def test_non_positive_components_raise_input_error(k):
    with pytest.raises(InputError, match="--prior-components"):
        make_vae("mog", prior_components=k)
    with pytest.raises(InputError, match="--prior-components"):
        Config.from_dict({"prior": "vamp", "prior_components": k})


def test_config_records_the_prior_options():
    config = Config.from_dict({"prior": "mog", "prior_components": 3})
    assert config.prior_components == 3 and config.to_dict()["prior_components"] == 3
    assert Config().prior_components is None  # each prior's own default
    with pytest.raises(InputError, match="unknown prior 'vampire'"):
        check_config(Config.from_dict({"prior": "vampire"}))


# ----------------------------------------------------------------------------- all pairs


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    """Sixteen grey-valued digits in [0, 1]: in the support of every likelihood."""
    return load_dataset("digits").train_x[:16]


LIKELIHOOD_VARIANTS = [(name, "shared") for name in LIKELIHOODS] + [
    ("gaussian-learned", "pixel"), ("laplace-learned", "pixel")
]


@priors
@pytest.mark.parametrize("likelihood, sigma_mode", LIKELIHOOD_VARIANTS, ids=lambda v: v)
@pytest.mark.parametrize("estimator", ["mc", "analytic"])
@pytest.mark.filterwarnings("ignore")  # analytic KL falling back to Monte Carlo may warn; not checked here
def test_every_prior_and_likelihood_give_a_finite_differentiable_loss(
    prior, likelihood, sigma_mode, estimator, digits_batch
):
    x = digits_batch
    vae = build_vae(x.shape[1:], hidden=HIDDEN, z_dim=Z_DIM, prior=prior, likelihood=likelihood,
                    sigma_mode=sigma_mode, prior_components=K)
    use_training_set(vae, x)  # the exemplar prior's exemplars; nothing for the others
    vae.likelihood.check(x)
    loss = make_estimator(estimator, particles=2).differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (vae.encoder, vae.decoder, vae.prior, vae.likelihood):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert not grads or sum(float(g.abs().sum()) for g in grads) > 0


def test_the_standard_normal_prior_computes_what_normal_computes_bit_for_bit():
    """UnitNormal drops the terms that vanish at loc 0, scale 1; log p(z), KL(q || p) and their gradients
    must stay exactly torch's Normal values, also on particle-shaped z."""
    from torch.distributions import kl_divergence

    def values_and_grads(prior):
        torch.manual_seed(0)
        mu, s = torch.randn(64, 20).requires_grad_(), (torch.rand(64, 20) + 0.01).requires_grad_()
        z = mu + s * torch.randn(5, 64, 20) * 4  # particles, and values far in the tails
        q, p = pyro.distributions.Normal(mu, s).to_event(1), prior.expand([64])
        log_p, kl = p.log_prob(z), kl_divergence(q, p)
        return (log_p, kl, *torch.autograd.grad(log_p.sum() + kl.sum(), (mu, s)))

    unit = make_prior("normal", z_dim=20)()
    plain = pyro.distributions.Normal(torch.zeros(20), torch.ones(20)).to_event(1)
    assert type(unit.base_dist).__name__ == "UnitNormal"
    from torch.distributions.kl import _dispatch_kl  # the short formula is the one torch picks

    from pyro_vae.models.priors import _kl_normal_unit_normal
    assert _dispatch_kl(pyro.distributions.Normal, type(unit.base_dist)) is _kl_normal_unit_normal
    for a, b in zip(values_and_grads(unit), values_and_grads(plain), strict=True):
        assert torch.equal(a, b)
