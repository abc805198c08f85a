"""The `pyro-vae` command end to end on digits: run directory contract, evaluate, sample, config
files, resume, and bad input (exit 2, one line on stderr, nothing written)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.training.run_dir import load_model

from .conftest import QUICK, assert_log_px_at_least_elbo, run_values

FIGURES = ("samples.png", "reconstructions.png", "traversal.png", "latent_map.png", "curves.png")


def test_train_writes_every_file_of_the_run_directory(digits_run):
    names = {p.name for p in digits_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", *FIGURES} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    for figure in FIGURES:
        with Image.open(digits_run / figure) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_config_json_records_every_setting_and_rebuilds_the_model(digits_run):
    recorded = json.loads((digits_run / "config.json").read_text())
    assert recorded.pop("x_shape") == [1, 8, 8]
    assert set(recorded) == set(Config().to_dict())
    assert recorded["epochs"] == 3 and recorded["train_size"] == 400
    config, vae = load_model(digits_run)
    assert config == Config.from_dict(recorded)
    state = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, state["model"][name])


def test_metrics_has_one_line_per_epoch_and_the_loss_falls(digits_run):
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [4, 8, 12]  # ceil(400 / 128) steps per epoch
    for r in rows:
        assert set(r) >= {"epoch", "step", "train_loss", "test_elbo", "seconds"}
        assert r["test_elbo"] < 0 < r["train_loss"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_summary_reports_bounds_in_nats_per_example(digits_run):
    s = json.loads((digits_run / "summary.json").read_text())
    assert s["n_examples"] == 120 and s["k"] == 20 and s["epochs"] == 3
    assert s["test_elbo"] < 0 and s["log_px"] < 0
    assert s["kl"] >= 0
    assert s["test_elbo"] == pytest.approx(s["recon"] - s["kl"], abs=1e-3)
    # log p(x) estimated by IWAE is a tighter bound than the ELBO (up to Monte Carlo error, paired)
    assert_log_px_at_least_elbo(run_values(digits_run))


def test_evaluate_writes_eval_json_with_the_requested_k(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--eval-k", "50", "--test-size", "40", "--device", "cpu"]) == 0
    result = json.loads((digits_run / "eval.json").read_text())
    assert {"test_elbo", "log_px", "kl", "recon", "active_units", "k", "n_examples"} <= set(result)
    assert result["k"] == 50 and result["n_examples"] == 40
    assert 0 <= result["active_units"] <= 20
    out = capsys.readouterr().out
    assert "log p(x), k=50" in out and "eval.json" in out


def test_evaluate_is_seeded(digits_run):
    """The same evaluation twice gives the same numbers; another --seed draws other importance samples."""
    argv = ["evaluate", str(digits_run), "--eval-k", "20", "--test-size", "30", "--device", "cpu", "--quiet"]

    def log_px(*more: str) -> float:
        assert main(argv + list(more)) == 0
        result = json.loads((digits_run / "eval.json").read_text())
        assert result["seed"] == (int(more[-1]) if more else 0)
        return result["log_px"]

    torch.manual_seed(123)  # whatever the caller's state, the evaluation draws from its seed
    first = log_px()
    torch.manual_seed(456)
    assert log_px() == first
    assert log_px("--seed", "1") != first


@pytest.mark.parametrize("quiet", [False, True])
def test_evaluate_shows_its_progress_unless_quiet(digits_run, capsys, quiet):
    argv = ["evaluate", str(digits_run), "--eval-k", "30", "--test-size", "20", "--device", "cpu"]
    assert main(argv + ["--quiet"] * quiet) == 0
    assert ("log p(x), k=30" in capsys.readouterr().err) != quiet


def test_sample_writes_the_figures(digits_run, capsys):
    for figure in FIGURES[:4]:
        (digits_run / figure).unlink()
    capsys.readouterr()
    assert main(["sample", str(digits_run), "--n", "16", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for figure in FIGURES[:4]:
        assert f"wrote {digits_run / figure}" in printed
        assert (digits_run / figure).stat().st_size > 0


def test_config_file_is_read_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\nz-dim: 3\nhidden: [32, 16]\nlr: 0.002\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--z-dim", "4", "--out", str(out), *QUICK]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["z_dim"] == 4 and recorded["hidden"] == [32, 16] and recorded["lr"] == 0.002
    assert recorded["epochs"] == 1


def test_json_config_file_works_like_yaml(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"epochs": 1, "estimator": "analytic", "particles": 2, "z_dim": 2}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), *QUICK]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["estimator"] == "analytic" and recorded["particles"] == 2


@pytest.mark.parametrize("encoder, likelihood, binarize", [
    ("conv", "bernoulli", "static"), ("mlp", "gaussian", "none"),
])
def test_other_networks_and_likelihoods_train_to_finite_numbers(tmp_path, encoder, likelihood, binarize):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--encoder", encoder, "--likelihood", likelihood,
            "--binarize", binarize, "--out", str(out), *QUICK]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(s[k]) for k in ("test_elbo", "log_px", "kl", "recon"))


def test_resume_continues_to_the_same_result_as_one_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--epochs", "3", "--out", str(straight), *QUICK]) == 0
    assert main(["train", "--epochs", "2", "--out", str(split), *QUICK]) == 0
    assert main(["train", "--resume", str(split), "--epochs", "3", "--quiet"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_resume_refuses_a_changed_model_setting(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--z-dim", "5", "--epochs", "2"]) == 2
    assert "z_dim" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_an_input_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_console_command_prints_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--prior", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pyro-vae: error: unknown prior 'nope': choose one of normal, learned, mog, vamp, exemplar, or add "
        "your own (register_prior, --plugin MODULE, or MODULE:FACTORY)"
    ]
