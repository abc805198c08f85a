"""Per-example IWAE log p(x), ELBO terms and active units on a trained digits VAE."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.evaluation.evaluate import active_units, elbo_terms, iwae_log_px
from pyro_vae.inference.estimators import log_weights
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import prepare_data


@pytest.fixture(scope="module")
def trained(digits_run):
    config, vae = load_model(digits_run)
    data = prepare_data(config)
    return vae, data.test_x[:60]


def test_iwae_with_one_sample_equals_the_elbo_in_expectation(trained):
    vae, x = trained
    pyro.set_rng_seed(0)
    iwae1 = torch.stack([iwae_log_px(vae.model, vae.guide, x, eval_k=1) for _ in range(200)])  # (R, N)
    elbo = elbo_terms(vae.model, vae.guide, x, samples=2000)["elbo"]  # analytic KL, 2000 samples
    # per example: the mean of 200 single-sample bounds vs a 2000-sample ELBO
    diff = iwae1.mean(0) - elbo
    se = (iwae1.var(0) / iwae1.shape[0]).sqrt()
    assert (diff.abs() < 5 * se + 1e-3).float().mean() > 0.9
    assert abs(diff.mean()) < 4 * float(se.pow(2).mean().sqrt()) / math.sqrt(len(x))


def test_iwae_rises_with_k_on_average(trained):
    vae, x = trained
    pyro.set_rng_seed(1)
    means = []
    for k in (1, 10, 100, 1000):
        estimates = torch.stack([iwae_log_px(vae.model, vae.guide, x, eval_k=k) for _ in range(5)])
        means.append(float(estimates.mean()))
    assert means == sorted(means)
    assert means[-1] > means[0]


def test_chunking_keeps_the_estimate_and_its_shape(trained):
    vae, x = trained
    x = x[:6]
    pyro.set_rng_seed(2)
    whole = torch.stack([iwae_log_px(vae.model, vae.guide, x, eval_k=16) for _ in range(40)])
    # 5 particles per chunk (the last one 1), one example per chunk
    chunked = torch.stack([
        iwae_log_px(vae.model, vae.guide, x, eval_k=16, max_elements=5 * x[0].numel()) for _ in range(40)
    ])
    assert chunked.shape == whole.shape == (40, len(x))
    se = math.sqrt(float(whole.var(0).mean() + chunked.var(0).mean()) / (40 * len(x)))
    assert abs(float(whole.mean() - chunked.mean())) < 4 * se


def test_log_weights_are_per_example_log_joint_minus_log_q(trained):
    vae, x = trained
    pyro.set_rng_seed(3)
    drawn = {}

    def guide(x):
        drawn["z"] = vae.guide(x)
        return drawn["z"]

    lw = log_weights(vae.model, guide, x[:5], num_particles=3)
    z = drawn["z"]
    assert lw.shape == (3, 5) and z.shape == (3, 5, vae.prior().event_shape[0])
    q = vae.posterior(x[:5])
    expected = vae.prior().log_prob(z) + vae.likelihood(vae.decoder(z)).log_prob(x[:5]) - q.log_prob(z)
    assert torch.allclose(lw, expected, atol=1e-4)


def test_kl_term_is_the_closed_form_gaussian_kl(trained):
    vae, x = trained
    q = vae.posterior(x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    closed_form = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
    assert torch.allclose(elbo_terms(vae.model, vae.guide, x)["kl"], closed_form, atol=1e-4)


def test_active_units_counts_latents_whose_posterior_mean_varies(trained):
    """A pair whose latent site (named "code") has a posterior mean that varies a lot across examples
    in coordinate 0, hardly in 1 (variance ~1e-6 Var(sum x) < 0.01), not at all in 2 and 3."""
    _, x = trained

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("code", dist.Normal(x.new_zeros(x.shape[0], 4), 1.0).to_event(1))
            pyro.sample("pixels", dist.Normal(x, 1.0).to_event(3), obs=x)

    def guide(x):
        total = x.flatten(1).sum(-1)
        mean = torch.stack([total, 0.001 * total, 0 * total, 0 * total], -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("code", dist.Normal(mean, 1.0).to_event(1))

    assert active_units((model, guide), x) == 1


@pytest.mark.parametrize("n, k, budget", [(7, 16, 5 * 64), (7, 16, 64), (3, 1000, 10**9), (10, 3, 2 * 3 * 64),
                                          (5, 9, 10)])
def test_importance_chunks_cover_every_example_and_draw_once_within_the_budget(n, k, budget):
    """The plan that iwae_log_px and the diagnostics share: every (draw, example) cell exactly once,
    and no chunk over the budget unless one draw of one example is already over it."""
    from pyro_vae.evaluation.evaluate import importance_chunks

    x = torch.zeros(n, 1, 8, 8)
    seen = torch.zeros(k, n, dtype=torch.int64)
    for rows, draws in importance_chunks(x, k, budget):
        seen[draws, rows] += 1
        size = (rows.stop - rows.start) * (draws.stop - draws.start) * 64
        assert size <= max(budget, 64)  # over the budget only where one draw of one example is
    assert torch.equal(seen, torch.ones(k, n, dtype=torch.int64))
