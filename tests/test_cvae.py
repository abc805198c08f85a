"""The conditional VAE (pyro_vae/models/cvae.py) and its NN baseline: Pyro's examples/cvae's quadrants,
likelihoods over the predicted pixels, the param store, the closed-form KL between the guide and the
conditional prior, and every estimator training it through Pyro's own SVI."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.nn import functional as F

from pyro_vae.data import binarize, load_dataset
from pyro_vae.errors import InputError
from pyro_vae.evaluation.conditional import fit_svi
from pyro_vae.evaluation.evaluate import elbo_terms
from pyro_vae.inference.elbo import mean_field_terms
from pyro_vae.inference.estimators import analytic_kl_sites
from pyro_vae.inference.iwae import weights
from pyro_vae.models.conditions import MISSING, ClassLabel, Quadrants, given_pixels, parse_condition
from pyro_vae.models.cvae import build_cvae
from pyro_vae.models.nn_baseline import build_baseline

from .conftest import N_SE

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    """Binarized digits (8 x 8), train and test, with labels."""
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    return binarize(data.train_x, g), data.train_y, binarize(data.test_x, g), data.test_y


def test_given_quadrants_are_pyros_examples_bottom_left_left_half_and_all_but_bottom_right():
    b, t = torch.tensor([[False, False], [True, False]]), torch.ones(2, 2, dtype=torch.bool)
    blocks = lambda m: m.repeat_interleave(2, 0).repeat_interleave(2, 1)  # noqa: E731  2x2 quadrants -> 4x4
    assert torch.equal(given_pixels(4, 4, 1), blocks(b))
    assert torch.equal(given_pixels(4, 4, 2), blocks(torch.tensor([[True, False], [True, False]])))
    assert torch.equal(given_pixels(4, 4, 3), blocks(t & ~torch.tensor([[False, False], [False, True]])))


def test_a_quadrant_condition_marks_the_predicted_pixels_minus_one_and_keeps_the_given_ones():
    x = torch.rand(3, 1, 8, 8)
    c = Quadrants(2).condition(x)
    assert torch.equal(c[..., :, :4], x[..., :, :4])
    assert (c[..., :, 4:] == MISSING).all()


@pytest.mark.parametrize("text, shape, classes, message", [
    ("quadrants:4", SHAPE, None, "unknown condition 'quadrants:4'"),
    ("half", SHAPE, None, "unknown condition 'half'"),
    ("quadrants:1", (1, 8, 6), None, "needs square images"),
    ("class", SHAPE, None, "needs labels"),
])
def test_a_condition_the_data_cannot_give_is_refused(text, shape, classes, message):
    with pytest.raises(InputError, match=message):
        parse_condition(text, shape, classes)


def test_class_labels_out_of_range_are_refused():
    with pytest.raises(InputError, match="must lie in 0..2"):
        ClassLabel(3).condition(torch.zeros(2, *SHAPE), torch.tensor([0, 3]))


def test_the_baseline_is_for_quadrants_only():
    with pytest.raises(InputError, match="predicts missing quadrants"):
        build_baseline(SHAPE, ClassLabel(10))


def test_a_class_conditional_cvae_takes_no_baseline():
    base = build_baseline(SHAPE, "quadrants:1", hidden=(16,))
    with pytest.raises(InputError, match="a baseline fills missing quadrants"):
        build_cvae(SHAPE, "class", n_classes=10, baseline=base)


def test_the_baselines_log_likelihood_is_the_bernoulli_log_likelihood_of_the_missing_pixels_alone():
    torch.manual_seed(0)
    base = build_baseline(SHAPE, "quadrants:1", hidden=(16,))
    x = torch.bernoulli(torch.full((5, *SHAPE), 0.4))
    c = base.condition.condition(x)
    missing = ~given_pixels(8, 8, 1)
    per_pixel = -F.binary_cross_entropy_with_logits(base.logits(c), x, reduction="none")
    expected = (per_pixel * missing).flatten(1).sum(-1)
    torch.testing.assert_close(base.log_likelihood(x, c), expected)
    trace = poutine.trace(base.model).get_trace(x, c)
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], expected)


def _model_log_prob(cvae, x, c, z):
    trace = poutine.trace(poutine.condition(cvae.model, data={"z": z})).get_trace(x, c)
    trace.compute_log_prob()
    return trace.nodes["x"]["log_prob"]


def test_the_cvae_scores_the_predicted_pixels_only_for_quadrants_and_the_whole_image_for_a_class():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, *SHAPE), 0.5))
    z = torch.randn(4, 3)
    quadrants = build_cvae(SHAPE, "quadrants:3", hidden=(16,), z_dim=3)
    c = quadrants.condition.condition(x)
    flipped_given, flipped_missing = x.clone(), x.clone()
    flipped_given[..., 0, 0] = 1 - x[..., 0, 0]  # top-left: given
    flipped_missing[..., 7, 7] = 1 - x[..., 7, 7]  # bottom-right: predicted
    before = _model_log_prob(quadrants, x, c, z)
    assert torch.equal(_model_log_prob(quadrants, flipped_given, c, z), before)
    assert (_model_log_prob(quadrants, flipped_missing, c, z) != before).all()
    pyro.clear_param_store()
    classes = build_cvae(SHAPE, "class", hidden=(16,), z_dim=3, n_classes=10)
    c = classes.condition.condition(x, torch.tensor([0, 1, 2, 3]))
    assert (_model_log_prob(classes, flipped_given, c, z) != _model_log_prob(classes, x, c, z)).all()


def test_the_cvae_registers_its_networks_in_pyros_param_store_and_not_the_frozen_baseline():
    base = build_baseline(SHAPE, "quadrants:2", hidden=(16,))
    cvae = build_cvae(SHAPE, "quadrants:2", hidden=(16,), z_dim=3, baseline=base)
    x = torch.bernoulli(torch.full((4, *SHAPE), 0.5))
    c = cvae.condition.condition(x)
    guide_trace = poutine.trace(cvae.guide).get_trace(x, c)
    poutine.trace(poutine.replay(cvae.model, guide_trace)).get_trace(x, c)
    names = set(pyro.get_param_store().keys())
    expected = {f"cvae$$${n}" for n, p in cvae.named_parameters() if not n.startswith("baseline.")}
    assert names == expected
    assert not any(p.requires_grad for p in base.parameters())


def test_svi_trains_the_cvae_and_leaves_the_baseline_as_it_was(digits):
    xtr, _, _, _ = digits
    base = build_baseline(SHAPE, "quadrants:2", hidden=(16,))
    cvae = build_cvae(SHAPE, "quadrants:2", hidden=(16,), z_dim=3, baseline=base)
    frozen = {n: p.clone() for n, p in base.state_dict().items()}
    before = {n: p.clone() for n, p in cvae.state_dict().items() if not n.startswith("baseline.")}
    fit_svi(cvae, xtr[:256], cvae.condition.condition(xtr[:256]), epochs=1, batch_size=64)
    assert all(torch.equal(base.state_dict()[n], v) for n, v in frozen.items())
    assert all(not torch.equal(cvae.state_dict()[n], v) for n, v in before.items() if "missing" not in n)


def test_the_closed_form_kl_between_the_guide_and_the_conditional_prior_is_the_gaussian_formula():
    torch.manual_seed(0)
    cvae = build_cvae(SHAPE, "quadrants:1", hidden=(16,), z_dim=3)
    x = torch.bernoulli(torch.full((6, *SHAPE), 0.5))
    c = cvae.condition.condition(x)
    assert analytic_kl_sites(cvae.model, cvae.guide, x, c) == {"z": True}
    q, p = cvae.posterior(x, c), cvae.prior(cvae.features(c))
    mq, sq, mp, sp = (t.double() for t in (q.mean, q.stddev, p.mean, p.stddev))
    by_hand = (torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum(-1)
    _, kl = mean_field_terms(cvae.model, cvae.guide, 1, x, c)
    torch.testing.assert_close(kl.double(), by_hand, rtol=1e-5, atol=1e-5)


def test_the_analytic_elbo_and_the_monte_carlo_elbo_agree_within_their_standard_error(digits):
    """Two unbiased estimates of each example's ELBO (closed-form KL vs log p - log q at z ~ q), from
    independent draws: their per-example differences have mean 0."""
    xtr, _, _, _ = digits
    cvae = build_cvae(SHAPE, "quadrants:2", hidden=(16,), z_dim=3)
    x = xtr[:300]
    c = cvae.condition.condition(x)
    fit_svi(cvae, x, c, epochs=2, batch_size=64, lr=3e-3)  # a posterior unlike the prior
    pyro.set_rng_seed(1)
    with torch.no_grad():
        analytic = elbo_terms(cvae.model, cvae.guide, x, 50, conditions=(c,))["elbo"]
        mc = weights(cvae.model, cvae.guide, 50, x, c).log_w.mean(0)
    diff = (analytic - mc).double()
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < N_SE * se, (float(diff.mean()), se)
    assert se < 0.05  # the test has power: the two agree to a small fraction of a nat


@pytest.mark.parametrize("estimator", ["mc", "analytic", "iwae", "stl", "iwae-dreg"])
def test_every_estimator_trains_the_cvae_with_pyros_svi(estimator, digits):
    xtr, ytr, xte, yte = digits
    cvae = build_cvae(SHAPE, "class", hidden=(32,), z_dim=3, n_classes=10)
    ctr, cte = cvae.condition.condition(xtr, ytr), cvae.condition.condition(xte, yte)
    pyro.set_rng_seed(0)
    before = elbo_terms(cvae.model, cvae.guide, xte, 5, conditions=(cte,))["elbo"]
    fit_svi(cvae, xtr, ctr, epochs=2, batch_size=64, lr=3e-3, estimator=estimator, particles=2)
    after = elbo_terms(cvae.model, cvae.guide, xte, 5, conditions=(cte,))["elbo"]
    gain = (after - before).double()
    se = float(gain.std()) / math.sqrt(len(gain))
    assert float(gain.mean()) > N_SE * se, (float(gain.mean()), se)


def test_completions_keep_the_given_pixels_and_differ_from_draw_to_draw_in_the_predicted_ones():
    torch.manual_seed(0)
    cvae = build_cvae(SHAPE, "quadrants:1", hidden=(16,), z_dim=3)
    x = torch.bernoulli(torch.full((4, *SHAPE), 0.5))
    c = cvae.condition.condition(x)
    a, b = cvae.complete(c), cvae.complete(c)
    given = given_pixels(8, 8, 1)
    assert torch.equal(a[..., given], x[..., given])
    assert not torch.equal(a[..., ~given], b[..., ~given])
