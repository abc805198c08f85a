"""The KL weight beta (poutine.scale on the latent site) and its linear warm-up."""

import json

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import build_vae
from pyro_vae.config import Config
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.inference.kl_weight import kl_weight, scale_latents
from pyro_vae.training.train import train


@pytest.fixture
def vae_and_batch():
    torch.manual_seed(0)
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=3)
    x = torch.rand(6, 1, 4, 4).round()
    return vae, x


def _traces(vae, x, beta, seed=1):
    pyro.set_rng_seed(seed)
    guide = poutine.trace(scale_latents(vae.guide, beta)).get_trace(x)
    model = poutine.trace(poutine.replay(scale_latents(vae.model, beta), trace=guide)).get_trace(x)
    return model, guide


def test_only_the_latent_site_is_scaled(vae_and_batch):
    vae, x = vae_and_batch
    model, guide = _traces(vae, x, 2.5)
    assert model.nodes["z"]["scale"] == 2.5 and guide.nodes["z"]["scale"] == 2.5
    assert model.nodes["x"]["scale"] == 1.0


def test_beta_one_leaves_the_functions_unwrapped(vae_and_batch):
    model = vae_and_batch[0].model
    assert scale_latents(model, 1.0) is model


@pytest.mark.parametrize("estimator", ["mc", "analytic"])
def test_weighted_loss_is_reconstruction_plus_beta_times_kl(vae_and_batch, estimator):
    """-ELBO_beta = -log p(x|z) + beta * KL-term at the same draw of z, for both KL estimators."""
    vae, x = vae_and_batch
    elbo = make_estimator(estimator)
    losses = {}
    for beta in (0.5, 1.0, 3.0):
        pyro.set_rng_seed(7)
        losses[beta] = elbo.loss(scale_latents(vae.model, beta), scale_latents(vae.guide, beta), x)
    model, guide = _traces(vae, x, 1.0, seed=7)
    recon = model.nodes["x"]["fn"].log_prob(x).sum().detach().item()
    kl = (losses[1.0] + recon)  # the KL term of the unweighted loss at this draw
    for beta, loss in losses.items():
        assert loss == pytest.approx(-recon + beta * kl, rel=1e-5, abs=1e-4)


def test_warm_up_rises_linearly_to_beta_then_stays():
    beta, epochs, per_epoch = 4.0, 2, 10
    weights = [kl_weight(beta, epochs, t, per_epoch) for t in range(30)]
    assert weights[0] == pytest.approx(beta / 20) and weights[0] > 0
    steps = torch.tensor(weights[:20]).diff()
    assert torch.allclose(steps, torch.full_like(steps, beta / 20))
    assert weights[19:] == [beta] * 11
    assert kl_weight(beta, 0, 0, per_epoch) == beta


def test_larger_beta_trains_a_smaller_kl(tmp_path):
    """The point of beta > 1: it trades reconstruction for rate (KL)."""
    summaries = {}
    for beta in (1.0, 8.0):
        config = Config(train_size=400, test_size=120, epochs=4, eval_k=5, beta=beta, seed=0)
        summaries[beta] = train(config, out=tmp_path / str(beta), progress=False).summary
    assert summaries[8.0]["kl"] < 0.5 * summaries[1.0]["kl"]
    assert summaries[8.0]["recon"] < summaries[1.0]["recon"]


def test_annealed_run_records_the_weight_per_epoch(tmp_path):
    config = Config(train_size=256, test_size=64, epochs=3, eval_k=5, batch_size=64, beta=2.0,
                    kl_anneal=2)
    out = train(config, out=tmp_path / "run", progress=False).out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_weight"] for r in rows] == pytest.approx([1.0, 2.0, 2.0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_elbo"] == pytest.approx(summary["recon"] - summary["kl"], abs=1e-3)
