"""Every prior x likelihood pair trains through the same command; settings that make no sense
together are refused; the analytic estimator says where it fell back to Monte Carlo."""

import json
import math
import warnings

import pyro
import pytest
import torch

from pyro_vae.config import Config
from pyro_vae.data import load_dataset
from pyro_vae.evaluation.evaluate import elbo_terms
from pyro_vae.models.kind import MIXTURE_PRIORS, binarization, check_config
from pyro_vae.models.likelihoods import LIKELIHOODS
from pyro_vae.models.priors import PRIORS
from pyro_vae.training.run_dir import build_from_config, load_model
from pyro_vae.training.train import init_prior, prepare_data, train

from .conftest import N_SE, assert_log_px_at_least_elbo, run_values

TINY = dict(train_size=96, test_size=32, hidden=[16], z_dim=2, epochs=1, batch_size=32, eval_k=4,
            prior_components=None)


KL_DRAWS = 400  # draws of z per test example for the Monte Carlo KL


@torch.no_grad()
def monte_carlo_kl(vae, x: torch.Tensor) -> tuple[float, float]:
    """KL(q(z|x) || p(z)) averaged over the examples of x, estimated independently of the library: the
    mean of log q(z|x) - log p(z) over KL_DRAWS draws z ~ q(z|x) per example; and the standard error
    of that mean (its Monte Carlo error alone: the examples are fixed)."""
    q = vae.posterior(x)
    z = q.sample((KL_DRAWS,))
    log_ratio = (q.log_prob(z) - vae.prior().log_prob(z)).double()  # (draws, examples)
    se = float(log_ratio.var(0).sum().sqrt()) / math.sqrt(KL_DRAWS) / x.shape[0]
    return float(log_ratio.mean()), se


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.filterwarnings("ignore")
def test_every_prior_and_likelihood_trains_an_epoch_with_finite_numbers(prior, likelihood, tmp_path):
    """Finite numbers; log p(x) >= ELBO on the paired differences; and, for every prior (closed-form
    KL or not), KL(q || p) >= 0 and the library's KL term equal to an independent Monte Carlo estimate,
    both within N_SE standard errors of that estimate."""
    options = {**TINY, "prior_components": 3 if prior in MIXTURE_PRIORS else None}
    config = Config(prior=prior, likelihood=likelihood, **options)
    result = train(config, out=tmp_path / "run", progress=False)
    s = result.summary
    for key in ("test_elbo", "log_px", "kl", "recon", "train_loss"):
        assert math.isfinite(s[key]), (key, s[key])
    assert_log_px_at_least_elbo(run_values(tmp_path / "run"))
    config, vae = load_model(tmp_path / "run")
    x = prepare_data(config).test_x
    pyro.set_rng_seed(1)
    kl, se = monte_carlo_kl(vae, x)
    assert kl > -N_SE * se
    # the library's term: closed form (exact) or its own Monte Carlo with as many draws (same s.e.)
    library = float(elbo_terms(vae.model, vae.guide, x, samples=KL_DRAWS)["kl"].mean())
    assert abs(library - kl) < N_SE * math.sqrt(2) * se, (library, kl, se)


@pytest.mark.parametrize("likelihood, expected", [("bernoulli", "dynamic"), ("gaussian", "none"),
                                                  ("continuous-bernoulli", "none")])
def test_binarization_defaults_to_what_the_likelihood_models(likelihood, expected):
    config = Config(likelihood=likelihood)
    assert config.binarize is None  # plain data: settled where the config becomes a run
    assert binarization(config) == expected
    assert check_config(config).binarize == expected and config.binarize is None  # a copy
    assert check_config(Config.from_dict({"likelihood": likelihood})).binarize == expected


def test_analytic_estimator_warns_and_records_the_monte_carlo_sites(tmp_path):
    config = Config(prior="mog", estimator="analytic", **{**TINY, "prior_components": 3})
    with pytest.warns(UserWarning, match="no closed-form KL.*'z'") as caught:
        s = train(config, out=tmp_path / "mog", progress=False).summary
    assert sum("closed-form" in str(w.message) for w in caught) == 1
    assert s["monte_carlo_kl_sites"] == ["z"] and s["analytic_kl_sites"] == []


def test_analytic_estimator_with_a_gaussian_prior_is_silent_and_analytic(tmp_path):
    config = Config(prior="learned", estimator="analytic", **TINY)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "--estimator analytic")
        s = train(config, out=tmp_path / "learned", progress=False).summary
    assert s["analytic_kl_sites"] == ["z"] and s["monte_carlo_kl_sites"] == []
    assert json.loads((tmp_path / "learned" / "summary.json").read_text())["analytic_kl_sites"] == ["z"]


def test_vamp_pseudo_inputs_start_at_training_examples():
    config = Config(prior="vamp", prior_init="data", **{**TINY, "prior_components": 5})
    data = prepare_data(config)
    vae = build_from_config(config, data.shape)
    init_prior(vae, config, data)
    u = vae.prior.pseudo_inputs.detach().flatten(1)
    distances = torch.cdist(u, data.train_x.flatten(1))
    assert (distances.min(1).values == 0).all()


def test_vamp_pseudo_inputs_start_as_noise_by_default():
    config = Config(prior="vamp", **{**TINY, "prior_components": 5})
    data = prepare_data(config)
    vae = build_from_config(config, data.shape)
    init_prior(vae, config, data)
    u = vae.prior.pseudo_inputs.detach().flatten(1)
    assert torch.cdist(u, load_dataset("digits").train_x.flatten(1)).min() > 0.5
