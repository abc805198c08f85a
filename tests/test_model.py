"""The VAE as a Pyro program: site names, shapes, plates, handlers, estimators, registries."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import ELBO, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import InputError
from pyro_vae.inference import estimators
from pyro_vae.models.likelihoods import Bernoulli, Gaussian, make_likelihood
from pyro_vae.models.vae import VAE, build_vae

N, Z_DIM, HIDDEN = 4, 3, (16,)
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 8, 8)]
ENCODERS = ["mlp", "conv"]
LIKELIHOODS = ["bernoulli", "gaussian"]


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def make_vae(shape=(1, 8, 8), encoder="mlp", likelihood="bernoulli", **options) -> VAE:
    return build_vae(shape, encoder=encoder, hidden=HIDDEN, z_dim=Z_DIM, likelihood=likelihood, **options)


def make_x(shape=(1, 8, 8), likelihood="bernoulli", n=N) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if likelihood == "bernoulli":
        return torch.rand(n, *shape, generator=g).round()
    return torch.randn(n, *shape, generator=g)


def sample_sites(trace) -> dict:
    """The sample sites of a trace, less the plates' subsample sites."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def assert_in_data_plate(site, size: int) -> None:
    frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    assert len(frames) == 1, site["cond_indep_stack"]
    assert frames[0].size == size and frames[0].dim == -1


# ----------------------------------------------------------------------------- traces

combos = pytest.mark.parametrize(
    "shape, encoder, likelihood",
    [(s, e, lik) for s in SHAPES for e in ENCODERS for lik in LIKELIHOODS],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)


@combos
def test_guide_trace(shape, encoder, likelihood):
    vae, x = make_vae(shape, encoder, likelihood), make_x(shape, likelihood)
    trace = poutine.trace(vae.guide).get_trace(x)
    sites = sample_sites(trace)
    assert set(sites) == {"z"}
    z = sites["z"]
    assert not z["is_observed"]
    assert z["value"].shape == (N, Z_DIM)
    assert z["fn"].event_shape == (Z_DIM,) and z["fn"].batch_shape == (N,)
    assert z["fn"].has_rsample  # reparameterized: gradients flow through z into the encoder
    assert_in_data_plate(z, N)
    assert torch.isfinite(z["fn"].log_prob(z["value"])).all()


@combos
def test_model_trace(shape, encoder, likelihood):
    vae, x = make_vae(shape, encoder, likelihood), make_x(shape, likelihood)
    trace = poutine.trace(vae.model).get_trace(x)
    sites = sample_sites(trace)
    assert set(sites) == {"z", "x"}
    z, obs = sites["z"], sites["x"]
    assert not z["is_observed"]
    assert z["value"].shape == (N, Z_DIM) and z["fn"].event_shape == (Z_DIM,)
    assert obs["is_observed"] and obs["value"] is x
    assert obs["fn"].event_shape == shape and obs["fn"].batch_shape == (N,)
    for site in (z, obs):
        assert_in_data_plate(site, N)
    trace.compute_log_prob()
    assert obs["log_prob"].shape == (N,) and torch.isfinite(obs["log_prob"]).all()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_model_generates_without_data(encoder, likelihood):
    shape = (1, 8, 8)
    vae = make_vae(shape, encoder, likelihood)
    trace = poutine.trace(vae.model).get_trace(None, n=5)
    out = trace.nodes["_RETURN"]["value"]
    assert out.shape == (5, *shape)
    sites = sample_sites(trace)
    assert not sites["x"]["is_observed"] and torch.equal(sites["x"]["value"], out)
    assert sites["z"]["value"].shape == (5, Z_DIM)
    assert_in_data_plate(sites["x"], 5)
    if likelihood == "bernoulli":
        assert set(out.unique().tolist()) <= {0.0, 1.0}
    else:
        assert out.unique().numel() > 2  # continuous draws


def test_generated_examples_come_from_the_decoded_z():
    vae = make_vae(likelihood="gaussian", sigma=1e-3)
    trace = poutine.trace(vae.model).get_trace(None, n=6)
    z, x = trace.nodes["z"]["value"], trace.nodes["x"]["value"]
    torch.testing.assert_close(x, vae.decode(z), atol=1e-2, rtol=0)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_vectorized_particle_plate(encoder):
    k, shape = 7, (1, 8, 8)
    vae, x = make_vae(shape, encoder), make_x(shape)
    with pyro.plate("particles", k, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (k, N, Z_DIM)
    assert not torch.allclose(z[0], z[1])  # independent draws per particle
    assert torch.equal(model_trace.nodes["z"]["value"], z)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (k, N)
    # each particle's x log-likelihood is that of its own z, one example at a time
    lik = vae.likelihood(vae.decoder(z[2, 1]))
    torch.testing.assert_close(model_trace.nodes["x"]["log_prob"][2, 1], lik.log_prob(x[1]))


def test_log_weights_are_log_p_minus_log_q():
    vae, x = make_vae(), make_x()
    pyro.set_rng_seed(5)
    log_w = estimators.log_weights(vae.model, vae.guide, x, num_particles=5)
    assert log_w.shape == (5, N) and torch.isfinite(log_w).all()
    pyro.set_rng_seed(5)  # the same draws of z again
    model_trace, guide_trace = estimators.traces(vae.model, vae.guide, x, 5)
    expected = (
        model_trace.nodes["x"]["log_prob"]
        + model_trace.nodes["z"]["log_prob"]
        - guide_trace.nodes["z"]["log_prob"]
    )
    torch.testing.assert_close(log_w, expected)


# ----------------------------------------------------------------------------- estimators


def grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("particles", [1, 3])
@pytest.mark.parametrize("name", ["mc", "analytic"])
def test_estimator_loss_is_finite_and_differentiable(name, particles, encoder):
    vae, x = make_vae(encoder=encoder), make_x()
    elbo = estimators.make_estimator(name, particles)
    assert isinstance(elbo, {"mc": Trace_ELBO, "analytic": TraceMeanField_ELBO}[name])
    assert elbo.num_particles == particles
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and torch.isfinite(loss)
    assert loss.requires_grad
    loss.backward()
    assert grad_norm(vae.encoder) > 0
    assert grad_norm(vae.decoder) > 0


@pytest.mark.parametrize("name", ["mc", "analytic"])
def test_estimator_agrees_with_importance_weights(name):
    """Both estimators are unbiased for the ELBO = E_q[log w]: with many particles their loss
    matches -sum_n mean_k log w_k(x_n) within a few Monte Carlo standard errors."""
    k = 400
    vae, x = make_vae(), make_x()
    with torch.no_grad():
        log_w = estimators.log_weights(vae.model, vae.guide, x, num_particles=k)
        loss = estimators.make_estimator(name, k).loss(vae.model, vae.guide, x)
    per_particle = log_w.sum(-1)  # the ELBO of the batch, one value per particle
    stderr = float(per_particle.std()) / math.sqrt(k)
    assert abs(loss + float(per_particle.mean())) < 5 * math.sqrt(2) * stderr


def test_elbo_object_passes_through():
    elbo = Trace_ELBO(num_particles=2)
    assert estimators.make_estimator(elbo) is elbo
    assert isinstance(estimators.make_estimator("mc"), ELBO)


def test_unknown_estimator_raises_input_error():
    with pytest.raises(InputError, match="unknown estimator 'iwae-typo'"):
        estimators.make_estimator("iwae-typo")


@pytest.mark.parametrize("particles", [0, -2])
def test_non_positive_particles_raise_input_error(particles):
    with pytest.raises(InputError, match="--particles"):
        estimators.make_estimator("mc", particles)


# ----------------------------------------------------------------------------- registries


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"prior": "no-such-prior"}, "unknown prior 'no-such-prior'"),
        ({"likelihood": "poisson"}, "unknown likelihood 'poisson'"),
        ({"encoder": "resnet"}, "unknown encoder 'resnet'"),
        ({"likelihood": "gaussian", "sigma": 0.0}, "--sigma"),
        ({"likelihood": "gaussian", "sigma": -1.0}, "--sigma"),
        ({"likelihood": "gaussian", "sigma": float("nan")}, "--sigma"),
    ],
    ids=["prior", "likelihood", "encoder", "sigma-0", "sigma-neg", "sigma-nan"],
)
def test_bad_build_options_raise_input_error(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        build_vae((1, 8, 8), hidden=HIDDEN, z_dim=Z_DIM, **kwargs)


def test_conv_encoder_refuses_tiny_images():
    with pytest.raises(InputError, match="4x4"):
        build_vae((1, 3, 3), encoder="conv", hidden=HIDDEN, z_dim=Z_DIM)


def test_gaussian_sigma_is_used():
    vae = make_vae(likelihood="gaussian", sigma=0.25)
    assert isinstance(vae.likelihood, Gaussian) and vae.likelihood.sigma == 0.25
    p = vae.likelihood(torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(p.base_dist.scale, torch.full((2, 1, 8, 8), 0.25))
    assert p.event_shape == (1, 8, 8)


# ----------------------------------------------------------------------------- likelihood support


@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan"), float("inf")])
def test_bernoulli_check_refuses_values_outside_unit_interval(bad):
    x = torch.tensor([0.0, 0.5, 1.0, bad])
    with pytest.raises(InputError) as info:
        Bernoulli().check(x)
    message = str(info.value)
    assert "bernoulli" in message and "[0, 1]" in message
    assert "\n" not in message


def test_bernoulli_check_accepts_unit_interval():
    x = torch.tensor([0.0, 0.25, 1.0])
    Bernoulli().check(x)  # raises on failure
    assert Bernoulli().in_support(x)
    assert make_likelihood("bernoulli").in_support(torch.rand(3, 1, 4, 4))


def test_gaussian_check_accepts_any_finite_values():
    x = torch.tensor([-1e4, -2.5, 0.0, 0.5, 3.0, 1e6])
    with pytest.warns(UserWarning, match="far wider than the"):
        Gaussian().check(x)  # raises on failure; warns of the scale
    assert Gaussian().in_support(x)
    assert not Bernoulli().in_support(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gaussian_check_refuses_non_finite(bad):
    with pytest.raises(InputError, match="gaussian"):
        Gaussian().check(torch.tensor([0.0, bad]))


# ----------------------------------------------------------------------------- handlers


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive_runs_model_and_guide(parallel):
    shape = (1, 8, 8)
    vae, x = make_vae(shape, "conv"), make_x(shape)
    samples = Predictive(vae.model, guide=vae.guide, num_samples=3, parallel=parallel)(x)
    assert "z" in samples
    assert samples["z"].shape == (3, N, Z_DIM)
    assert not torch.allclose(samples["z"][0], samples["z"][1])  # three draws of z
    if "x" in samples:
        assert samples["x"].shape == (3, N, *shape)


def test_predictive_draws_z_from_the_guide():
    vae, x = make_vae(), make_x()
    with torch.no_grad():  # make q(z|x) almost a point mass far from the prior's bulk
        vae.encoder.net[-1].bias[:Z_DIM] += 8.0
        vae.encoder.net[-1].bias[Z_DIM:] = -30.0
        loc, scale = vae.encoder(x)
    assert float(scale.max()) < 2e-4 and float(loc.min()) > 4.0
    samples = Predictive(vae.model, guide=vae.guide, num_samples=3)(x)
    torch.testing.assert_close(samples["z"], loc.expand(3, N, Z_DIM), atol=1e-3, rtol=0)


def test_model_conditioned_on_z_uses_it():
    vae, x = make_vae(likelihood="gaussian"), make_x(likelihood="gaussian")
    z = torch.randn(N, Z_DIM, generator=torch.Generator().manual_seed(2))
    trace = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    assert trace.nodes["z"]["is_observed"] and torch.equal(trace.nodes["z"]["value"], z)
    torch.testing.assert_close(trace.nodes["x"]["fn"].mean, vae.decode(z))
