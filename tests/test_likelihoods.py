"""Likelihoods: continuous ones integrate to 1 over their support, the continuous Bernoulli's log
normalizer is right and smooth through lambda = 1/2, learned scales are floored and trained, and
data outside a likelihood's support is refused with one clear line."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.distributions import ContinuousBernoulli as TorchContinuousBernoulli

from pyro_vae.cli import build_parser, resolve_config
from pyro_vae.config import Config
from pyro_vae.errors import InputError
from pyro_vae.models.kind import check_config
from pyro_vae.models.likelihoods import (
    CB_WINDOW,
    SCALE_FLOOR,
    ContinuousBernoulliLogits,
    Gaussian,
    Laplace,
    cb_log_normalizer,
    make_likelihood,
)
from pyro_vae.models.vae import build_vae

GRID = 20_001  # quadrature points per pixel (odd: the grid has the Laplace's kink at its centre)
CB_LOGITS = [-30.0, -5.0, -1.0, -CB_WINDOW, -1e-4, 0.0, 1e-3, 0.15, CB_WINDOW, 0.3, 5.0, 30.0]


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)


def one_pixel_outputs(lik, m: int = 9) -> torch.Tensor:
    """Decoder outputs (m, params_per_pixel, 1, 1) in float64: m one-pixel images with different
    locations and, in pixel mode, scales from 0.002 to 3."""
    loc = torch.linspace(-2.0, 2.0, m, dtype=torch.float64)
    if lik.params_per_pixel == 1:
        return loc[:, None, None, None]
    raw = torch.linspace(-6.0, 3.0, m, dtype=torch.float64)
    return torch.stack([loc, raw], dim=1)[:, :, None, None]


# ----------------------------------------------------------------------------- normalization

LOC_SCALE = [
    ("gaussian", {"sigma": 0.3}), ("gaussian-learned", {"sigma_mode": "shared"}),
    ("gaussian-learned", {"sigma_mode": "pixel"}), ("laplace", {"sigma": 0.3}),
    ("laplace-learned", {"sigma_mode": "shared"}), ("laplace-learned", {"sigma_mode": "pixel"}),
]


@pytest.mark.parametrize("name, options", LOC_SCALE,
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_location_scale_density_integrates_to_one_per_pixel(name, options):
    """Trapezoid rule over mean +- 12 standard deviations of each one-pixel density."""
    lik = make_likelihood(name, **options).double()
    if hasattr(lik, "raw_scale"):
        with torch.no_grad():
            lik.raw_scale.fill_(-1.3)  # away from its initial value
    p = lik(one_pixel_outputs(lik))
    assert p.event_shape == (1, 1, 1)
    with torch.no_grad():
        t = torch.linspace(-12, 12, GRID, dtype=torch.float64)[:, None, None, None, None]
        x = p.mean + t * p.stddev  # (GRID, m, 1, 1, 1): each pixel its own grid
        integral = torch.trapezoid(p.log_prob(x).exp(), x.squeeze((-3, -2, -1)), dim=0)
    torch.testing.assert_close(integral, torch.ones_like(integral), atol=1e-5, rtol=0)


def cb(logits) -> torch.distributions.Distribution:
    """The continuous Bernoulli likelihood of one-pixel images with these logits, in float64."""
    out = torch.as_tensor(logits, dtype=torch.float64)[:, None, None, None]
    return make_likelihood("continuous-bernoulli")(out)


def test_continuous_bernoulli_integrates_to_one_and_has_its_mean():
    """int_0^1 p(x) dx = 1 and int_0^1 x p(x) dx = E[x], for logits from -30 to 30 (including
    lambda = 1/2 and the edges of the Taylor window)."""
    p = cb(CB_LOGITS)
    x = torch.linspace(0, 1, GRID, dtype=torch.float64)
    density = p.log_prob(x[:, None, None, None, None]).exp()  # (GRID, m)
    integral = torch.trapezoid(density, x, dim=0)
    torch.testing.assert_close(integral, torch.ones_like(integral), atol=1e-6, rtol=0)
    mean = torch.trapezoid(x[:, None] * density, x, dim=0)
    torch.testing.assert_close(p.mean.flatten(), mean, atol=1e-6, rtol=0)


def test_continuous_bernoulli_log_normalizer_matches_its_series_near_one_half():
    """log C(lambda) = log 2 + 4/3 d^2 + 104/45 d^4 + O(d^6), d = lambda - 1/2."""
    d = torch.linspace(-1e-3, 1e-3, 201, dtype=torch.float64)
    logits = torch.logit(0.5 + d)
    series = math.log(2) + 4 / 3 * d**2 + 104 / 45 * d**4
    torch.testing.assert_close(cb_log_normalizer(logits), series, atol=1e-13, rtol=0)


def test_continuous_bernoulli_log_normalizer_matches_the_closed_form():
    """C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), in float64 where 1 - 2 lambda is not
    tiny: inside the Taylor window, across its edges and well outside it."""
    d = torch.cat([torch.linspace(-0.49, -0.005, 500), torch.linspace(0.005, 0.49, 500)]).double()
    lam = 0.5 + d
    closed = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    torch.testing.assert_close(cb_log_normalizer(torch.logit(lam)), closed, atol=1e-9, rtol=0)


def test_continuous_bernoulli_matches_torch_away_from_one_half():
    """torch's log_prob, where its probabilities are neither clamped nor in its own Taylor window."""
    logits = torch.cat([torch.linspace(-10, -0.05, 40), torch.linspace(0.05, 10, 40)]).double()
    x = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None]
    ours = ContinuousBernoulliLogits(logits=logits).log_prob(x)
    torch.testing.assert_close(ours, TorchContinuousBernoulli(logits=logits).log_prob(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(ContinuousBernoulliLogits(logits=logits).mean,
                               TorchContinuousBernoulli(logits=logits).mean, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_log_normalizer_is_smooth_at_one_half(dtype):
    """At lambda = 1/2 exactly (logit 0): log C = log 2, slope 0 and curvature 1/6 (the series is
    log 2 + eta^2/12 + O(eta^4) in the logit eta), with no NaN from the closed form's 0/0."""
    eta = torch.zeros((), dtype=dtype, requires_grad=True)
    value = cb_log_normalizer(eta)
    (slope,) = torch.autograd.grad(value, eta, create_graph=True)
    (curvature,) = torch.autograd.grad(slope, eta)
    assert float(value.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert float(slope.detach()) == 0.0
    assert float(curvature) == pytest.approx(1 / 6, rel=1e-5)


def test_continuous_bernoulli_log_normalizer_and_slope_are_continuous_across_the_window():
    """float32 value and gradient against float64 closed forms, d/d eta log C = 1/eta - 1/sinh(eta),
    on a fine grid through both edges of the Taylor window."""
    eta64 = torch.cat([torch.linspace(-0.3, -0.01, 300), torch.linspace(0.01, 0.3, 300)]).double()
    eta = eta64.float().requires_grad_()
    value = cb_log_normalizer(eta)
    (slope,) = torch.autograd.grad(value.sum(), eta)
    torch.testing.assert_close(value.double(), torch.log(eta64 / torch.tanh(eta64 / 2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(slope.double(), 1 / eta64 - 1 / torch.sinh(eta64), atol=1e-5, rtol=0)


def test_continuous_bernoulli_stays_accurate_for_extreme_logits():
    """log C ~ log |eta| for large |eta| (C = eta / tanh(eta / 2)), in float32 too."""
    eta = torch.tensor([-80.0, -30.0, 30.0, 80.0])
    torch.testing.assert_close(cb_log_normalizer(eta), eta.abs().log())
    x = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert torch.isfinite(ContinuousBernoulliLogits(logits=eta).log_prob(x)).all()


def test_continuous_bernoulli_samples_lie_in_the_unit_interval_with_the_right_mean():
    n = 20_000
    p = cb([-30.0, -2.0, 0.0, 0.1, 3.0, 30.0])
    x = p.sample((n,)).flatten(1)
    assert x.min() >= 0 and x.max() <= 1
    se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - p.mean.flatten()).abs() < 5 * se).all()


def test_continuous_bernoulli_is_differentiable_in_the_logits_at_one_half():
    logits = torch.tensor([0.0, 1e-5, -0.1, 2.0], requires_grad=True)
    x = torch.tensor([0.3, 0.9, 0.0, 1.0])
    ContinuousBernoulliLogits(logits=logits).log_prob(x).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # d/d eta [x eta - softplus(eta) + log C(eta)] at eta = 0 is x - 1/2
    assert float(logits.grad[0]) == pytest.approx(0.3 - 0.5, abs=1e-6)


# ----------------------------------------------------------------------------- log densities


def test_laplace_log_density_is_absolute_error_plus_its_constant():
    """log p(x|z) = -sum_i |x_i - x_hat_i| / b - D log(2 b)."""
    b, out = 0.25, torch.randn(3, 1, 4, 4)
    x = torch.randn(3, 1, 4, 4)
    expected = -(x - out).abs().sum((-3, -2, -1)) / b - 16 * math.log(2 * b)
    torch.testing.assert_close(Laplace(b)(out).log_prob(x), expected)
    assert make_likelihood("laplace", sigma=b).name == "laplace"


def test_pixel_mode_splits_the_decoder_output_into_location_and_scale():
    lik = make_likelihood("gaussian-learned", sigma_mode="pixel")
    assert lik.params_per_pixel == 2
    loc, raw = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    p = lik(torch.cat([loc, raw], dim=-3))
    assert p.event_shape == (3, 4, 5) and p.batch_shape == (2,)
    torch.testing.assert_close(p.mean, loc)
    torch.testing.assert_close(p.stddev, torch.nn.functional.softplus(raw) + SCALE_FLOOR)
    torch.testing.assert_close(lik.mean(torch.cat([loc, raw], dim=-3)), loc)


def test_pixel_mode_doubles_the_decoder_channels():
    vae = build_vae((3, 8, 8), encoder="conv", hidden=(16,), z_dim=2, likelihood="laplace-learned",
                    sigma_mode="pixel")
    out = vae.decoder(torch.randn(5, 2))
    assert out.shape == (5, 6, 8, 8)
    assert vae.decode(torch.randn(5, 2)).shape == (5, 3, 8, 8)
    assert vae.model(None, n=4).shape == (4, 3, 8, 8)


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned"])
@pytest.mark.parametrize("mode", ["shared", "pixel"])
def test_learned_scale_has_a_floor(name, mode):
    """However negative the raw scale, the scale stays >= SCALE_FLOOR and log p stays finite."""
    lik = make_likelihood(name, sigma_mode=mode)
    out = torch.zeros(2, lik.params_per_pixel, 3, 3)
    if mode == "shared":
        with torch.no_grad():
            lik.raw_scale.fill_(-1e4)
    else:
        out[:, 1:] = -1e4
    p = lik(out)
    scale = p.base_dist.scale.detach()
    assert float(scale.min()) >= SCALE_FLOOR
    assert torch.isfinite(p.log_prob(torch.ones(2, 1, 3, 3))).all()


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned"])
def test_shared_scale_is_one_parameter_trained_by_the_elbo(name):
    vae = build_vae((1, 8, 8), hidden=(16,), z_dim=2, likelihood=name)
    params = dict(vae.likelihood.named_parameters())
    assert list(params) == ["raw_scale"] and params["raw_scale"].shape == ()
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, torch.rand(4, 1, 8, 8)).backward()
    assert params["raw_scale"].grad is not None and float(params["raw_scale"].grad.abs()) > 0


def test_fixed_scale_likelihoods_have_no_parameters_and_keep_sigma():
    for lik in (make_likelihood("gaussian", sigma=0.2), make_likelihood("laplace", sigma=0.2)):
        assert not list(lik.parameters()) and lik.sigma == 0.2 and lik.params_per_pixel == 1


# ----------------------------------------------------------------------------- support


@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan"), float("inf")])
def test_continuous_bernoulli_refuses_values_outside_unit_interval(bad):
    with pytest.raises(InputError) as info:
        make_likelihood("continuous-bernoulli").check(torch.tensor([0.0, 0.5, 1.0, bad]))
    message = str(info.value)
    assert "'continuous-bernoulli'" in message and "[0, 1]" in message and "\n" not in message


def test_continuous_bernoulli_accepts_unit_interval():
    lik = make_likelihood("continuous-bernoulli")
    x = torch.tensor([0.0, 0.25, 1.0])
    lik.check(x)  # raises on failure
    assert lik.in_support(x) and not lik.in_support(torch.tensor([1.0001]))


@pytest.mark.parametrize("name, options", [
    ("gaussian-learned", {"sigma_mode": "shared"}), ("gaussian-learned", {"sigma_mode": "pixel"}),
    ("laplace", {}), ("laplace-learned", {"sigma_mode": "pixel"}),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_real_valued_likelihoods_refuse_non_finite_values(name, options, bad):
    lik = make_likelihood(name, **options)
    with pytest.warns(UserWarning, match="far wider than the"):
        lik.check(torch.tensor([-1e4, 0.0, 3.5]))  # any finite value is in the support, with a warning
    with pytest.raises(InputError) as info:
        lik.check(torch.tensor([0.0, bad]))
    message = str(info.value)
    assert f"likelihood {name!r}" in message and "(-inf, inf)" in message and "\n" not in message


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_laplace_refuses_non_positive_sigma(sigma):
    with pytest.raises(InputError, match="--sigma"):
        make_likelihood("laplace", sigma=sigma)


def test_unknown_sigma_mode_is_an_input_error():
    with pytest.raises(InputError, match="unknown --sigma-mode 'per-image'.*shared, pixel"):
        make_likelihood("gaussian-learned", sigma_mode="per-image")
    with pytest.raises(InputError, match="unknown sigma_mode 'per-image'"):
        check_config(Config.from_dict({"likelihood": "gaussian-learned", "sigma_mode": "per-image"}))


def test_new_options_reach_the_config_from_flags():
    args = build_parser().parse_args(
        ["train", "--likelihood", "laplace-learned", "--sigma-mode", "pixel", "--prior", "mog",
         "--prior-components", "3"])
    config = resolve_config(args)
    assert (config.likelihood, config.sigma_mode, config.prior, config.prior_components) == (
        "laplace-learned", "pixel", "mog", 3)
    assert Config().sigma_mode == "shared"


def test_classes_are_the_registry_entries():
    assert isinstance(make_likelihood("gaussian-learned"), Gaussian)
    assert isinstance(make_likelihood("laplace-learned"), Laplace)
    assert make_likelihood("gaussian-learned").name == "gaussian-learned"


def test_the_bernoulli_image_log_prob_is_independent_bernoullis_bit_for_bit():
    """BernoulliImage sums the per-pixel BCE before flipping its sign; values and gradients must be
    exactly those of Independent(Bernoulli(logits), 3), with particles broadcast against the data."""
    import pyro.distributions as dist

    torch.manual_seed(0)
    logits = (torch.randn(5, 16, 1, 8, 8) * 6).requires_grad_()
    x = torch.cat([(torch.rand(8, 1, 8, 8) < 0.5).float(), torch.rand(8, 1, 8, 8)])  # binary and grey
    fast = make_likelihood("bernoulli")(logits)
    plain = dist.Bernoulli(logits=logits, validate_args=False).to_event(3)
    assert type(fast).__name__ == "BernoulliImage" and fast.event_shape == plain.event_shape
    a, b = fast.log_prob(x), plain.log_prob(x)
    assert a.shape == (5, 16) and torch.equal(a, b)
    assert torch.equal(*(torch.autograd.grad(v.sum(), logits)[0] for v in (a, b)))
    assert type(fast.expand([2, 5, 16])).__name__ == "BernoulliImage"
