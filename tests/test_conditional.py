"""The importance-sampled conditional log-likelihood log p(x | c) (pyro_vae/evaluation/conditional.py): exact
on a
linear-Gaussian conditional pair where p(x | c) is known in closed form, above the ELBO and rising with k
on a CVAE, and the CVAE beating its deterministic baseline on digits' quadrant completion."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.data import binarize, load_dataset
from pyro_vae.evaluation.conditional import (
    ConditionalScores,
    conditional_log_likelihood,
    fit_svi,
    score_conditional,
)
from pyro_vae.models.cvae import build_cvae
from pyro_vae.models.nn_baseline import build_baseline

from .conftest import N_SE

A, B, S = 0.8, -0.5, 0.6  # z ~ N(A c, 1), x ~ N(z + B c, S^2), per coordinate: x | c ~ N((A + B) c, 1 + S^2)
D = 3


def linear_model(x, c):
    with pyro.plate("data", c.shape[0]):
        z = pyro.sample("z", dist.Normal(A * c, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + B * c, S).to_event(1), obs=x)


def exact_guide(x, c):
    """q(z | x, c) = p(z | x, c): N(A c + (x - (A + B) c) / (1 + S^2), S^2 / (1 + S^2))."""
    with pyro.plate("data", c.shape[0]):
        loc = A * c + (x - (A + B) * c) / (1 + S**2)
        pyro.sample("z", dist.Normal(loc, (S**2 / (1 + S**2)) ** 0.5).to_event(1))


def rough_guide(x, c):
    """A guide too wide and off centre: the importance weights vary."""
    with pyro.plate("data", c.shape[0]):
        loc = A * c + (x - (A + B) * c) / (1 + S**2) + 0.3
        pyro.sample("z", dist.Normal(loc, 1.5 * (S**2 / (1 + S**2)) ** 0.5).to_event(1))


def exact_log_likelihood(x, c):
    return dist.Normal((A + B) * c, (1 + S**2) ** 0.5).log_prob(x).sum(-1)


@pytest.fixture
def linear_data():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(200, D, generator=g, dtype=torch.float64)
    x = (A + B) * c + (1 + S**2) ** 0.5 * torch.randn(200, D, generator=g, dtype=torch.float64)
    return x, c


def test_with_the_exact_posterior_as_guide_the_estimate_is_the_exact_conditional_log_likelihood(linear_data):
    x, c = linear_data
    for k in (1, 7):
        estimate = conditional_log_likelihood((linear_model, exact_guide), x, c, k=k)
        torch.testing.assert_close(estimate, exact_log_likelihood(x, c), rtol=0, atol=1e-9)


def test_with_a_rough_guide_the_estimate_nears_the_exact_value_from_below_and_beats_the_elbo(linear_data):
    x, c = linear_data
    exact = exact_log_likelihood(x, c)
    pyro.set_rng_seed(0)
    scores = score_conditional((linear_model, rough_guide), x, c, eval_k=3000, elbo_samples=10)
    gap_is, gap_elbo = exact - scores.log_lik, exact - scores.elbo
    se = float(gap_is.std()) / math.sqrt(len(gap_is))
    assert float(gap_is.mean()) > -N_SE * se  # a lower bound in expectation
    assert float(gap_is.mean()) < 0.05 * float(gap_elbo.mean())  # 3000 draws close 95% of the ELBO's gap
    assert float(gap_elbo.mean()) > 0.1


@pytest.fixture(scope="module")
def digits_quadrants():
    """Binarized digits conditioned on 2 given quadrants; a baseline and a CVAE trained with Pyro's SVI."""
    pyro.clear_param_store()
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    xtr, xte = binarize(data.train_x, g), binarize(data.test_x, g)
    torch.manual_seed(0)  # the networks' initial weights
    base = build_baseline(data.shape, "quadrants:2", hidden=(64,))
    ctr, cte = base.condition.condition(xtr), base.condition.condition(xte)
    fit_svi(base, xtr, ctr, epochs=20, batch_size=64, lr=3e-3)
    cvae = build_cvae(data.shape, "quadrants:2", hidden=(64,), z_dim=4, baseline=base)
    fit_svi(cvae, xtr, ctr, epochs=20, batch_size=64, lr=3e-3)
    yield cvae, base, xte, cte
    pyro.clear_param_store()


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).double()
    return float(d.mean()), float(d.std()) / math.sqrt(len(d))


def test_the_importance_sampled_estimate_is_above_the_elbo_and_rises_with_k(digits_quadrants):
    cvae, _, x, c = digits_quadrants
    pyro.set_rng_seed(0)
    repeats = 20  # E[estimate with k = 2] per example, as the mean of 20 independent estimates
    few = conditional_log_likelihood(cvae, x.repeat(repeats, 1, 1, 1), c.repeat(repeats, 1, 1, 1), k=2)
    few = few.view(repeats, -1).mean(0)
    scores = score_conditional(cvae, x, c, eval_k=500, seed=1)
    mean, se = _paired(scores.log_lik, scores.elbo)
    assert mean > N_SE * se, (mean, se)
    mean, se = _paired(scores.log_lik, few)
    assert mean > N_SE * se, (mean, se)


def test_the_cvae_beats_the_baseline_on_the_conditional_log_likelihood_of_digits(digits_quadrants):
    cvae, base, x, c = digits_quadrants
    scores = score_conditional(cvae, x, c, eval_k=500, baseline=base)
    summary = scores.summary()
    assert summary["log_lik_minus_baseline"] > 3 * summary["log_lik_minus_baseline_se"], summary
    mean, se = _paired(scores.log_lik, scores.baseline)
    assert summary["log_lik_minus_baseline"] == pytest.approx(mean) and summary[
        "log_lik_minus_baseline_se"] == pytest.approx(se)


def test_scoring_leaves_the_callers_random_state_as_it_was(digits_quadrants):
    cvae, _, x, c = digits_quadrants
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    score_conditional(cvae, x[:10], c[:10], eval_k=5)
    assert torch.equal(torch.rand(3), expected)


def test_the_summary_pairs_the_estimates_on_the_same_examples():
    scores = ConditionalScores(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 2.0, 1.0]), k=3)
    summary = scores.summary()
    assert summary["log_lik_minus_elbo"] == pytest.approx(4 / 3)
    assert summary["log_lik_minus_elbo_se"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert "baseline" not in summary
