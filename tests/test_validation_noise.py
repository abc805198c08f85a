"""scripts/validation_noise.py: the spread of the early-stopping criterion over draws of z, and the
epoch-to-epoch changes it is set against."""

import json
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2

from pyro_vae.cli import main as cli
from pyro_vae.inference.scores import elbo_terms
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import validation_noise as script  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("valnoise") / "run"
    assert cli(["train", "--out", str(out), "--train-size", "400", "--validation-size", "100", "--test-size",
                "50", "--epochs", "4", "--hidden", "32", "--z-dim", "4", "--eval-k", "5", "--quiet"]) == 0
    return out


def test_epoch_changes_are_the_differences_of_consecutive_epochs_past_the_first(tmp_path):
    values = {1: -10.0, 2: -9.5, 3: -9.75, 5: -9.0, 6: -8.0}
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 1.0, "validation_elbo": v} for e, v in values.items()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.epoch_changes(tmp_path, 0) == [0.5, -0.25, 1.0]  # epoch 5 has no epoch 4 before it
    assert script.epoch_changes(tmp_path, 2) == [-0.25, 1.0]


REPEATS = 40
TAIL = 1e-4


def test_the_spread_over_draws_is_the_validation_mean_s_standard_error(run):
    """s_draw^2 against sum_i v_i / N^2, v_i each example's variance over independent single draws:
    (R - 1) s_draw^2 / sigma^2 follows chi-square with R - 1 degrees of freedom."""
    result = script.main([str(run), "--repeats", str(REPEATS)])
    config, vae = load_model(run)
    val_x = prepare_data(config).val_x
    torch.manual_seed(123)
    with torch.no_grad():
        per_example = torch.stack([elbo_terms(vae.model, vae.guide, val_x)["elbo"] for _ in range(200)])
    sigma2 = float(per_example.var(dim=0).sum()) / val_x.shape[0] ** 2
    ratio = (REPEATS - 1) * result["sd_draw"] ** 2 / sigma2
    assert chi2.ppf(TAIL / 2, REPEATS - 1) < ratio < chi2.ppf(1 - TAIL / 2, REPEATS - 1)
    assert result["epochs"] == 3  # epochs 2, 3, 4 against their predecessors (no warm-up)
    changes = script.epoch_changes(run, 0)
    assert result["sd_epoch_change"] == pytest.approx(torch.tensor(changes).std().item())
    assert result["draw_share_of_variance"] == pytest.approx(2 * result["sd_draw"] ** 2
                                                             / result["sd_epoch_change"] ** 2)
