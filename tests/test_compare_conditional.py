"""compare on a conditional pair model(x, c) / guide(x, c): c follows x into model and guide everywhere
compare calls them. A linear-Gaussian pair of plain functions (pyro.module) whose exact posterior is its
guide, so that log p(x | c) is known and every estimator's bound is exact; the CVAE from Python against
score_conditional; `pyro-vae compare` on cvae runs (quadrants and class) and on a cvae config."""

import json
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.cli import main
from pyro_vae.data import binarize, load_dataset
from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare import compare, markdown
from pyro_vae.evaluation.conditional import score_conditional
from pyro_vae.models.cvae import build_cvae
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

from .conftest import N_SE
from .test_conditional import A, B, D, S, exact_log_likelihood

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
EXACT = ("mc", "stl", "iwae:5", "iwae-dreg:5")  # each a function of log w alone: exact when log w is constant


def exact_pair():
    """p(z | c) = N(W_p c, 1), p(x | z, c) = N(z + B c, S^2), with W_p = A I a network of the model, and
    q(z | x, c) = N(W_q [x, c], S^2 / (1 + S^2)) with W_q the exact posterior's: log w = log p(x | c) for
    every z. Plain functions; their networks reach the param store by pyro.module."""
    eye = torch.eye(D, dtype=torch.float64)
    prior_net = nn.Linear(D, D, bias=False).double()
    guide_net = nn.Linear(2 * D, D, bias=False).double()
    with torch.no_grad():
        prior_net.weight.copy_(A * eye)
        guide_net.weight.copy_(torch.cat([eye / (1 + S**2), (A - (A + B) / (1 + S**2)) * eye], dim=1))

    def model(x, c):
        pyro.module("prior_net", prior_net)
        with pyro.plate("data", c.shape[0]):
            z = pyro.sample("z", dist.Normal(prior_net(c), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + B * c, S).to_event(1), obs=x)

    def guide(x, c):
        pyro.module("guide_net", guide_net)
        with pyro.plate("data", c.shape[0]):
            pyro.sample("z", dist.Normal(guide_net(torch.cat([x, c], dim=-1)),
                                         (S**2 / (1 + S**2)) ** 0.5).to_event(1))

    return model, guide


@pytest.fixture(scope="module")
def linear_record():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(40, D, generator=g, dtype=torch.float64)
    x = (A + B) * c + (1 + S**2) ** 0.5 * torch.randn(40, D, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    record = compare(exact_pair(), x, estimators=["analytic", *EXACT], particles=[1], repeats=20, eval_k=50,
                     c=c)
    return record, float(exact_log_likelihood(x, c).mean())


def test_a_users_conditional_pair_is_compared_against_its_exact_conditional_log_likelihood(linear_record):
    record, exact = linear_record
    assert record["log_px_of"] == "log p(x | c)"
    assert record["log_px_ref"] == pytest.approx(exact, abs=1e-9)
    rows = {f"{r['estimator']}:{r['particles']}": r for r in record["estimators"]}
    for name in ("mc:1", "stl:1", "iwae:5", "iwae-dreg:5"):  # log w constant: every draw is log p(x | c)
        assert rows[name]["value_mean"] == pytest.approx(exact, abs=1e-9)
        assert rows[name]["value_std"] < 1e-9
    analytic = rows["analytic:1"]  # E_q log p(x | z, c) by one draw minus the closed-form KL: noisy, unbiased
    assert analytic["value_std"] > 0.1
    assert abs(analytic["value_mean"] - exact) <= N_SE * analytic["value_mean_se"]
    assert record["analytic_kl"] == {"analytic_kl_sites": ["z"], "monte_carlo_kl_sites": []}


def test_the_gradients_of_a_conditional_pair_are_grouped_by_guide_and_model_and_stl_sticks_the_landing(
        linear_record):
    """At the exact posterior, STL's guide gradient is zero for every draw (the pathwise derivative of
    log p(x, z | c) - log q(z | x, c), a constant in z); Trace_ELBO's keeps its score term's noise."""
    record, _ = linear_record
    rows = {r["estimator"]: r for r in record["estimators"]}
    for row in rows.values():
        assert (row["encoder"]["n_params"], row["decoder"]["n_params"]) == (2 * D * D, D * D)
    assert rows["stl"]["encoder"]["grad_var"] < 1e-20
    assert rows["mc"]["encoder"]["grad_var"] > 1e-6
    assert rows["stl"]["decoder"]["grad_var"] > 1e-6


def test_a_condition_without_one_row_per_example_is_refused_in_one_line():
    x = torch.zeros(6, D, dtype=torch.float64)
    with pytest.raises(InputError, match="one row per example of x") as err:
        compare(exact_pair(), x, estimators=["mc"], particles=[1], repeats=2, eval_k=5, c=x[:4])
    assert "\n" not in str(err.value)
    assert "one row per example of x" in ERRORS_MD.read_text()


@pytest.fixture(scope="module")
def cvae_batch():
    data = load_dataset("digits")
    x = binarize(data.test_x[:24], torch.Generator().manual_seed(0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    cvae = build_cvae(data.shape, "quadrants:2", hidden=(32,), z_dim=4)
    return cvae, x, cvae.condition.condition(x)


def test_the_cvaes_reference_is_score_conditionals_log_likelihood_and_every_bound_lies_below_it(cvae_batch):
    cvae, x, c = cvae_batch
    record = compare(cvae, x, estimators=["mc", "analytic", "iwae:5"], particles=[1], repeats=5, eval_k=100,
                     seed=3, c=c)
    assert record["log_px_of"] == "log p(x_missing | x_given)"
    scores = score_conditional(cvae, x, c, eval_k=100, seed=3)  # the same draws: the same estimate
    assert record["log_px_ref"] == pytest.approx(float(scores.log_lik.mean()), abs=1e-4)
    for row in record["estimators"]:
        assert row["value_mean"] <= record["log_px_ref"] + N_SE * row["value_mean_se"], row["estimator"]


def test_the_table_labels_the_conditional_reference_and_keeps_its_columns(cvae_batch):
    cvae, x, c = cvae_batch
    table = markdown(compare(cvae, x[:8], estimators=["mc"], particles=[1], repeats=2, eval_k=5, c=c[:8]))
    assert "Reference log p(x_missing | x_given) = " in table
    lines = [line for line in table.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]  # an escaped \| is not a column
    assert len(lines) == 3 and len(set(cells)) == 1
    assert "bias vs log p(x_missing \\| x_given)" in lines[0]


SMALL = ["--dataset", "digits", "--train-size", "200", "--test-size", "40", "--hidden", "16", "--batch-size",
         "50", "--z-dim", "2", "--eval-k", "5", "--quiet"]
COMPARE = ["--estimators", "mc", "analytic", "--particles", "1", "--repeats", "3", "--batch-size", "16",
           "--eval-k", "40", "--quiet"]


@pytest.mark.parametrize("condition, log_px_of", [("quadrants:1", "log p(x_missing | x_given)"),
                                                 ("class", "log p(x | class)")])
def test_compare_on_a_cvae_run_measures_it_with_the_test_images_conditions(condition, log_px_of, tmp_path):
    """compare.json's reference is the importance-sampled log p(x | c) of the run's first test images
    with their own conditions (the labels of the same images, for class), labelled as evaluate labels it."""
    run = tmp_path / "run"
    assert main(["train", "--model", "cvae", "--condition", condition, *SMALL, "--epochs", "1",
                 "--out", str(run)]) == 0
    assert main(["compare", str(run), *COMPARE]) == 0
    record = json.loads((run / "compare.json").read_text())
    assert (record["log_px_of"], record["condition"]) == (log_px_of, condition)
    assert all("skipped" not in row for row in record["estimators"])
    assert f"Reference {log_px_of} = " in (run / "compare.md").read_text()
    config, model = load_model(run)
    data = prepare_data(config)
    x = data.test_x[:16]
    c = model.condition.condition(x, data.test_y[:16])
    scores = score_conditional(model, x, c, eval_k=40, seed=0)
    assert record["log_px_ref"] == pytest.approx(float(scores.log_lik.mean()), abs=1e-4)


def test_compare_config_trains_a_class_cvae_with_each_estimator_and_scores_each_on_the_conditions(tmp_path):
    config = tmp_path / "cvae.yaml"
    config.write_text("model: cvae\ncondition: class\ndataset: digits\ntrain_size: 200\ntest_size: 40\n"
                      "hidden: [16]\nz_dim: 2\neval_k: 5\nbatch_size: 50\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--out", str(out), "--train-epochs", "1", *COMPARE]) == 0
    record = json.loads((out / "compare.json").read_text())
    assert record["log_px_of"] == "log p(x | class)" and record["model"].endswith("untrained")
    for row in record["estimators"]:
        final = row["final"]
        cfg, model = load_model(Path(final["run"]))
        assert cfg.estimator == row["estimator"]
        data = prepare_data(cfg)
        x = data.test_x[:16]
        scores = score_conditional(model, x, model.condition.condition(x, data.test_y[:16]), eval_k=40,
                                   seed=cfg.seed)
        assert final["log_px"] == pytest.approx(float(scores.log_lik.mean()), abs=1e-4)
        assert math.isfinite(final["log_px"])
    assert "log p(x \\| class) after 1 epochs" in (out / "compare.md").read_text()
