"""The deterministic autoencoder baseline (--model ae): a Pyro program whose -ELBO is exactly the
reconstruction loss, trained and evaluated with the same commands as the VAE."""

import json

import pyro
import pytest
import torch

from pyro_vae import build_vae
from pyro_vae.cli import main
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import prepare_data

from .conftest import QUICK


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ae"
    assert main(["train", "--model", "ae", "--epochs", "3", "--out", str(out), *QUICK]) == 0
    return out


def test_loss_is_the_reconstruction_loss_at_the_code():
    """-ELBO of a point-mass guide and a flat p(z) = -log p(x | decoder(c(x))), with no randomness."""
    torch.manual_seed(0)
    ae = build_vae((1, 4, 4), hidden=[8], z_dim=3, model="ae")
    x = torch.rand(5, 1, 4, 4).round()
    code, _ = ae.encoder(x)
    expected = -ae.likelihood(ae.decoder(code)).log_prob(x).sum()
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        loss = make_estimator("mc").differentiable_loss(ae.model, ae.guide, x)
        assert torch.allclose(loss, expected)


def test_guide_is_a_point_mass_at_the_code():
    ae = build_vae((1, 4, 4), hidden=[8], z_dim=3, model="ae")
    x = torch.rand(4, 1, 4, 4)
    draws = torch.stack([ae.guide(x) for _ in range(3)])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], ae.encoder(x)[0])


def test_noise_latents_are_standard_normal():
    ae = build_vae((1, 4, 4), hidden=[8], z_dim=3, model="ae")
    z = ae.sample_latents(20000)
    se = 1 / 20000**0.5
    assert z.shape == (20000, 3)
    assert (z.mean(0).abs() < 5 * se).all() and ((z.var(0) - 1).abs() < 5 * 2**0.5 * se).all()


def test_run_reports_reconstruction_error_and_no_bound(ae_run):
    summary = json.loads((ae_run / "summary.json").read_text())
    assert summary["model"] == "ae"
    assert summary["test_elbo"] is None and summary["log_px"] is None
    config, ae = load_model(ae_run)
    x = prepare_data(config).test_x
    with torch.no_grad():
        mean = ae.decode(ae.encoder(x)[0])
        recon = ae.likelihood(ae.decoder(ae.encoder(x)[0])).log_prob(x)
    assert summary["mse"] == pytest.approx(float((mean - x).square().flatten(1).sum(1).mean()), rel=1e-4)
    assert summary["recon"] == pytest.approx(float(recon.mean()), rel=1e-4)
    rows = [json.loads(line) for line in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["test_elbo"] is None for r in rows)
    assert rows[-1]["test_recon"] > rows[0]["test_recon"]  # training improves reconstruction
    assert (ae_run / "samples.png").is_file()


def test_evaluate_says_there_is_no_bound(ae_run, capsys):
    assert main(["evaluate", str(ae_run), "--eval-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "squared error" in out and "no ELBO" in out and "log p(x), k=" not in out
