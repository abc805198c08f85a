"""The guide families q(z|x) (guides.py): each density against an independent computation, samples
with the right moments, STL and DReG gradients unbiased per family (the brute-force machinery of
test_estimators.py), the analytic-KL fallback, every guide x prior training, and the bad inputs.

Tolerances are standard errors (z-scores of 4.5), with fixed seeds."""

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.util import detach
from torch import nn

from pyro_vae import Config, build_vae, register_guide, train
from pyro_vae.cli import main
from pyro_vae.evaluation.evaluate import active_units
from pyro_vae.inference.estimators import check_analytic_kl, make_estimator
from pyro_vae.inference.program import Program
from pyro_vae.models.guides import GUIDES, GuideFamily, make_guide
from pyro_vae.training.run_dir import load_model
from tests.test_estimators import Z, _assert_unbiased, _gradient_draws

OPTIONS = {"diagonal": {}, "fullrank": {}, "lowrank": {"guide_rank": 2}, "iaf": {"flows": 2}}


def _family_inputs(name, z_dim=3, batch=4, seed=0):
    """A family and random (loc, scale, features) for it."""
    torch.manual_seed(seed)
    family = make_guide(name, z_dim, **OPTIONS[name])
    loc, scale = torch.randn(batch, z_dim), torch.rand(batch, z_dim) + 0.5
    features = torch.randn(batch, family.extra) if family.extra else None
    return family, loc, scale, features


def test_registry_has_the_four_guides():
    assert set(GUIDES) == {"diagonal", "fullrank", "lowrank", "iaf"}


def test_fullrank_log_prob_is_torchs_multivariate_normal():
    family, loc, scale, features = _family_inputs("fullrank")
    lower = torch.diag_embed(scale)
    rows, cols = torch.tril_indices(3, 3, -1)
    for n in range(len(loc)):  # fill L row by row, in the order of torch.tril_indices
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            lower[n, r, c] = features[n, i]
    reference = torch.distributions.MultivariateNormal(loc, covariance_matrix=lower @ lower.mT)
    q = family(loc, scale, features)
    z = torch.randn(10, *loc.shape)
    torch.testing.assert_close(q.log_prob(z), reference.log_prob(z), rtol=1e-5, atol=1e-5)


def test_lowrank_log_prob_is_that_of_the_dense_covariance():
    family, loc, scale, features = _family_inputs("lowrank")
    factor = features.reshape(len(loc), 3, 2)
    covariance = torch.diag_embed(scale**2) + factor @ factor.mT
    reference = torch.distributions.MultivariateNormal(loc, covariance_matrix=covariance)
    z = torch.randn(10, *loc.shape)
    torch.testing.assert_close(family(loc, scale, features).log_prob(z), reference.log_prob(z),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cached", [True, False], ids=["sampled-z", "any-z"])
def test_iaf_log_prob_is_the_change_of_variables_with_autograds_jacobian(cached):
    """log q(z) = log N(u; 0, I) - log |det dz/du| for z = F(u), F the whole map from standard noise
    (the base's affine step, then the flow), its Jacobian by autograd; scored on the z the flow just
    produced (the flow's cache) and, on a fresh distribution, by inverting the flow."""
    family, loc, scale, features = _family_inputs("iaf", batch=1, seed=1)
    with torch.no_grad():  # larger weights than at initialization: a visibly non-linear flow
        for p in family.parameters():
            p.mul_(3.0)
    u = torch.randn(3, dtype=torch.float64)
    family, loc, scale, features = family.double(), loc.double(), scale.double(), features.double()

    def flow_map(noise):
        q = family(loc, scale, features)
        z = loc[0] + scale[0] * noise
        for transform in q.transforms:
            z = transform(z[None])[0]
        return z

    jacobian = torch.autograd.functional.jacobian(flow_map, u)
    expected = dist.Normal(0.0, 1.0).log_prob(u).sum() - torch.linalg.slogdet(jacobian)[1]
    q = family(loc, scale, features)
    if cached:  # the transforms cache (x, y): log_prob reuses the forward pass's scales
        z = loc + scale * u[None]
        for transform in q.transforms:
            z = transform(z)
    else:  # a z this distribution did not produce: log_prob inverts each step
        z = flow_map(u).detach()[None]
    torch.testing.assert_close(q.log_prob(z)[0], expected, rtol=1e-8, atol=1e-8)
    assert not torch.allclose(jacobian, torch.diag(torch.diagonal(jacobian)))  # z_i depends on other u


@pytest.mark.parametrize("encoder", ["mlp", "conv"])
@pytest.mark.parametrize("name", ["fullrank", "lowrank"])
def test_a_fresh_gaussian_guide_is_the_diagonal_one(name, encoder):
    """The encoder's extra outputs start at 0: an untrained full- or low-rank guide is N(mu, diag
    sigma^2), the diagonal guide of the same encoder outputs."""
    vae = build_vae((1, 8, 8), encoder=encoder, hidden=[16], z_dim=4, guide=name, **OPTIONS[name])
    x = torch.rand(3, 1, 8, 8)
    loc, scale, features = vae.encoder(x)
    assert torch.equal(features, torch.zeros_like(features))
    torch.testing.assert_close(vae.posterior(x).covariance_matrix, torch.diag_embed(scale**2))


def test_scoring_the_iaf_sample_just_drawn_inverts_no_step():
    """Each step's network runs once to draw z (particle plates included) and not again to score it:
    every transform, the permutations too, keeps its own cached (x, y)."""
    _, loc, scale, _ = _family_inputs("iaf", z_dim=5)
    family = make_guide("iaf", 5, flows=3)
    calls = []
    for step in family.steps:
        step.nn.register_forward_hook(lambda *_: calls.append(1))
    q = family(loc, scale, torch.randn(len(loc), family.extra)).expand((2, len(loc)))
    z = q.rsample()
    assert len(calls) == 3
    q.log_prob(z)
    assert len(calls) == 3


@pytest.mark.parametrize("name", ["fullrank", "lowrank"])
def test_gaussian_guides_sample_their_mean_and_covariance(name):
    family, loc, scale, features = _family_inputs(name, batch=1, seed=2)
    q = family(loc, scale, features)
    n = 40_000
    pyro.set_rng_seed(0)
    z = q.sample((n,))[:, 0]
    mean, covariance = loc[0], q.covariance_matrix[0]
    se_mean = (torch.diagonal(covariance) / n).sqrt()
    assert ((z.mean(0) - mean).abs() / se_mean).max() < Z
    # Gaussian: Var[(z_i - m_i)(z_j - m_j)] = S_ii S_jj + S_ij^2
    centred = z - mean
    variance = torch.diagonal(covariance)
    se_cov = ((variance[:, None] * variance[None] + covariance**2) / n).sqrt()
    assert ((centred.T @ centred / n - covariance).abs() / se_cov).max() < Z
    # and the program's posterior moments are the closed-form ones
    moments = q.mean, q.stddev
    torch.testing.assert_close(moments[1][0] ** 2, torch.diagonal(covariance))


def test_iaf_posterior_moments_fall_back_to_draws():
    """The flow has no closed-form mean: Program.posterior_moments estimates it from guide draws,
    which agree with a large independent sample within their standard errors."""
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=3, guide="iaf", flows=2)
    x = torch.rand(2, 1, 4, 4).bernoulli()
    pyro.set_rng_seed(0)
    mean, std = Program.of(vae).posterior_moments(x, draws=4000)["z"]
    with torch.no_grad():
        big = vae.posterior(x).sample((20_000,))
    se = (big.var(0) / 4000 + big.var(0) / 20_000).sqrt()
    assert ((mean - big.mean(0)).abs() / se).max() < Z
    # a sample s.d.'s standard error: sqrt((m4 - var^2) / n) / (2 sd), by the delta method
    centred = big - big.mean(0)
    var, m4 = centred.pow(2).mean(0), centred.pow(4).mean(0)
    se_std = ((m4 - var**2) * (1 / 4000 + 1 / 20_000)).sqrt() / (2 * var.sqrt())
    assert ((std - big.std(0)).abs() / se_std).max() < Z


def test_stopped_log_q_reaches_no_variational_parameter_except_through_z():
    """STL/DReG score z at detached parameters (pyro's detach, which deep-copies the flow's modules
    and their context too): with z held fixed, log q has no gradient at all."""
    for name in OPTIONS:
        vae = build_vae((1, 4, 4), hidden=[8], z_dim=3, guide=name, **OPTIONS[name])
        q = vae.posterior(torch.rand(2, 1, 4, 4))
        z = q.rsample()
        stopped = detach(q)
        assert not stopped.log_prob(z.detach()).requires_grad, name
        torch.testing.assert_close(stopped.log_prob(z), q.log_prob(z), rtol=1e-5, atol=1e-5)
        assert stopped.log_prob(z).requires_grad  # the path through z is kept


class TinyGuided(nn.Module):
    """p(z) = N(0, I_2), p(x|z) = N(A z + b, I) on R^2; q(z|x) = family(C x + d, exp(s), F x + f):
    test_estimators.Tiny with a two-dimensional latent and any guide family."""

    def __init__(self, name):
        super().__init__()
        torch.manual_seed(0)
        self.family = make_guide(name, 2, **({"guide_rank": 1} if name == "lowrank" else OPTIONS[name]))
        self.a = nn.Parameter(torch.tensor([[1.5, 0.4], [-0.8, 0.6]]))
        self.b = nn.Parameter(torch.tensor([0.3, 0.1]))
        self.c = nn.Parameter(torch.tensor([[0.2, 0.1], [-0.1, 0.3]]))
        self.d = nn.Parameter(torch.tensor([0.9, -0.4]))
        self.s = nn.Parameter(torch.tensor([0.0, -0.3]))
        extra = self.family.extra
        self.f_weight = nn.Parameter(0.3 * torch.randn(extra, 2)) if extra else None
        self.f_bias = nn.Parameter(0.3 * torch.randn(extra)) if extra else None

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.a.T + self.b, 1.0).to_event(1), obs=x)

    def guide(self, x):
        features = x @ self.f_weight.T + self.f_bias if self.f_weight is not None else None
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.family(x @ self.c.T + self.d, self.s.exp().expand(x.shape), features))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_stl_gradient_is_unbiased_for_the_elbo_gradient(name):
    """E[STL gradient] = the ELBO's gradient, its brute-force value the mean of many reparameterized
    (Trace_ELBO) gradient draws."""
    tiny = TinyGuided(name)
    reference = _gradient_draws(make_estimator("mc"), tiny, copies=20_000, repeats=20, seed=1)
    _assert_unbiased_against_draws(_gradient_draws(make_estimator("stl"), tiny, copies=2000, repeats=30,
                                                   seed=2), reference)


def _assert_unbiased_against_draws(draws, reference):
    """test_estimators' z-score check against the mean of reference draws, on the coordinates that
    vary; the others (weights the flow's masks hold at 0) must be equal, draw for draw."""
    varies = (draws.var(0) + reference.var(0)) > 0
    assert torch.equal(draws[:, ~varies], reference[:1, ~varies].expand(len(draws), -1))
    reference = reference[:, varies]
    _assert_unbiased(draws[:, varies], reference.mean(0), (reference.var(0) / len(reference)).sqrt())


@pytest.mark.parametrize("name", list(OPTIONS))
def test_dreg_gradient_is_unbiased_for_the_iwae_gradient(name):
    tiny = TinyGuided(name)
    reference = _gradient_draws(make_estimator("iwae", 3), tiny, copies=20_000, repeats=20, seed=1)
    dreg = _gradient_draws(make_estimator("iwae-dreg", 3), tiny, copies=2000, repeats=30, seed=2)
    _assert_unbiased_against_draws(dreg, reference)


@pytest.mark.parametrize("name", ["fullrank", "iaf"])
def test_stl_encoder_gradient_vanishes_when_the_guide_is_the_exact_posterior(name):
    """The linear-Gaussian posterior is N(P^-1 A^T (x - b), P^-1), P = I + A^T A: a full-rank guide
    holds it exactly (correlated z), and so does an IAF whose steps are the identity (a diagonal A).
    Draw by draw, STL's and DReG's guide gradients are then 0 -- only if the Cholesky factor and the
    flow's networks are detached in log q (else the score term remains)."""
    tiny = TinyGuided(name)
    with torch.no_grad():
        if name == "iaf":
            tiny.a.copy_(torch.diag(torch.diagonal(tiny.a)))
        precision = torch.eye(2) + tiny.a.T @ tiny.a
        covariance = torch.linalg.inv(precision)
        # the iaf's two steps have one reversal of z between them: its base holds z in reverse order
        order = [1, 0] if name == "iaf" else [0, 1]
        tiny.c.copy_((covariance @ tiny.a.T)[order])
        tiny.d.copy_((-covariance @ tiny.a.T @ tiny.b)[order])
        lower = torch.linalg.cholesky(covariance)
        tiny.s.copy_(torch.diagonal(lower)[order].log())
        tiny.f_weight.zero_()
        if name == "fullrank":
            tiny.f_bias.copy_(lower[1, :1])
        else:
            tiny.f_bias.normal_()  # any context: the steps' last layers are zero
            for step in tiny.family.steps:
                last = step.nn.layers[-1]
                last.weight.zero_()
                last.bias.zero_()
    guide = torch.cat([torch.full((p.numel(),), n not in ("a", "b")) for n, p in tiny.named_parameters()])
    mc = _gradient_draws(make_estimator("mc"), tiny, copies=10, repeats=5)[:, guide]
    assert mc.abs().max() > 1e-3
    for estimator in (make_estimator("stl"), make_estimator("iwae-dreg", 3)):
        grads = _gradient_draws(estimator, tiny, copies=10, repeats=5)[:, guide]
        assert grads.abs().max() < 1e-4


@pytest.mark.parametrize("name", list(OPTIONS))
def test_analytic_kl_where_torch_has_it_and_monte_carlo_with_a_warning_elsewhere(name):
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=3, guide=name, **OPTIONS[name])
    x = torch.rand(2, 1, 4, 4).bernoulli()
    q, p = vae.posterior(x), vae.prior()
    try:
        torch.distributions.kl_divergence(q, p)
        closed_form = True
    except NotImplementedError:
        closed_form = False
    assert closed_form == (name == "diagonal")  # torch: no KL from an MVN or a flow to Independent(Normal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = check_analytic_kl("analytic", vae.model, vae.guide, x)
    assert record == {"analytic_kl_sites": ["z"] if closed_form else [],
                      "monte_carlo_kl_sites": [] if closed_form else ["z"]}
    assert len(caught) == (0 if closed_form else 1)


def test_the_fallback_is_recorded_in_the_runs_summary(tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="no closed-form KL"):
        assert main(["train", "--guide", "iaf", "--estimator", "analytic", "--epochs", "1", "--train-size",
                     "100", "--test-size", "20", "--eval-k", "5", "--hidden", "16", "--out", str(out),
                     "--quiet"]) == 0
    config, vae = load_model(out)
    assert (config.guide, config.flows) == ("iaf", None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["monte_carlo_kl_sites"] == ["z"]


@pytest.mark.parametrize("prior", ["normal", "learned", "mog", "vamp"])
@pytest.mark.parametrize("guide", list(OPTIONS))
def test_every_guide_and_prior_trains_an_epoch_with_finite_numbers(guide, prior, tmp_path):
    config = Config(guide=guide, prior=prior, epochs=1, train_size=200, test_size=40, eval_k=5, hidden=[32],
                    z_dim=4, prior_components=3 if prior in ("mog", "vamp") else None,
                    **OPTIONS[guide])
    summary = train(config, out=tmp_path / "run", progress=False).summary
    for key in ("test_elbo", "log_px", "kl", "recon", "train_loss"):
        assert math.isfinite(summary[key]), (key, summary[key])
    rebuilt, vae = load_model(tmp_path / "run")  # evaluate/sample/resume rebuild the same guide
    assert type(vae.family) is type(make_guide(guide, 4, **OPTIONS[guide]))
    assert (rebuilt.guide_rank, rebuilt.flows) == (config.guide_rank, config.flows)


@pytest.mark.parametrize("guide", ["fullrank", "iaf"])
def test_evaluate_sample_and_diagnose_work_with_the_guide(guide, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--guide", guide, "--epochs", "1", "--train-size", "100", "--test-size", "20",
                 "--eval-k", "5", "--hidden", "16", "--z-dim", "3", "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", str(out), "--eval-k", "10", "--quiet"]) == 0
    assert main(["sample", str(out), "--n", "4"]) == 0
    assert main(["diagnose", str(out), "--n-examples", "2", "--mcmc-examples", "0", "--eval-k", "20",
                 "--svi-steps", "3", "--quiet"]) == 0
    assert (out / "diagnose.json").is_file() and (out / "samples.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--flows", "2"], "use it with --guide iaf"),
    (["--guide", "lowrank", "--guide-rank", "4"], "--guide-rank must be below --z-dim (4)"),
    (["--guide", "fullrank", "--guide-rank", "2"], "use it with --guide lowrank"),
    (["--guide", "banana"], "unknown guide 'banana'"),
    (["--model", "ae", "--guide", "fullrank"], "--model ae is a deterministic autoencoder"),
])
def test_bad_guide_combinations_are_input_errors(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--z-dim", "4", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


class Scaled(GuideFamily):
    """A user's family: the diagonal Gaussian with every scale halved."""

    def forward(self, loc, scale, features=None):
        return dist.Normal(loc, scale / 2).to_event(1)


def test_register_guide_adds_a_family_of_your_own():
    register_guide("halved", lambda **options: Scaled())
    try:
        vae = build_vae((1, 4, 4), hidden=[8], z_dim=3, guide="halved")
        x = torch.rand(2, 1, 4, 4)
        loc, scale = vae.encoder(x)
        torch.testing.assert_close(vae.posterior(x).base_dist.scale, scale / 2)
    finally:
        GUIDES.unregister("halved")


def test_active_units_of_a_flow_do_not_count_the_noise_of_its_estimated_means():
    """An iaf guide whose q(z|x) does not depend on x has no active unit, although its posterior means
    are estimated from draws (noise variance sigma^2 / draws per unit, above the 0.01 threshold here)."""
    pyro.set_rng_seed(0)
    vae = build_vae((1, 8, 8), hidden=[16], z_dim=4, guide="iaf", flows=2)
    with torch.no_grad():
        last = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        for p in vae.encoder.parameters():
            p.zero_()
        last.bias[4:8] = 2.0  # scale softplus(2) ~ 2.1: noise variance 4.5 / 64 draws ~ 0.07 per unit
    x = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)).bernoulli()
    assert active_units(vae, x) == 0
