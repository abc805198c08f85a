"""The estimators of the registry: what each one estimates, in expectation, and what its gradient is.

Tolerances are standard errors over repeated draws (z-scores of 4 to 4.5: a false failure is rarer
than 1 in 10,000). The gradient references are brute force on a one-latent linear-Gaussian model:
Gauss-Hermite quadrature where the integrand is a polynomial (the ELBO), and a hundred thousand
float64 draws through a closed-form log w where it is not (IWAE).
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_vae import build_vae
from pyro_vae.config import Config
from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare_measures import gradient_stats
from pyro_vae.inference import iwae
from pyro_vae.inference.estimators import ESTIMATORS, make_estimator
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import prepare_data, train

from .conftest import N_SE

Z = 4.5  # z-score bound for one comparison among a handful


class Tiny(nn.Module):
    """p(z) = N(0, 1), p(x|z) = N(a z + b, I) on R^2; q(z|x) = N(c.x + d, exp(s)^2). The guide is
    deliberately off the exact posterior, so the IWAE weights vary. `size` subsamples the data plate."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.5, -0.8]))
        self.b = nn.Parameter(torch.tensor([0.3, 0.1]))
        self.c = nn.Parameter(torch.tensor([0.2, 0.1]))
        self.d = nn.Parameter(torch.tensor(0.9))
        self.s = nn.Parameter(torch.tensor(0.0))

    def model(self, x, size=None):
        with pyro.plate("data", x.shape[0], subsample_size=size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z * self.a + self.b, 1.0).to_event(1), obs=x[idx])

    def guide(self, x, size=None):
        with pyro.plate("data", x.shape[0], subsample_size=size) as idx:
            loc = (x[idx] * self.c).sum(-1, keepdim=True) + self.d
            pyro.sample("z", dist.Normal(loc, self.s.exp()).to_event(1))

    def log_w(self, x, eps):
        """log p(x, z) - log q(z|x) at z = loc(x) + exp(s) eps, in closed form; eps (..., N)."""
        loc, scale = x @ self.c + self.d, self.s.exp()
        z = loc + scale * eps
        log_lik = dist.Normal(z[..., None] * self.a + self.b, 1.0).log_prob(x).sum(-1)
        return dist.Normal(0.0, 1.0).log_prob(z) + log_lik - dist.Normal(loc, scale).log_prob(z)


X0 = torch.tensor([[1.0, -1.0], [-0.5, 2.0]])


def _grad(module, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])


def _gradient_draws(estimator, tiny, copies=2000, repeats=40, seed=0):
    """`repeats` draws of the loss gradient on X0, each the mean over `copies` independent draws."""
    x = X0.repeat(copies, 1)
    pyro.set_rng_seed(seed)
    return torch.stack([_grad(tiny, estimator.differentiable_loss(tiny.model, tiny.guide, x) / copies)
                        for _ in range(repeats)])


def _assert_unbiased(draws, reference, reference_se=0.0):
    se = (draws.var(0) / len(draws) + reference_se**2).sqrt()
    z = (draws.mean(0) - reference) / se
    assert z.abs().max() < Z, f"z-scores {z.numpy().round(2)}"


@pytest.fixture(scope="module")
def trained(digits_run):
    """The session's trained digits VAE and 48 test images."""
    config, vae = load_model(digits_run)
    return vae, prepare_data(config).test_x[:48]


@pytest.fixture(scope="module")
def fresh():
    """An untrained small VAE with many latent units on 48 digits: the decoder barely uses z, so the
    KL term's Monte Carlo noise is a large share of the ELBO estimate's."""
    torch.manual_seed(0)
    return build_vae((1, 8, 8), hidden=[32], z_dim=32), prepare_data(Config(test_size=48)).test_x


def _bounds(estimator, vae, x, calls, seed, copies=1):
    """`calls` draws of the bound per example, each averaged over `copies` independent draws of the
    batch x (one call on x repeated: fewer calls, the same information about the mean)."""
    pyro.set_rng_seed(seed)
    xs = x.repeat(copies, *([1] * (x.dim() - 1)))
    return -torch.tensor([estimator.loss(vae.model, vae.guide, xs) for _ in range(calls)],
                         dtype=torch.float64) / len(xs)


def _z(a, b):
    """z-score of mean(a) - mean(b) for independent draws."""
    return float(a.mean() - b.mean()) / math.sqrt(float(a.var()) / len(a) + float(b.var()) / len(b))


def test_registry_has_the_five_estimators():
    assert set(ESTIMATORS) == {"mc", "analytic", "iwae", "stl", "iwae-dreg"}


def test_mc_and_analytic_agree_in_mean_and_analytic_has_the_lower_variance(fresh):
    vae, x = fresh
    calls = 60
    mc = _bounds(make_estimator("mc"), vae, x, calls, seed=0)
    analytic = _bounds(make_estimator("analytic"), vae, x, calls, seed=1)
    assert abs(_z(mc, analytic)) < 4
    # with equal variances, the log of the ratio of two sample variances has sd ~ sqrt(2/(R-1) * 2)
    assert math.log(float(mc.var() / analytic.var())) > 4 * math.sqrt(4 / (calls - 1))


def test_iwae_with_one_particle_is_the_elbo(fresh):
    vae, x = fresh
    iwae, mc = make_estimator("iwae", 1), make_estimator("mc", 1)
    for seed in range(3):  # draw for draw, at the same z ...
        assert _bounds(iwae, vae, x, 1, seed) == pytest.approx(_bounds(mc, vae, x, 1, seed), rel=1e-6)
    # ... and so in expectation, on independent draws
    iwae_draws = _bounds(iwae, vae, x, 20, seed=10, copies=5)
    assert abs(_z(iwae_draws, _bounds(mc, vae, x, 20, seed=11, copies=5))) < Z


def test_iwae_is_non_decreasing_in_k_on_average(fresh):
    vae, x = fresh
    bounds = [_bounds(make_estimator("iwae", k), vae, x, 20, seed=k) for k in (1, 3, 10, 50)]
    for smaller, larger in zip(bounds[:-1], bounds[1:], strict=True):
        assert _z(larger, smaller) > -Z
    assert _z(bounds[-1], bounds[0]) > Z  # and it does rise


def test_iwae_scaled_minibatch_bound_is_unbiased_for_the_full_data_bound():
    """With a subsampled data plate (scale N/n), E[minibatch bound] = sum_n E[IWAE_K(x_n)], the scale
    applied after the per-example logsumexp (scaling inside it, as RenyiELBO does, is biased)."""
    tiny = Tiny()
    data = torch.randn(12, 2, generator=torch.Generator().manual_seed(0)) * 1.5
    iwae = make_estimator("iwae", 4)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        full = torch.tensor([-iwae.loss(tiny.model, tiny.guide, data) for _ in range(100)])
        mini = torch.tensor([-iwae.loss(tiny.model, tiny.guide, data, 3) for _ in range(500)])
    se = math.sqrt(float(full.var()) / len(full) + float(mini.var()) / len(mini))
    assert abs(float(full.mean() - mini.mean())) < Z * se, (float(full.mean()), float(mini.mean()), se)


def _hermite(n):
    """Nodes and weights of E_{eps ~ N(0, 1)}[f(eps)] ~ sum_i w_i f(t_i) (exact for degree < 2n)."""
    t, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(t, dtype=torch.float32), torch.tensor(w / math.sqrt(2 * math.pi), dtype=torch.float32)


def test_stl_gradient_is_unbiased_for_the_elbo_gradient():
    tiny = Tiny()
    t, w = _hermite(8)  # log w is quadratic in eps: quadrature is exact
    elbo = (w[:, None] * tiny.log_w(X0, t[:, None])).sum()
    reference = _grad(tiny, -elbo)
    _assert_unbiased(_gradient_draws(make_estimator("stl"), tiny), reference)


def test_stl_and_dreg_encoder_gradients_vanish_when_q_is_the_exact_posterior():
    """At q(z|x) = p(z|x), log w = log p(x) for every z: the path derivative is 0 draw by draw, while
    the full gradient still carries the score term (zero only in expectation)."""
    tiny = Tiny()
    with torch.no_grad():  # the linear-Gaussian posterior: precision 1 + |a|^2, mean a.(x - b) / precision
        precision = 1 + tiny.a.square().sum()
        tiny.c.copy_(tiny.a / precision)
        tiny.d.copy_(-(tiny.a * tiny.b).sum() / precision)
        tiny.s.copy_(-0.5 * precision.log())
    encoder = slice(4, 8)  # c, d, s
    mc = _gradient_draws(make_estimator("mc"), tiny, copies=10, repeats=10)[:, encoder]
    assert mc.std(0).min() > 1e-3
    for estimator in (make_estimator("stl"), make_estimator("iwae-dreg", 3)):
        grads = _gradient_draws(estimator, tiny, copies=10, repeats=10)[:, encoder]
        assert grads.abs().max() < 1e-5


@pytest.fixture(scope="module")
def iwae3_gradient():
    """The gradient of -sum_n IWAE_3(x_n) on X0 by brute force: the mean of 100,000 float64
    reparameterized gradients of the closed-form bound, with its standard error (10 batches)."""
    tiny = Tiny().double()
    generator = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(10):
        eps = torch.randn(10_000, 3, 1, generator=generator, dtype=torch.float64)
        log_w = tiny.log_w(X0.double(), eps)  # (draws, K, N)
        batches.append(_grad(tiny, -(log_w.logsumexp(1) - math.log(3)).mean(0).sum()))
    batches = torch.stack(batches)
    return batches.mean(0).float(), (batches.std(0) / math.sqrt(len(batches))).float()


@pytest.mark.parametrize("name", ["iwae", "iwae-dreg"])
def test_iwae_and_dreg_gradients_are_unbiased_for_the_iwae_gradient(name, iwae3_gradient):
    reference, reference_se = iwae3_gradient
    _assert_unbiased(_gradient_draws(make_estimator(name, 3), Tiny()), reference, reference_se)


def test_dreg_with_one_particle_is_stl():
    tiny = Tiny()
    stl = _gradient_draws(make_estimator("stl"), tiny, copies=5, repeats=3)
    dreg = _gradient_draws(make_estimator("iwae-dreg", 1), tiny, copies=5, repeats=3)
    assert torch.allclose(stl, dreg, rtol=1e-5, atol=1e-6)


def test_dreg_lowers_the_encoder_gradient_variance_at_large_k_and_keeps_the_decoder_gradient(trained):
    vae, x = trained
    repeats = 12
    stats = {}
    for name in ("iwae", "iwae-dreg"):
        pyro.set_rng_seed(0)
        stats[name] = gradient_stats(make_estimator(name, 50), vae, x[:16], repeats)
    iwae, dreg = stats["iwae"], stats["iwae-dreg"]
    # same draws, same decoder gradient (both are sum_k w~_k grad_theta log w_k)
    assert dreg["decoder"]["grad_var"] == pytest.approx(iwae["decoder"]["grad_var"], rel=1e-4)
    ratio = iwae["encoder"]["grad_var"] / dreg["encoder"]["grad_var"]
    assert math.log(ratio) > 4 * math.sqrt(4 / (repeats - 1))
    assert dreg["encoder"]["snr"] > iwae["encoder"]["snr"]


class _ScaleZ(poutine.messenger.Messenger):
    """Multiply the log density of the site "z" only by `scale` (a KL weight)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["name"] == "z":
            msg["scale"] = msg["scale"] * self.scale


def test_stl_keeps_per_site_scales_and_iwae_refuses_them():
    """A KL weight scales the latent site only: STL's value is then Trace_ELBO's weighted ELBO at the
    same draw; the importance-weighted bound has no such weighting and says so."""
    tiny = Tiny()
    model, guide = _ScaleZ(3.0)(tiny.model), _ScaleZ(3.0)(tiny.guide)
    values = {}
    for name in ("mc", "stl"):
        pyro.set_rng_seed(0)
        values[name] = make_estimator(name).loss(model, guide, X0)
    pyro.set_rng_seed(0)
    assert values["stl"] == pytest.approx(values["mc"], rel=1e-6)
    assert values["stl"] != pytest.approx(make_estimator("stl").loss(tiny.model, tiny.guide, X0), rel=1e-3)
    for name in ("iwae", "iwae-dreg"):
        with pytest.raises(ValueError, match="same scale"):
            make_estimator(name, 2).differentiable_loss(model, guide, X0)


def test_a_latent_outside_the_data_plate_is_refused():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'shift' is outside the data plate"):
        make_estimator("iwae", 2).loss(model, guide, X0)


@pytest.mark.parametrize("name", ["iwae", "stl", "iwae-dreg"])
def test_each_new_estimator_trains_a_vae(name, tmp_path):
    config = Config(train_size=100, test_size=20, epochs=1, batch_size=50, eval_k=2, estimator=name,
                    particles=3, seed=0)
    summary = train(config, out=tmp_path / name, progress=False).summary
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["log_px"])


class Mixed(nn.Module):
    """A global latent g, and per example a discrete c (no rsample: Trace_ELBO's score-function
    term, Rao-Blackwellized by the data plate) and a Gaussian z; `mask` hides some examples' z."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 0.3, 0.2, 0.1, -0.2, 0.4]))
        self.mask = torch.tensor([True, False])

    def model(self, x):
        w = self.w
        g = pyro.sample("g", dist.Normal(w[0], 1.0))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(logits=w[1].expand(x.shape[0])))
            with poutine.mask(mask=self.mask):
                z = pyro.sample("z", dist.Normal(g + c * w[2], 1.0))
            pyro.sample("x", dist.Normal(z[..., None].expand(*z.shape, x.shape[-1]), 1.0).to_event(1), obs=x)

    def guide(self, x):
        w = self.w
        pyro.sample("g", dist.Normal(w[3], w[4].exp()))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(logits=x.sum(-1) * w[5]))
            with poutine.mask(mask=self.mask):
                pyro.sample("z", dist.Normal(x.sum(-1) * w[6] + c, 1.0))


class WithAuxiliary(Tiny):
    """Tiny's pair with an auxiliary guide site that z is drawn around (TraceMeanField_ELBO counts its
    entropy term)."""

    def guide(self, x, size=None):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(self.d, 1.0).expand([x.shape[0]]), infer={"is_auxiliary": True})
            loc = (x * self.c).sum(-1, keepdim=True) + a[..., None]
            pyro.sample("z", dist.Normal(loc, self.s.exp()).to_event(1))


def _value_and_gradient(elbo, module, model, guide, x, seed):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, x)
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True, materialize_grads=True)
    return loss.detach(), grads


def _scaled(module):
    """The module's model and guide with the latent site z scaled (a KL weight), and X0."""
    return module, _ScaleZ(0.3)(module.model), _ScaleZ(0.3)(module.guide), X0


def _mog_vae():
    torch.manual_seed(0)
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=2, prior="mog", prior_components=3)
    return vae, vae.model, vae.guide, (torch.rand(3, 1, 4, 4) > 0.5).float()


CASES = {  # estimator name -> (module, model, guide, x): the sites each Pyro code path handles
    "mc": lambda: _scaled(Mixed()),
    "analytic": lambda: _scaled(WithAuxiliary()),
    "analytic, no closed-form KL": _mog_vae,
}


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_our_mc_and_analytic_compute_pyros_value_and_gradient(case, vectorize):
    """At the same draws, our differentiable_loss (no host sync) equals Pyro's Trace_ELBO /
    TraceMeanField_ELBO's in value and gradient, on score-function, masked, scaled, auxiliary and
    Monte Carlo-KL sites, with several particles; `loss` is Pyro's own."""
    name = case.split(",")[0]
    module, model, guide, x = CASES[case]()
    options = {"num_particles": 3, "vectorize_particles": vectorize, "max_plate_nesting": 1}
    ours = ESTIMATORS[name](**options)
    pyros = {"mc": pyro.infer.Trace_ELBO, "analytic": pyro.infer.TraceMeanField_ELBO}[name](**options)
    assert isinstance(ours, type(pyros))
    for seed in range(3):
        value, grads = _value_and_gradient(ours, module, model, guide, x, seed)
        expected_value, expected_grads = _value_and_gradient(pyros, module, model, guide, x, seed)
        assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert any(bool(g.abs().sum() > 0) for g in grads)
        pyro.set_rng_seed(seed)
        loss = ours.loss(model, guide, x)
        pyro.set_rng_seed(seed)
        assert isinstance(loss, float) and loss == pyros.loss(model, guide, x)


# ---- Pyro's checks, and what STL and DReG assume ----

IWAE_FAMILY = ["iwae", "stl", "iwae-dreg"]


class ForgottenLatent(Tiny):
    """Tiny with a second latent u in the model that the guide does not sample."""

    def model(self, x, size=None):
        with pyro.plate("data", x.shape[0]):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z * self.a + self.b + u[..., None], 1.0).to_event(1), obs=x)


class MisshapedObservation(Tiny):
    """Tiny whose observation has an extra dimension, (N, 1, 2): its log density has shape (N, N),
    not the (N,) that its data plate says."""

    def model(self, x, size=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z * self.a + self.b, 1.0).to_event(1), obs=x[:, None, :])


def _warnings_of(elbo, module, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elbo.loss(module.model, module.guide, x)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("name", IWAE_FAMILY)
def test_with_validation_a_model_latent_missing_from_the_guide_warns_as_trace_elbo_does(name):
    module, x = ForgottenLatent(), X0
    with pyro.validation_enabled(True):
        expected = _warnings_of(pyro.infer.Trace_ELBO(), module, x)
        ours = _warnings_of(make_estimator(name, 3), module, x)
    assert expected == ["Found vars in model but not guide: {'u'}"]
    assert ours == expected
    with pyro.validation_enabled(False):  # Pyro's checks, like Pyro's, run under validation only
        assert _warnings_of(make_estimator(name, 3), module, x) == []


@pytest.mark.parametrize("name", IWAE_FAMILY)
def test_with_validation_a_log_density_shaped_against_its_plates_raises_as_trace_elbo_does(name):
    """Pyro's check_site_shape; the particle plate is a second plate dim, as in a vectorized
    Trace_ELBO, so Pyro's reference gets max_plate_nesting=2."""
    module, message = MisshapedObservation(), 'at site "x", invalid log_prob shape'
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError, match=message):
            pyro.infer.Trace_ELBO(max_plate_nesting=2).loss(module.model, module.guide, X0)
        with pytest.raises(ValueError, match=message):
            make_estimator(name, 1).loss(module.model, module.guide, X0)


class TwoLatents(nn.Module):
    """a ~ N(0, 1), b | a ~ N(a, 1), x | b ~ N(b, 1) per example, so log p(x) = log N(x; 0, 3). The guide
    is the exact posterior written in the model's order, q(a|x) q(b|a, x) = N(a; x/3, 2/3)
    N(b; (a + x)/2, 1/2): b's distribution depends on a's value. `m` and `r` (1 here) scale the model's
    and the guide's locations; `discrete`: a is a Bernoulli draw instead (no rsample)."""

    def __init__(self, discrete=False):
        super().__init__()
        self.m = nn.Parameter(torch.ones(()))
        self.r = nn.Parameter(torch.ones(()))
        self.discrete = discrete

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Bernoulli(0.5) if self.discrete else dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(self.m * a, 1.0))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            if self.discrete:
                a = pyro.sample("a", dist.Bernoulli(logits=self.r * x))
            else:
                a = pyro.sample("a", dist.Normal(self.r * x / 3, (2 / 3) ** 0.5))
            pyro.sample("b", dist.Normal(self.r * (a + x) / 2, 0.5**0.5))


XS = torch.tensor([-1.5, 0.2, 2.0])


def _two_latent_gradients(name: str, k: int, draws: int, r: float = 1.0, m: float = 1.0) -> torch.Tensor:
    """TwoLatents' gradients (d/dr, d/dm) of the loss of estimator `name` with k particles, one row
    per draw, draw i seeded with i (the estimators of the IWAE family draw the same z from a seed)."""
    module, elbo = TwoLatents(), make_estimator(name, k)
    with torch.no_grad():
        module.r.fill_(r)
        module.m.fill_(m)
    rows = []
    for seed in range(draws):
        pyro.set_rng_seed(seed)
        module.zero_grad()
        elbo.differentiable_loss(module.model, module.guide, XS).backward()
        rows.append(torch.stack([module.r.grad, module.m.grad]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("name,k", [("stl", 1), ("stl", 3), ("iwae-dreg", 3)])
def test_stl_and_dreg_encoder_gradient_vanishes_at_the_exact_posterior_with_dependent_latents(name, k):
    """q(a|x) q(b|a, x) = p(a, b|x): log w_k = log p(x) whatever z_k, so the path derivative is 0 draw
    by draw (Roeder et al. 2017; Tucker et al. 2018) through b's dependence on a too. Cutting the
    path a -> b (detaching b's distribution) would leave a non-zero gradient; IWAE's, with the score
    term, varies from draw to draw."""
    encoder = _two_latent_gradients(name, k, 20)[:, 0]
    assert encoder.abs().max() < 1e-5, encoder
    assert _two_latent_gradients("iwae", k, 20)[:, 0].std() > 0.1


@pytest.mark.parametrize("name,k,reference", [("stl", 1, "iwae"), ("stl", 3, "mc"), ("iwae-dreg", 4, "iwae")])
def test_stl_and_dreg_gradients_are_unbiased_with_dependent_latents(name, k, reference):
    """Away from the exact posterior (r = 0.6, m = 1.3), against the full gradient of the same bound
    at K (IWAE's; for STL at K > 1 the ELBO's, mc): the decoder's gradient (m) is IWAE's draw by draw
    (same seed, same z), and both gradients have the reference's mean, within N_SE standard errors of
    the differences (paired where the draws are the same: then the difference is the score term)."""
    draws = 400
    ours = _two_latent_gradients(name, k, draws, r=0.6, m=1.3)
    ref = _two_latent_gradients(reference, k, draws, r=0.6, m=1.3)
    if reference == "iwae":
        torch.testing.assert_close(ours[:, 1], ref[:, 1], rtol=1e-4, atol=1e-5)
    diff = ours - ref
    se = diff.std(0) / draws**0.5
    assert (diff.mean(0).abs() <= N_SE * se).all(), (diff.mean(0), se)
    assert se[0] > 0  # the encoder's gradients differ draw by draw: the comparison is not empty


@pytest.mark.parametrize("k", [1, 4])
def test_iwae_takes_dependent_latent_sites_and_its_bound_is_log_px_at_the_exact_posterior(k):
    """At q(a, b | x) = p(a, b | x), every log w_k = log p(x): the bound is exactly log N(x; 0, 3) per
    example, draw by draw; a wrong or missing term for the dependent site b would make it vary."""
    module, elbo = TwoLatents(), make_estimator("iwae", k)
    log_px = dist.Normal(0.0, 3.0**0.5).log_prob(XS)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(module.model, module.guide, XS)
        torch.testing.assert_close(elbo.per_example_bound(module.model, module.guide, XS), log_px)
        assert float(loss.detach()) == pytest.approx(-float(log_px.sum()), abs=1e-5)
        assert loss.requires_grad


@pytest.mark.parametrize("name", IWAE_FAMILY)
def test_a_latent_site_without_rsample_is_refused_by_name(name):
    module = TwoLatents(discrete=True)
    with pytest.raises(InputError, match="site 'a' is not: use --estimator mc"):
        make_estimator(name, 2).differentiable_loss(module.model, module.guide, XS)


class IndependentLatents(TwoLatents):
    """Two latent sites whose guide distributions both depend on x only."""

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(self.r * x / 3, 1.0))
            pyro.sample("b", dist.Normal(self.r * x / 2, 1.0))


@pytest.mark.parametrize("name", ["stl", "iwae-dreg"])
def test_stl_and_dreg_take_independent_latent_sites_and_look_once_per_guide(name, monkeypatch):
    """The dependence check runs Pyro's provenance tracking once per guide and estimator object."""
    calls = []
    real = iwae.get_dependencies
    monkeypatch.setattr(iwae, "get_dependencies", lambda *a, **k: calls.append(1) or real(*a, **k))
    module, elbo = IndependentLatents(), make_estimator(name, 3)
    for _ in range(3):
        loss = elbo.differentiable_loss(module.model, module.guide, XS)
        assert torch.isfinite(loss) and loss.requires_grad
    assert len(calls) == 1
    make_estimator(name, 3).differentiable_loss(module.model, module.guide, XS)
    assert len(calls) == 2
