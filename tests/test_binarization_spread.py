"""scripts/binarization_spread.py: another Bernoulli draw of the same test images moves the test bound;
the script scores the run's model on several draws, and each draw is reproducible."""

import json
import math
import sys
from pathlib import Path

import pytest

from pyro_vae.cli import main as cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import binarization_spread as script  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spread") / "run"
    assert cli(["train", "--out", str(out), "--train-size", "200", "--test-size", "60", "--epochs", "2",
                "--hidden", "32", "--z-dim", "4", "--eval-k", "5", "--quiet"]) == 0
    return out


DRAWS = 12
T_TAIL = 5.92  # Student's t with DRAWS - 1 = 11 degrees of freedom: P(|T| > 5.92) = 1e-4


def test_draws_differ_and_repeat(run, capsys):
    first = script.main([str(run), "--draws", str(DRAWS), "--samples", "10"])
    again = script.main([str(run), "--draws", str(DRAWS), "--samples", "10"])
    assert first["means"] == again["means"]  # each draw is fixed by its seed
    assert len(set(first["means"])) == DRAWS and first["sd"] > 0  # the draws are different test sets
    assert first["own"] == pytest.approx(json.loads((run / "summary.json").read_text())["test_elbo"])
    # the run's own draw is one more draw of the same kind (10 z per image, as the summary's ELBO), not
    # equal to any: (own - mean) / (sd sqrt(1 + 1/n)) follows Student's t with n - 1 degrees of freedom
    assert first["own"] not in first["means"]
    assert abs(first["own"] - first["mean"]) < T_TAIL * first["sd"] * math.sqrt(1 + 1 / DRAWS)
    assert "s.d." in capsys.readouterr().out
