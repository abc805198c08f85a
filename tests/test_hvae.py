"""The hierarchical VAE (--model hvae, pyro_vae/models/hvae.py): one Pyro program with latent sites z2
and z1, trained by every estimator and by Pyro's own SVI, measured by evaluate, compare and diagnose
over both sites; its conv networks (the authors' ConvHVAE) on 28x28 and 8x8 images."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare import compare
from pyro_vae.evaluation.evaluate import elbo_terms
from pyro_vae.inference.estimators import analytic_kl_sites, make_estimator
from pyro_vae.inference.program import Program
from pyro_vae.models.hvae import HVAE, build_hvae
from pyro_vae.models.hvae_nets import JointDecoder, JointEncoder, TopEncoder, clamped_scale
from pyro_vae.models.kind import check_config
from pyro_vae.presets import PRESETS
from pyro_vae.sites import sample_sites
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import train
from pyro_vae.training.train_data import prepare_data

from .conftest import N_SE, QUICK, assert_log_px_at_least_elbo, run_values
from .test_estimators import XS, TwoLatents

TINY = {"hidden": [16], "z_dim": 3}
DIGITS = Config(dataset="digits", train_size=200, test_size=60, model="hvae", **TINY)


def _digits(n: int = 32) -> torch.Tensor:
    return prepare_data(DIGITS).test_x[:n]


def _hvae(prior: str = "normal", encoder: str = "gated-mlp", x_shape=(1, 8, 8)) -> HVAE:
    pyro.set_rng_seed(0)
    return build_hvae(x_shape, encoder=encoder, prior=prior, prior_components=4, **TINY)


@pytest.fixture(scope="module")
def hvae_run(tmp_path_factory):
    """A 3-epoch digits HVAE run with the VampPrior, written by the CLI."""
    out = tmp_path_factory.mktemp("runs") / "hvae"
    assert main(["train", "--model", "hvae", "--prior", "vamp", "--prior-components", "5", "--hidden", "32",
                 "--z-dim", "4", "--epochs", "3", "--out", str(out), *QUICK]) == 0
    return out


def test_model_and_guide_sample_z2_then_z1_inside_the_data_plate():
    hvae, x = _hvae(), _digits(5)
    guide = poutine.trace(hvae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(hvae.model, trace=guide)).get_trace(x)
    for trace in (guide, model):
        latent = [n for n, site in sample_sites(trace) if not site["is_observed"]]
        assert latent == ["z2", "z1"]
        for name in latent:
            assert trace.nodes[name]["value"].shape == (5, 3)
            assert [(f.name, f.dim) for f in trace.nodes[name]["cond_indep_stack"]] == [("data", -1)]
    sites = Program.of(hvae).sites(x)
    assert (sites.latent, sites.observed, sites.plate) == (("z2", "z1"), "x", "data")
    # p(z1|z2) is computed from the guide's z2: the model's z1 distribution moves with it
    z2 = guide.nodes["z2"]["value"]
    assert torch.equal(model.nodes["z1"]["fn"].base_dist.loc, hvae.p_z1(z2)[0])


def test_model_and_guide_register_every_parameter_under_its_state_dict_name():
    pyro.clear_param_store()
    hvae, x = _hvae("vamp"), _digits(4)
    guide = poutine.trace(hvae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(hvae.model, trace=guide)).get_trace(x)
    params = {n for t in (guide, model) for n, s in t.nodes.items() if s["type"] == "param"}
    assert params == {f"hvae$$${n}" for n, _ in hvae.named_parameters()}
    guide_params = {n for n, s in guide.nodes.items() if s["type"] == "param"}
    assert {n.split("$$$")[1].split(".")[0] for n in guide_params} == {"q_z2", "q_z1"}
    assert "hvae$$$prior.pseudo_inputs" in params and not any("prior.encoder" in n for n in params)
    pyro.clear_param_store()


def test_log_variances_are_clamped_to_the_authors_range():
    raw = torch.tensor([-100.0, -6.0, 0.0, 2.0, 100.0])
    torch.testing.assert_close(clamped_scale(raw), torch.exp(0.5 * torch.tensor([-6.0, -6.0, 0.0, 2.0, 2.0])))


@pytest.mark.parametrize("shape,features", [((1, 28, 28), 294), ((1, 8, 8), 24), ((3, 8, 8), 24)])
def test_conv_networks_shapes(shape, features):
    """The authors' ConvHVAE: two stride-2 gated convolutions leave 6 x 7 x 7 = 294 features of a 28x28
    image (their h_size) and 6 x 2 x 2 of an 8x8 one; every network keeps leading batch dimensions
    (a particle plate) and the decoder returns an image of the likelihood's channels."""
    hidden, z = [300, 300], 5
    q_z2 = TopEncoder(shape, hidden, z, gated=True, conv=True)
    q_z1 = JointEncoder(shape, hidden, z, gated=True, conv=True)
    decoder = JointDecoder(shape, hidden, z, (2 * shape[0], *shape[1:]), gated=True, conv=True)
    assert q_z2.features.features == features and q_z1.x_branch.features == features
    x = torch.rand(4, *shape)
    loc, scale = q_z2(x)
    assert loc.shape == scale.shape == (4, z) and (scale > 0).all()
    z2 = torch.randn(3, 4, z)  # 3 particles of 4 examples
    loc1, scale1 = q_z1(x, z2)
    assert loc1.shape == scale1.shape == (3, 4, z)
    torch.testing.assert_close(q_z1(x, z2[1])[0], loc1[1])  # the particle dim is only broadcast
    assert decoder(torch.randn(3, 4, z), z2).shape == (3, 4, 2 * shape[0], *shape[1:])


def test_conv_hvae_trains_on_digits_8x8(tmp_path):
    result = train(Config(dataset="digits", train_size=100, test_size=30, model="hvae", encoder="conv",
                          hidden=[16], z_dim=2, epochs=1, eval_k=5, batch_size=50), out=tmp_path / "run",
                   progress=False)
    assert math.isfinite(result.summary["test_elbo"]) and math.isfinite(result.summary["log_px"])


def test_an_encoder_the_hvae_has_no_network_for_is_refused():
    with pytest.raises(InputError, match="unknown encoder 'banana' for --model hvae"):
        build_hvae((1, 8, 8), encoder="banana")


def test_a_guide_family_is_refused_for_the_hvae():
    with pytest.raises(InputError, match="--model hvae has its own guide"):
        check_config(Config(model="hvae", guide="iaf"))


def _untrained_elbo(config: Config) -> float:
    pyro.set_rng_seed(config.seed)
    hvae = build_hvae((1, 8, 8), encoder=config.encoder, hidden=config.hidden, z_dim=config.z_dim,
                      prior=config.prior)
    x = prepare_data(config).test_x
    pyro.set_rng_seed(1)
    with torch.no_grad():
        return float(elbo_terms(hvae.model, hvae.guide, x, samples=10)["elbo"].mean())


@pytest.mark.parametrize("settings", [
    {"estimator": "mc"}, {"estimator": "analytic"}, {"estimator": "iwae", "particles": 3},
    {"estimator": "stl"}, {"estimator": "iwae-dreg", "particles": 3},
    {"estimator": "mc", "beta": 0.5}, {"estimator": "analytic", "kl_anneal": 2},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_estimator_trains_it(settings, tmp_path):
    """Each estimator, the KL weight and the warm-up raise the test ELBO of the same initial model by
    more than N_SE standard errors of the difference, in 4 epochs."""
    config = Config(dataset="digits", train_size=300, test_size=100, model="hvae", hidden=[32], z_dim=3,
                    epochs=4, eval_k=5, batch_size=32, lr=3e-3, **settings)
    summary = train(config, out=tmp_path / "run", progress=False).summary
    before = _untrained_elbo(config)
    gain = summary["test_elbo"] - before
    assert gain > N_SE * summary["test_elbo_se"] + 1.0, (before, summary["test_elbo"])
    if settings["estimator"] == "analytic":
        assert summary["analytic_kl_sites"] == ["z2", "z1"] and summary["monte_carlo_kl_sites"] == []


def test_pyro_svi_with_pyro_optim_trains_it():
    """Pyro's own SVI finds the HVAE's parameters in the param store and steps them."""
    pyro.clear_param_store()
    hvae, x = _hvae(), _digits(64)
    pyro.set_rng_seed(1)
    before = float(elbo_terms(hvae.model, hvae.guide, x, samples=20)["elbo"].mean())
    svi = SVI(hvae.model, hvae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(150):
        svi.step(x)
    stored = set(pyro.get_param_store().keys())
    assert stored == {f"hvae$$${n}" for n, _ in hvae.named_parameters()}
    pyro.set_rng_seed(1)
    after = elbo_terms(hvae.model, hvae.guide, x, samples=20)["elbo"]
    se = float(after.std()) / math.sqrt(len(after))
    assert float(after.mean()) - before > 5.0 + N_SE * se, (before, float(after.mean()))
    pyro.clear_param_store()


@pytest.mark.parametrize("prior,analytic", [("normal", {"z2": True, "z1": True}),
                                            ("vamp", {"z2": False, "z1": True})])
def test_analytic_and_monte_carlo_elbo_agree_in_expectation(prior, analytic):
    """TraceMeanField_ELBO takes KL(q(z1|x, z2) || p(z1|z2)) in closed form at the sampled z2 (and
    KL(q(z2|x) || N(0, I))): unbiased for the same ELBO as Trace_ELBO. Batch means over R draws of
    each: their difference within N_SE standard errors (the two sets of draws are independent)."""
    hvae, x = _hvae(prior), _digits(32)
    assert analytic_kl_sites(hvae.model, hvae.guide, x) == analytic
    draws = 300
    pyro.set_rng_seed(0)
    means = {}
    with torch.no_grad():
        for name in ("mc", "analytic"):
            elbo = make_estimator(name)
            means[name] = torch.stack([elbo.per_example_bound(hvae.model, hvae.guide, x).mean()
                                       for _ in range(draws)]).double()
    diff = float(means["analytic"].mean() - means["mc"].mean())
    se = math.sqrt(float(means["analytic"].var() + means["mc"].var()) / draws)
    assert abs(diff) < N_SE * se, (diff, se)
    if prior == "normal":  # both KLs in closed form: less spread than their Monte Carlo estimate
        assert means["analytic"].std() < means["mc"].std()


def test_log_px_by_importance_sampling_is_at_least_the_elbo(hvae_run):
    assert_log_px_at_least_elbo(run_values(hvae_run))


def test_compare_measures_every_estimator_over_both_sites(hvae_run):
    """compare on the trained HVAE: the analytic estimator's record names z1 (closed form) and z2
    (Monte Carlo under the VampPrior); stl and iwae-dreg are measured, not skipped."""
    config, hvae = load_model(hvae_run)
    x = prepare_data(config).test_x[:16]
    with pytest.warns(UserWarning, match="no closed-form KL.*'z2'"):
        record = compare(hvae, x, estimators=["mc:1", "analytic:1", "stl:1", "iwae-dreg:2"], repeats=3,
                         eval_k=20)
    assert record["analytic_kl"] == {"analytic_kl_sites": ["z1"], "monte_carlo_kl_sites": ["z2"]}
    rows = {row["estimator"]: row for row in record["estimators"]}
    assert set(rows) == {"mc", "analytic", "stl", "iwae-dreg"}
    for row in rows.values():
        assert "skipped" not in row and math.isfinite(row["value_mean"]) and row["encoder"]["grad_var"] > 0


def test_diagnose_runs_over_both_sites(hvae_run):
    """diagnose's NUTS and q* cover the latent (z2, z1): every coordinate of both sites, named."""
    assert main(["diagnose", str(hvae_run), "--n-examples", "3", "--mcmc-examples", "1", "--eval-k", "30",
                 "--svi-steps", "5", "--num-samples", "20", "--warmup", "20", "--chains", "1",
                 "--quiet"]) == 0
    record = json.loads((hvae_run / "diagnose.json").read_text())
    assert record["mcmc"]["coordinates"] == [f"z2_{i}" for i in range(4)] + [f"z1_{i}" for i in range(4)]
    assert len(record["mcmc"]["examples"][0]["q_mean"]) == 8
    assert math.isfinite(record["bounds"]["elbo_optimal_full_rank"]["mean"])


def test_posterior_moments_of_a_site_drawn_given_another_are_its_marginal_ones():
    """Program.posterior_moments (posterior means, active units, reconstructions, diagnose's q* start
    and its q vs NUTS table) of b in q(a|x) q(b|a, x) = N(a; x/3, 2/3) N(b; (a + x)/2, 1/2): the
    marginal N(b; 2x/3, 2/3), not the conditional at one draw of a (sd 0.71); within N_SE standard
    errors of the draws' mean (sd/sqrt(R)) and standard deviation (about sd/sqrt(2R))."""
    program, draws = Program.of(TwoLatents()), 20_000
    assert program.drawn_given_continuous(XS) == ("b",)
    assert Program.of(_hvae()).drawn_given_continuous(_digits(4)) == ("z1",)
    pyro.set_rng_seed(0)
    mean, sd = program.posterior_moments(XS, draws=draws)["b"]
    marginal_sd = math.sqrt(2 / 3)
    assert ((mean - 2 * XS / 3).abs() < N_SE * marginal_sd / math.sqrt(draws)).all(), mean
    assert ((sd - marginal_sd).abs() < N_SE * marginal_sd / math.sqrt(2 * draws)).all(), sd


def test_samples_decode_draws_of_both_sites_from_the_prior():
    """Program.sample takes the dict of draws sample_latents gives: the same pictures as decoding
    z2 ~ p(z2), z1 ~ p(z1|z2) by hand under the same seed, in [0, 1] for the Bernoulli."""
    hvae, x = _hvae("vamp"), _digits(6)
    pyro.set_rng_seed(3)
    images = Program.of(hvae).sample(x)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        latents = hvae.sample_latents(6)
        expected = hvae.decode(latents["z1"], latents["z2"])
    assert set(latents) == {"z2", "z1"} and latents["z1"].shape == (6, 3)
    torch.testing.assert_close(images, expected)
    assert images.shape == x.shape and 0 <= images.min() and images.max() <= 1


def test_the_hvae_presets_target_the_published_rows(capsys):
    expected = {"fashion-mnist-hvae": ("gated-mlp", "normal", "-227.37 +- 0.10"),
                "fashion-mnist-hvae-vampprior": ("gated-mlp", "vamp", "-226.72 +- 0.08"),
                "fashion-mnist-convhvae-vampprior": ("conv", "vamp", "-224.67 +- 0.03")}
    for name, (encoder, prior, published) in expected.items():
        preset = PRESETS[name]
        settings = preset.settings
        assert (settings["model"], settings["encoder"], settings["prior"]) == ("hvae", encoder, prior)
        assert (settings["z_dim"], settings["hidden"]) == (40, [300, 300])
        assert settings["dataset"] == "fashion-mnist"
        assert preset.published == published
        check_config(Config(**settings))
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, published) in expected.items():
        assert f"{name}:" in out and published in out
