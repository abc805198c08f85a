"""`pyro-vae compare` on an M2 run: enum, score and relaxed side by side, and what it refuses."""

import json
import math

import pyro
import pytest

from pyro_vae.cli import main
from pyro_vae.evaluation.compare_discrete import (
    DEFAULT_TEMPERATURE,
    GROUPS,
    bound_draw,
    estimating,
    fit_baseline,
)
from pyro_vae.evaluation.compare_measures import SURROGATE_LABEL, estimates_figure
from pyro_vae.inference.discrete import make_discrete_estimator
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import prepare_data

NO_LATENT = ["--labels", "50", "--epochs", "1", "--train-size", "400", "--test-size", "120", "--hidden", "32",
             "--quiet"]
TINY = [*NO_LATENT, "--eval-k", "20", "--z-dim", "4"]
REPEATS, BATCH = 20, 32
SMALL = ["--repeats", str(REPEATS), "--batch-size", str(BATCH), "--eval-k", "50", "--quiet"]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    """A 1-epoch M2 on 400 digits (50 labelled), trained with enum."""
    run = tmp_path_factory.mktemp("m2") / "run"
    assert main(["train", "--model", "m2", *TINY, "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def compared(m2_run):
    """The run compared with the three estimators (the default for M2), seed 0."""
    assert main(["compare", str(m2_run), *SMALL]) == 0
    return m2_run, json.loads((m2_run / "compare.json").read_text())


def _rows(record):
    return {row["estimator"]: row for row in record["estimators"]}


def test_the_record_has_the_three_estimators_with_every_group(compared):
    run, record = compared
    for name in ("compare.json", "compare.md", "compare_snr.png", "compare_estimates.png"):
        assert (run / name).stat().st_size > 0
    assert [row["estimator"] for row in record["estimators"]] == ["enum", "score", "relaxed"]
    assert record["kind"] == "m2" and record["n_examples"] == BATCH and record["repeats"] == REPEATS
    assert record["temperature"] == DEFAULT_TEMPERATURE  # trained with enum: no final temperature of its own
    assert "fitted by least squares" in record["score_baseline"]
    for row in record["estimators"]:
        numbers = [row["value_mean"], row["value_std"], row["bias"], row["ms_per_step"],
                   *(row[g][m] for g in GROUPS for m in ("grad_var", "snr"))]
        assert all(math.isfinite(v) for v in numbers), row
        assert row["value_mean"] < 0 and row["value_std"] > 0 and len(row["batch_means"]) == REPEATS
    assert [row["surrogate"] for row in record["estimators"]] == [False, False, True]
    assert _rows(record)["relaxed"]["objective"] == f"surrogate (tau={DEFAULT_TEMPERATURE:g}), not a bound"
    table = (run / "compare.md").read_text()
    assert "| estimator | objective | estimate (nats) |" in table and "classifier SNR" in table
    assert "| relaxed | surrogate (tau=0.5), not a bound |" in table and "relaxed ELBO" not in table
    assert sum(line.startswith(("| enum |", "| score |", "| relaxed |")) for line in table.splitlines()) == 3


def test_enum_and_score_estimate_the_same_bound_and_enum_spreads_less(compared):
    """Both are unbiased for U(x), so their means agree within their standard errors; enum's one draw
    is sum_y q(y) f(y, z_y), whose variance sum_y q(y)^2 var_z f <= E_y var_z f is at most score's
    (which adds var_y E_z f): the per-example variance of enum is below score's, by more than the
    sampling error of a variance averaged over N examples of R draws each (relative s.e. sqrt(2/((R-1)N)))."""
    _, record = compared
    enum, score = _rows(record)["enum"], _rows(record)["score"]
    assert abs(enum["value_mean"] - score["value_mean"]) < 4 * math.hypot(enum["value_mean_se"],
                                                                          score["value_mean_se"])
    rel_se = math.sqrt(2 / ((REPEATS - 1) * BATCH))
    assert enum["value_std"] ** 2 * (1 + 4 * rel_se) < score["value_std"] ** 2 * (1 - 4 * rel_se)


def test_enum_gives_the_classifier_a_higher_gradient_snr_than_the_score_function(compared):
    """enum's classifier gradient has no score-function noise (the sum over y is exact; only z is drawn)."""
    _, record = compared
    rows = _rows(record)
    assert rows["enum"]["classifier"]["snr"] > rows["score"]["classifier"]["snr"]
    assert rows["enum"]["classifier"]["grad_var"] < rows["score"]["classifier"]["grad_var"]


@pytest.mark.parametrize("name", ["enum", "score", "relaxed"])
def test_a_bound_draw_sums_to_minus_the_estimators_loss(m2_run, name):
    """The per-example values compare reports are those the estimator's loss adds up (same draws)."""
    config, m2 = load_model(m2_run)
    data = prepare_data(config)
    x = data.test_x[:BATCH]
    baseline = fit_baseline(m2, data.train_x[:100].bernoulli())
    with estimating(m2, name, DEFAULT_TEMPERATURE, baseline):
        pyro.set_rng_seed(3)
        value = float(bound_draw(m2.model, m2.guide, x).sum())
        pyro.set_rng_seed(3)
        loss = make_discrete_estimator(name).loss(m2.model, m2.guide, x)
    assert value == pytest.approx(-loss, rel=1e-5)
    assert not m2.training and m2.discrete == "enum"  # restored


def test_temperature_flag_and_one_estimator(m2_run, tmp_path):
    argv = ["compare", str(m2_run), "--estimators", "relaxed", "--temperature", "0.3", "--out", str(tmp_path),
            "--repeats", "3", "--batch-size", "8", "--eval-k", "10", "--quiet"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "compare.json").read_text())
    assert [r["estimator"] for r in record["estimators"]] == ["relaxed"] and record["temperature"] == 0.3
    assert record["estimators"][0]["objective"] == "surrogate (tau=0.3), not a bound"


def test_the_estimates_figure_draws_the_surrogate_apart_from_the_bounds(compared):
    """compare_estimates.png's data: the bounds' boxes first, the surrogate's after a dotted divider, in
    their own colour, under their own legend entry "surrogate, not a bound"; the reference line apart."""
    _, record = compared
    ax = estimates_figure(record).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["enum\nK=1", "score\nK=1", "relaxed\nK=1"]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["bound", SURROGATE_LABEL, f"log p(x), IWAE k={record['k_ref']}"]
    assert SURROGATE_LABEL == "surrogate, not a bound"
    assert handles[0].get_facecolor() != handles[1].get_facecolor()
    boxes = [p for p in ax.patches if p.get_facecolor() == handles[1].get_facecolor()]
    assert len(boxes) == 1 and boxes[0].get_path().get_extents().x0 > 2.5  # the relaxed box, third place
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [2.5]


def test_a_vae_comparison_draws_bounds_only():
    record = {"estimators": [{"estimator": "mc", "particles": 1, "batch_means": [-3.0, -2.0]}],
              "log_px_ref": -1.0, "k_ref": 10, "repeats": 2, "n_examples": 4}
    labels = estimates_figure(record).axes[0].get_legend_handles_labels()[1]
    assert labels == ["bound", "log p(x), IWAE k=10"]


BAD = [
    (["--estimators", "mc"], "unknown estimator 'mc' in --estimators for an M2 run"),
    (["--estimators", "enum:5"], "unknown estimator 'enum:5' in --estimators for an M2 run"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--train-epochs", "1"], "--train-epochs is not supported for an M2 run"),
]


@pytest.mark.parametrize("flags, expected", BAD, ids=[b[1] for b in BAD])
def test_bad_input_on_an_m2_run_is_one_line_and_writes_nothing(flags, expected, m2_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(m2_run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_a_classifier_run_is_refused(tmp_path, capsys):
    run = tmp_path / "classifier"
    assert main(["train", "--model", "classifier", *NO_LATENT, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "classifier baseline (model 'classifier'): it has no latent" in err, err
    assert not (tmp_path / "out").exists()


def test_an_m2_config_is_refused(tmp_path, capsys):
    config = tmp_path / "m2.yaml"
    config.write_text("model: m2\nlabels: 50\nepochs: 1\n")
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compare measures a trained M2: give its run directory" in err, err


def test_a_run_trained_relaxed_and_one_trained_with_score_bring_their_own_temperature_and_baseline(tmp_path):
    relaxed, score = tmp_path / "relaxed", tmp_path / "score"
    assert main(["train", "--model", "m2", *TINY, "--discrete", "relaxed", "--temperature", "1.0",
                 "--temperature-final", "0.7", "--out", str(relaxed)]) == 0
    assert main(["train", "--model", "m2", *TINY, "--discrete", "score", "--out", str(score)]) == 0
    for run in (relaxed, score):
        assert main(["compare", str(run), "--repeats", "3", "--batch-size", "8", "--eval-k", "10",
                     "--quiet"]) == 0
    assert json.loads((relaxed / "compare.json").read_text())["temperature"] == 0.7
    assert json.loads((score / "compare.json").read_text())["score_baseline"].startswith("the run's b(x)")
