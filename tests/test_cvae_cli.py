"""The conditional VAE and its NN baseline as model kinds (--model cvae / nn-baseline --condition ...):
train -> evaluate -> report -> sample from the command line on the embedded digits, every estimator
training the cvae kind, the importance-sampled conditional log-likelihood against the ELBO, and the
figures."""

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.data import CLASS_NAMES
from pyro_vae.errors import InputError
from pyro_vae.evaluation.latents import encode
from pyro_vae.models import cvae as cvae_module
from pyro_vae.models.conditions import ClassLabel
from pyro_vae.models.cvae import CVAE_KIND, build_cvae, class_names_of
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import train
from pyro_vae.training.train_data import prepare_data

from .conftest import N_SE

SMALL = ["--dataset", "digits", "--train-size", "300", "--test-size", "80", "--hidden", "32", "--batch-size",
         "50", "--lr", "0.01", "--quiet"]  # a cvae run adds --z-dim 4 (the baseline has no latent)
ESTIMATORS = ("mc", "analytic", "iwae", "stl", "iwae-dreg")


def _train(out: Path, *flags: str) -> Path:
    assert main(["train", *SMALL, *flags, "--out", str(out)]) == 0
    return out


def _values(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "eval_examples.pt", weights_only=True)


@pytest.fixture(scope="module")
def quadrant_runs(tmp_path_factory):
    """A cvae and an nn-baseline run on quadrants:1, same seed and training settings, both evaluated."""
    root = tmp_path_factory.mktemp("quadrants")
    cvae = _train(root / "cvae", "--model", "cvae", "--condition", "quadrants:1", "--epochs", "3",
                  "--z-dim", "4", "--eval-k", "20")
    baseline = _train(root / "baseline", "--model", "nn-baseline", "--condition", "quadrants:1", "--epochs",
                      "3")
    for run in (cvae, baseline):
        assert main(["evaluate", str(run), "--eval-k", "200", "--quiet"]) == 0
    return cvae, baseline


def test_a_quadrant_cvae_run_trains_the_baseline_first_as_a_baseline_run_does(quadrant_runs):
    """The cvae run's frozen baseline is the one `--model nn-baseline` trains with the same settings: its
    exact log p(x_m | x_given) agrees per example."""
    cvae, baseline = quadrant_runs
    torch.testing.assert_close(_values(cvae)["baseline_log_px"], _values(baseline)["log_px"], rtol=1e-5,
                               atol=1e-5)  # float32 sums in other orders


def test_evaluate_writes_the_conditional_log_likelihood_beside_the_elbo_and_the_baseline(quadrant_runs):
    cvae, _ = quadrant_runs
    record, values = json.loads((cvae / "eval.json").read_text()), _values(cvae)
    assert record["log_px_of"] == "log p(x_missing | x_given)" and record["condition"] == "quadrants:1"
    assert record["k"] == 200 and record["n_examples"] == 80
    for name, (a, b) in {"log_px_minus_elbo": ("log_px", "elbo"),
                         "log_px_minus_baseline": ("log_px", "baseline_log_px"),
                         "test_elbo_minus_baseline": ("elbo", "baseline_log_px")}.items():
        d = values[a] - values[b]
        assert record[name] == pytest.approx(float(d.mean()))
        assert record[f"{name}_se"] == pytest.approx(float(d.std()) / math.sqrt(len(d)))
    # the likelihood scores the three missing quadrants only: a baseline predicting 1/2 everywhere
    # would score 48 * log(1/2); the trained models do better
    assert record["baseline_log_px"] > 48 * math.log(0.5) and record["log_px"] > 48 * math.log(0.5)


def test_the_importance_sampled_estimate_is_at_least_the_elbo_on_average(quadrant_runs):
    """log (1/k) sum_j w_j >= ELBO in expectation: the paired mean is above -N_SE paired standard errors."""
    values = _values(quadrant_runs[0])
    gap = (values["log_px"] - values["elbo"]).double()
    assert float(gap.mean()) > -N_SE * float(gap.std()) / math.sqrt(len(gap))


def test_report_pairs_a_cvae_with_its_baseline_on_the_same_test_examples(quadrant_runs, tmp_path, capsys):
    cvae, baseline = quadrant_runs
    assert main(["report", str(baseline), str(cvae), "--out", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "report.json").read_text())["runs"]}
    d = (_values(cvae)["log_px"] - _values(baseline)["log_px"]).double()
    assert rows["cvae"]["diff_log_px"] == pytest.approx(float(d.mean()))
    assert rows["cvae"]["diff_log_px_se"] == pytest.approx(float(d.std()) / math.sqrt(len(d)))
    assert "log p(x_missing | x_given) (--condition quadrants:1)" in (tmp_path / "report.md").read_text()


def test_a_quadrant_run_draws_the_completions_figure(quadrant_runs):
    cvae, baseline = quadrant_runs
    assert (cvae / "completions.png").is_file() and (baseline / "completions.png").is_file()
    assert not (cvae / "class_samples.png").exists()


def test_class_condition_train_evaluate_sample_a_class(tmp_path, capsys):
    run = _train(tmp_path / "class", "--model", "cvae", "--condition", "class", "--epochs", "2",
                 "--z-dim", "4", "--eval-k", "10")
    config = json.loads((run / "config.json").read_text())
    assert config["condition"] == "class" and config["classes"] == 10
    assert (run / "class_samples.png").is_file()
    assert main(["evaluate", str(run), "--eval-k", "30", "--quiet"]) == 0
    assert json.loads((run / "eval.json").read_text())["log_px_of"] == "log p(x | class)"
    capsys.readouterr()
    assert main(["sample", str(run), "--class", "7", "--n", "10", "--device", "cpu"]) == 0
    assert "samples_class_7.png" in capsys.readouterr().out
    assert (run / "samples_class_7.png").is_file()


def test_a_class_condition_stops_early_on_its_labelled_validation_images(tmp_path, monkeypatch):
    """The held-out validation images keep their labels, so a class-conditional run can stop early; its
    validation ELBO is the conditional one, given each image's own class."""
    seen = []
    original = CVAE_KIND.validation_elbo
    monkeypatch.setattr(type(CVAE_KIND), "validation_elbo",
                        lambda self, program, data: seen.append(data.val_y) or original(program, data))
    run = _train(tmp_path / "class", "--model", "cvae", "--condition", "class", "--epochs", "3",
                 "--z-dim", "4", "--eval-k", "5", "--validation-size", "60", "--early-stop", "2")
    assert len(seen) == 3 and all(y is not None and y.shape == (60,) for y in seen)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["validation_elbo"]) for r in rows)
    assert json.loads((run / "summary.json").read_text())["best_epoch"] in (1, 2, 3)


def test_sample_class_draws_n_samples_of_that_class_named_as_the_dataset_names_it():
    cvae = build_cvae((1, 8, 8), "class", hidden=(8,), z_dim=2, n_classes=10)
    names = class_names_of("fashion-mnist", cvae.condition)
    picture = CVAE_KIND.class_picture(cvae, 9, 10, 0, names)
    assert "Ankle boot" in picture.title and picture.tiles.shape == (2, 8, 3, 8, 8)
    assert bool((picture.tiles[1, 2:] == 1).all())  # the grid's 6 places after the 10 samples are blank
    assert class_names_of("digits", ClassLabel(10)) == [str(k) for k in range(10)]
    assert class_names_of("fashion-mnist", ClassLabel(10)) == list(CLASS_NAMES["fashion-mnist"])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_the_cvae_kind(estimator, tmp_path):
    """Each estimator raises the test conditional ELBO from the first epoch's to the fourth's; the
    analytic one uses the closed-form KL between the Gaussian guide and the Gaussian conditional prior."""
    config = Config(model="cvae", condition="quadrants:2", dataset="digits", train_size=300, test_size=80,
                    hidden=[32], z_dim=4, batch_size=50, lr=0.01, epochs=4, eval_k=5, estimator=estimator,
                    particles=1 if estimator in ("mc", "analytic") else 3, device="cpu")
    result = train(config, out=tmp_path / estimator, progress=False)
    first, last = result.metrics[0]["test_elbo"], result.metrics[-1]["test_elbo"]
    assert math.isfinite(last) and last > first, (first, last)
    if estimator == "analytic":
        assert result.summary["analytic_kl_sites"] == ["z"] and result.summary["monte_carlo_kl_sites"] == []


def test_a_resumed_cvae_run_keeps_its_baseline(tmp_path):
    """The baseline is trained once, when the run starts: resuming loads it from the checkpoint."""
    config = Config(model="cvae", condition="quadrants:3", dataset="digits", train_size=200, test_size=40,
                    hidden=[16], z_dim=2, epochs=1, eval_k=2, device="cpu")
    train(config, out=tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in load_model(tmp_path / "run")[1].baseline.state_dict().items()}
    train(replace(config, epochs=2), out=tmp_path / "run", resume=True, progress=False)
    after = load_model(tmp_path / "run")[1].baseline.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value)


def test_train_seconds_counts_the_baseline_trained_before_the_first_step(tmp_path, monkeypatch):
    """A quadrant run's baseline, trained before the CVAE's first step (here slowed by PAUSE seconds), is
    part of its training time: train_seconds >= the epochs' seconds + PAUSE, and so after a resume too."""
    pause, real = 2.0, cvae_module.train_baseline

    def slow(*args, **kwargs):
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(cvae_module, "train_baseline", slow)
    config = Config(model="cvae", condition="quadrants:1", dataset="digits", train_size=100, test_size=20,
                    hidden=[8], z_dim=2, epochs=1, eval_k=2, device="cpu")
    first = train(config, out=tmp_path / "run", progress=False)
    assert first.summary["train_seconds"] >= first.metrics[0]["seconds"] + pause
    resumed = train(replace(config, epochs=2), out=tmp_path / "run", resume=True, progress=False)
    assert resumed.summary["train_seconds"] >= sum(m["seconds"] for m in resumed.metrics) + pause


def test_a_cvae_run_logs_its_scalars_to_tensorboard(tmp_path):
    """The board's pictures and active units need a condition it does not have: the scalars only."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = Config(model="cvae", condition="quadrants:2", dataset="digits", train_size=100, test_size=20,
                    hidden=[8], z_dim=2, epochs=1, eval_k=2, device="cpu")
    train(config, out=tmp_path / "run", progress=False, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert "test/elbo" in events.Tags()["scalars"] and not events.Tags()["images"]


def test_a_nan_in_the_cvae_decoder_stops_training_naming_the_step_and_site(tmp_path, capsys, monkeypatch):
    """Fault location traces model and guide with the condition, as the step does."""
    calls, real_forward = {"n": 0}, torch.nn.Sequential.forward

    def poisoned(self, x):
        y = real_forward(self, x)
        if x.shape[-1] == 4 + 64 and self.training:  # the decoder reads [z (4), h(c) (8x8 pixels)]
            calls["n"] += 1
            if calls["n"] >= 10:  # from the 10th training step on
                y = y * float("nan")
        return y

    monkeypatch.setattr(torch.nn.Sequential, "forward", poisoned)
    assert main(["train", *SMALL, "--model", "cvae", "--condition", "quadrants:2", "--z-dim", "4", "--epochs",
                 "3", "--eval-k", "2", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "at step 10 (epoch 2)" in err and "model's sample site 'x'" in err


def test_encode_writes_the_moments_of_q_given_x_and_each_examples_condition(quadrant_runs, tmp_path):
    """`pyro-vae encode` on a cvae run: q(z | x, c) with the run's own condition of every test image; in
    Python the condition is passed as c, and a CVAE without one is refused in one line."""
    run, _ = quadrant_runs
    config, cvae = load_model(run)
    x = prepare_data(config).test_x
    c = cvae.condition.condition(x)
    out = tmp_path / "z.npz"
    assert main(["encode", str(run), "--out", str(out)]) == 0
    saved = np.load(out)
    q = cvae.posterior(x, c)
    np.testing.assert_allclose(saved["mean"], q.mean.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved["scale"], q.stddev.detach().numpy(), rtol=1e-5, atol=1e-6)
    other = encode(cvae, x, c=torch.full_like(c, -1.0))  # nothing given: another posterior
    assert not np.allclose(other["mean"], saved["mean"], atol=1e-3)
    with pytest.raises(InputError, match="q\\(z \\| x, c\\)"):
        encode(cvae, x)
    with pytest.raises(InputError, match="one row per example"):
        encode(cvae, x, c=c[:3])


def test_interpolate_and_diagnose_refuse_a_cvae_run_in_one_line(quadrant_runs, capsys):
    run, _ = quadrant_runs
    for command in (["interpolate", str(run), "--from", "0", "--to", "1"], ["diagnose", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "condition besides x" in err and err.count("\n") == 1
