"""A model/guide pair written without pyro-vae goes through every Python entry point as it is: Pyro's
own VAE example (tests/pyro_example.py: sites "latent"/"obs", pyro.module), trained with Pyro's SVI
and pyro.optim, through evaluate, compare, diagnose and the figures; a pair with two latent sites of
other names through beta / KL warm-up, diagnose and the figures; and a pair with a global latent
refused in one line."""

import math
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_vae.data import Dataset, binarize, load_dataset
from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare import compare, write_comparison
from pyro_vae.evaluation.diagnostics import diagnose, write_report
from pyro_vae.evaluation.evaluate import active_units, evaluate, per_example
from pyro_vae.figures.plots import plot_samples, save_figures
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.inference.kl_weight import scale_latents
from pyro_vae.inference.program import Program

from .pyro_example import VAE as PyroExampleVAE

Z_DIM, N_SE = 3, 4.0


@pytest.fixture(scope="module")
def digits():
    """Binarized 8x8 digits: (train, test) tensors (N, 1, 8, 8)."""
    data = load_dataset("digits")
    generator = torch.Generator().manual_seed(0)
    return binarize(data.train_x, generator), binarize(data.test_x[:120], generator), data.test_y[:120]


@pytest.fixture(scope="module")
def pyro_pair(digits):
    """Pyro's example VAE on 8x8 digits, trained as Pyro's example trains it: SVI, Trace_ELBO,
    pyro.optim.Adam, nothing from pyro-vae."""
    train_x, _, _ = digits
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = PyroExampleVAE(z_dim=Z_DIM, hidden_dim=64, pixels=64)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=Trace_ELBO())
    before = svi.evaluate_loss(train_x)
    for _ in range(8):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 100):
            svi.step(train_x[order[i:i + 100]])
    assert svi.evaluate_loss(train_x) < 0.7 * before  # it trained
    return vae


def test_evaluate_takes_pyros_example_pair_as_it_is(pyro_pair, digits):
    _, x, _ = digits
    pyro.set_rng_seed(1)
    result = evaluate(pyro_pair, x, eval_k=200)
    assert all(math.isfinite(result[key]) for key in ("test_elbo", "log_px", "kl", "recon"))
    # log p(x) >= ELBO per example: IWAE with k=200 lies between them, up to its noise
    pyro.set_rng_seed(1)
    values = per_example(pyro_pair, x, eval_k=200)
    gap = values["log_px"] - values["elbo"]
    assert gap.mean() > -N_SE * gap.std() / math.sqrt(len(gap))
    assert result["test_elbo"] <= result["log_px"] + N_SE * float(gap.std()) / math.sqrt(len(gap))
    assert result["kl"] > 0 and result["test_elbo"] == pytest.approx(result["recon"] - result["kl"], abs=1e-4)
    assert result["test_elbo"] == float(values["elbo"].mean())  # the values behind the means
    assert isinstance(result["active_units"], int) and 1 <= result["active_units"] <= Z_DIM
    # the pair as a (model, guide) tuple and as a Program: the same numbers from the same seed
    for program in ((pyro_pair.model, pyro_pair.guide), Program.of(pyro_pair)):
        pyro.set_rng_seed(1)
        assert evaluate(program, x, eval_k=200) == result


def test_compare_groups_the_guides_and_the_models_parameters_by_param_site(pyro_pair, digits, tmp_path):
    _, x, _ = digits
    record = compare(pyro_pair, x[:16], estimators=["mc", "analytic", "iwae:4"], particles=[1], repeats=3,
                     eval_k=50)
    assert [(r["estimator"], r["particles"]) for r in record["estimators"]] == [
        ("mc", 1), ("analytic", 1), ("iwae", 4)]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    for row in record["estimators"]:
        assert row["encoder"]["n_params"] == count(pyro_pair.encoder)
        assert row["decoder"]["n_params"] == count(pyro_pair.decoder)
        numbers = [row["value_mean"], row["bias"], *(row[g][m] for g in ("encoder", "decoder")
                                                     for m in ("grad_var", "snr"))]
        assert all(math.isfinite(v) for v in numbers) and row["value_mean"] < 0
    assert record["analytic_kl"] == {"analytic_kl_sites": ["latent"], "monte_carlo_kl_sites": []}
    assert record["model"] == "VAE"
    assert all(p.grad is None for p in pyro_pair.parameters())  # the measured gradients are cleared
    paths = write_comparison(record, tmp_path / "compare")
    assert [p.name for p in paths] == ["compare.json", "compare.md", "compare_snr.png",
                                       "compare_estimates.png"]
    assert "| mc | 1 |" in (tmp_path / "compare" / "compare.md").read_text()


def test_diagnose_takes_pyros_example_pair_as_it_is(pyro_pair, digits, tmp_path):
    _, x, _ = digits
    result = diagnose(pyro_pair, x, n_examples=6, mcmc_examples=2, eval_k=200, svi_steps=30, num_samples=30,
                      warmup=30, chains=2, seed=0)
    assert result.nuts.z.shape == (2, 30, 2, Z_DIM)
    assert result.summary["mcmc"]["coordinates"] == [f"latent_{u}" for u in range(Z_DIM)]
    for bound in result.summary["bounds"].values():
        assert math.isfinite(bound["mean"]) and bound["mean"] < 0
    assert all(p.requires_grad for p in pyro_pair.parameters())  # frozen only while it ran
    paths = write_report(result, tmp_path / "diagnose")
    assert {p.name for p in paths} >= {"diagnose.json", "diagnose.md", "diagnose_khat.png",
                                      "diagnose_posterior.png"}
    assert "latent_" in (tmp_path / "diagnose" / "diagnose.md").read_text()


def _assert_pngs(paths, names):
    assert [p.name for p in paths] == names
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_figures_of_pyros_example_pair(pyro_pair, digits, tmp_path):
    train_x, x, labels = digits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = save_figures(pyro_pair, Dataset("digits", train_x, x, None, labels), tmp_path, n_samples=16)
    _assert_pngs(paths, ["samples.png", "reconstructions.png", "traversal.png", "latent_map.png"])
    assert not [w for w in caught if "skipped" in str(w.message)]
    # the samples come from their own seed, and leave torch's generator as it was
    state = torch.random.get_rng_state()
    again = plot_samples(pyro_pair, x, tmp_path / "again.png", n=16, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.read_bytes() == (tmp_path / "samples.png").read_bytes()


# ------------------------------------------------------------ two latent sites with other names


class TwoSites(nn.Module):
    """p(style) p(content) p(x | style, content): two latent sites, 2-D "style" and 3-D "content", an
    observed site "pixels", in the plate "batch"; pyro.module registers the networks."""

    def __init__(self, pixels=64):
        super().__init__()
        self.encoder = nn.Linear(pixels, 2 * 5)
        self.decoder = nn.Linear(5, pixels)
        self.pixels = pixels

    def model(self, x):
        pyro.module("two_decoder", self.decoder)
        n = x.shape[0]
        with pyro.plate("batch", n):
            style = pyro.sample("style", dist.Normal(x.new_zeros(n, 2), 1.0).to_event(1))
            content = pyro.sample("content", dist.Normal(x.new_zeros(n, 3), 1.0).to_event(1))
            self.observe(self.decoder(torch.cat([style, content], -1)), x.reshape(n, -1))

    def observe(self, logits, x):
        pyro.sample("pixels", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("two_encoder", self.encoder)
        loc, log_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("style", dist.Normal(loc[:, :2], log_scale[:, :2].exp()).to_event(1))
            pyro.sample("content", dist.Normal(loc[:, 2:], log_scale[:, 2:].exp()).to_event(1))


@pytest.fixture
def two_sites(digits):
    torch.manual_seed(0)
    return TwoSites(), digits[1][:10]


def _hand_loss(pair, x, seed, weights, estimator):
    """-log p(x|z) + sum_s weight_s * KL_s at the guide's draw with `seed`: KL_s in closed form
    (analytic) or log q(z_s|x) - log p(z_s) at the draw (mc)."""
    pyro.set_rng_seed(seed)
    guide = poutine.trace(pair.guide).get_trace(x)
    model = poutine.trace(poutine.replay(pair.model, trace=guide)).get_trace(x)
    loss = -model.nodes["pixels"]["fn"].log_prob(model.nodes["pixels"]["value"]).sum()
    for name, weight in weights.items():
        q, p, z = guide.nodes[name]["fn"], model.nodes[name]["fn"], guide.nodes[name]["value"]
        kl = kl_divergence(q, p) if estimator == "analytic" else q.log_prob(z) - p.log_prob(z)
        loss = loss + weight * kl.sum()
    return float(loss.detach())


@pytest.mark.parametrize("estimator", ["analytic", "mc"])
def test_beta_scales_the_kl_of_every_latent_site_whatever_its_name(two_sites, estimator):
    """-ELBO_beta = -log p(x|z) + beta (KL_style + KL_content), at the same draw, for the sites named
    from the program and for every latent site (sites=None); naming one site scales only that one."""
    pair, x = two_sites
    elbo = make_estimator(estimator)
    latent = Program.of(pair).sites(x).latent
    assert latent == ("style", "content")

    def weighted_loss(beta, sites):
        pyro.set_rng_seed(7)
        return elbo.loss(scale_latents(pair.model, beta, sites), scale_latents(pair.guide, beta, sites), x)

    for beta in (0.5, 3.0):
        expected = _hand_loss(pair, x, 7, {"style": beta, "content": beta}, estimator)
        assert weighted_loss(beta, latent) == pytest.approx(expected, rel=1e-5)
        assert weighted_loss(beta, None) == pytest.approx(expected, rel=1e-5)
        only_style = _hand_loss(pair, x, 7, {"style": beta, "content": 1.0}, estimator)
        assert weighted_loss(beta, ["style"]) == pytest.approx(only_style, rel=1e-5)
    # the weight matters: beta = 3 and beta = 1 differ by 2 * KL at the same draw
    assert _hand_loss(pair, x, 7, {"style": 3.0, "content": 3.0}, estimator) != pytest.approx(
        _hand_loss(pair, x, 7, {"style": 1.0, "content": 1.0}, estimator), rel=1e-3)


def test_diagnose_runs_nuts_over_both_latent_sites_and_fits_q_star_per_site(two_sites):
    pair, x = two_sites
    result = diagnose(pair, x, n_examples=4, mcmc_examples=1, eval_k=100, svi_steps=10, num_samples=20,
                      warmup=20, chains=1, seed=0)
    assert result.nuts.z.shape == (1, 20, 1, 5)
    assert result.summary["mcmc"]["coordinates"] == ["style_0", "style_1", "content_0", "content_1",
                                                     "content_2"]
    assert all(math.isfinite(b["mean"]) for b in result.summary["bounds"].values())
    assert active_units(pair, x) <= 5


def test_figures_of_two_sites_skip_the_traversal_with_a_one_line_warning(two_sites, tmp_path):
    pair, x = two_sites
    with pytest.warns(UserWarning, match="skipped traversal.png: a traversal varies the coordinates of one "
                                         "continuous latent site; this pair has 2") as caught:
        paths = save_figures(pair, x, tmp_path, n_samples=9)
    _assert_pngs(paths, ["samples.png", "reconstructions.png", "latent_map.png"])
    assert all("\n" not in str(w.message) for w in caught)


class NoMean(TwoSites):
    """The same pair, but its observed distribution has no closed-form mean."""

    def observe(self, loc, x):
        noise = dist.TransformedDistribution(dist.Normal(loc, 1.0), [dist.transforms.ExpTransform()])
        pyro.sample("pixels", noise.to_event(1), obs=x + 1.0)


def test_figures_that_cannot_be_made_are_skipped_not_raised(two_sites, tmp_path):
    pair, x = two_sites
    with pytest.warns(UserWarning) as caught:
        paths = save_figures(NoMean(), x, tmp_path / "no-mean", n_samples=9)
    assert [p.name for p in paths] == ["latent_map.png"]
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipped")]
    assert len(skipped) == 3 and all("has no .mean" in m for m in skipped[:2])
    with pytest.warns(UserWarning, match="pictures need data of shape") as caught:
        paths = save_figures(pair, x.flatten(1), tmp_path / "flat", n_samples=9)  # not pictures
    assert [p.name for p in paths] == ["latent_map.png"]


# ------------------------------------------------------------ what cannot be supported


def _global_latent_pair():
    """A latent "shift" shared by all examples: outside the data plate."""
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift + x.new_zeros(x.shape), 1.0).to_event(3), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(x.mean(), 1.0))

    return model, guide


@pytest.mark.parametrize("entry", ["evaluate", "compare", "diagnose", "save_figures", "active_units"])
def test_a_global_latent_is_refused_in_one_line(entry, digits, tmp_path):
    x = digits[1][:8]
    calls = {
        "evaluate": lambda pair: evaluate(pair, x, eval_k=10),
        "compare": lambda pair: compare(pair, x, estimators=["mc"], particles=[1], repeats=2, eval_k=5),
        "diagnose": lambda pair: diagnose(pair, x, n_examples=4, mcmc_examples=0, eval_k=10, svi_steps=1),
        "save_figures": lambda pair: save_figures(pair, x, tmp_path),
        "active_units": lambda pair: active_units(pair, x),
    }
    with pytest.raises(InputError) as err:
        calls[entry](_global_latent_pair())
    message = str(err.value)
    assert "site 'shift' is not inside the data plate" in message and "global latent" in message
    assert "\n" not in message
    assert not list(tmp_path.iterdir())


def _pair(latent=None, observe=True, extra_guide_site=False):
    """A pair with one per-example latent site "u" (prior and guide `latent`, default N(0, 1),
    expanded per example)."""
    latent = dist.Normal(0.0, 1.0) if latent is None else latent

    def model(x):
        with pyro.plate("data", x.shape[0]):
            u = pyro.sample("u", latent.expand([x.shape[0]]))
            if observe:
                pyro.sample("x", dist.Normal(u[:, None, None, None] + x.new_zeros(x.shape), 1.0).to_event(3),
                            obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", latent.expand([x.shape[0]]))
            if extra_guide_site:
                pyro.sample("v", dist.Normal(0.0, 1.0).expand([x.shape[0]]))

    return model, guide


class _PointMass(TwoSites):
    is_autoencoder = True


REFUSED = [
    ("evaluate", lambda: object(), "is not a model/guide pair"),
    ("evaluate", lambda: _pair(observe=False), "the model must have exactly one observed sample site"),
    ("diagnose", lambda: _pair(extra_guide_site=True), "is sampled in the guide but not in the model"),
    ("diagnose", lambda: _pair(latent=dist.LogNormal(0.0, 1.0)), "not the real numbers"),
    ("compare", _PointMass, "it has no ELBO to estimate"),
]


@pytest.mark.parametrize("entry, pair, message", REFUSED, ids=[r[2] for r in REFUSED])
def test_what_a_pair_cannot_offer_is_refused_in_one_line(entry, pair, message, digits):
    """The rows of docs/errors.md's table for model/guide pairs."""
    x = digits[1][:8]
    calls = {
        "evaluate": lambda p: evaluate(p, x, eval_k=10),
        "compare": lambda p: compare(p, x, estimators=["mc"], particles=[1], repeats=2, eval_k=5),
        "diagnose": lambda p: diagnose(p, x, n_examples=4, mcmc_examples=0, eval_k=10, svi_steps=1),
    }
    with pytest.raises(InputError, match=message) as err:
        calls[entry](pair())
    assert "\n" not in str(err.value)
    assert message in (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
