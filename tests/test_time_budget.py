"""--time-budget MINUTES: training stops at the first epoch end past the budget, counted over every
session of the run, and summary.json says why training stopped."""

import json
import shutil

import pytest

from pyro_vae.cli import main
from pyro_vae.training.train import Trainer

TINY = ["--train-size", "200", "--test-size", "40", "--hidden", "16", "--z-dim", "3", "--eval-k", "5",
        "--batch-size", "50", "--quiet"]


def _read(run, name):
    return json.loads((run / name).read_text())


def _epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def clock(monkeypatch):
    """A run's wall time made to be 25 s per finished epoch (epochs before this session included)."""
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 25.0 * (self.epoch - 1))


def test_training_stops_at_the_first_epoch_end_past_the_budget(clock, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "50", "--time-budget", "1", "--out", str(run), *TINY]) == 0
    assert _epochs(run) == [1, 2, 3]  # 50 s after two epochs is under 60 s; 75 s after three is past it
    summary = _read(run, "summary.json")
    assert summary["stop_reason"] == "time_budget" and summary["time_budget_minutes"] == 1.0
    assert _read(run, "config.json")["time_budget"] == 1.0


def test_the_budget_counts_the_earlier_sessions_and_may_change_on_resume(clock, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--out", str(run), *TINY[:-1]]) == 0
    assert _read(run, "summary.json")["stop_reason"] == "epochs"
    assert main(["train", "--resume", str(run), "--epochs", "50", "--time-budget", "1.5", "--quiet"]) == 0
    assert _epochs(run) == [1, 2, 3, 4]  # 75 s after three epochs is under 90 s; 100 s is past it
    assert _read(run, "summary.json")["stop_reason"] == "time_budget"
    assert main(["train", "--resume", str(run), "--epochs", "50", "--time-budget", "1", "--quiet"]) == 0
    assert _epochs(run) == [1, 2, 3, 4]  # already past a 60 s budget: no epoch more


def test_without_a_budget_the_real_clock_never_stops_training(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "3", "--out", str(run), *TINY]) == 0
    assert _epochs(run) == [1, 2, 3]
    summary = _read(run, "summary.json")
    assert summary["stop_reason"] == "epochs" and summary["time_budget_minutes"] is None


def test_a_run_written_before_time_budget_existed_still_evaluates_and_resumes(digits_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(digits_run, run)
    config = _read(run, "config.json")
    del config["time_budget"]
    (run / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    with pytest.warns(UserWarning, match="result file"):  # the evaluation just made describes epoch 3
        assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 0
    assert _epochs(run)[-1] == 4
