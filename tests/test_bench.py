"""The benchmark compares like with like: the hand-written reference VAE has pyro-vae's architecture and
loss (same value and gradient for the same parameters and noise), and scripts/bench.py runs end to end,
reporting every row's ratio to the reference measured in the same run. No timing is asserted."""

import json
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributions.normal

from pyro_vae.inference.estimators import make_estimator
from pyro_vae.models.vae import build_vae

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench  # noqa: E402
from reference_vae import ReferenceVAE  # noqa: E402

X_SHAPE = (1, 8, 8)


@pytest.mark.parametrize("estimator", ["mc", "analytic"])
def test_the_reference_has_pyro_vaes_loss_and_gradient(estimator, monkeypatch):
    """Same parameters, same eps: float32 sums in another order, so agreement to ~1e-6 relative."""
    pyro.set_rng_seed(0)
    vae = build_vae(X_SHAPE, hidden=[16], z_dim=3)
    ref = ReferenceVAE(X_SHAPE, [16], 3)
    missing, unexpected = ref.load_state_dict(vae.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"prior.loc", "prior.scale"}
    x = torch.bernoulli(torch.rand(32, *X_SHAPE, generator=torch.Generator().manual_seed(1)))
    eps = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", lambda shape, dtype, device: eps)

    pyro_loss = make_estimator(estimator).differentiable_loss(vae.model, vae.guide, x) / x.shape[0]
    ref_loss = ref.loss(x, estimator, eps)
    assert float(ref_loss.detach()) == pytest.approx(float(pyro_loss.detach()), rel=1e-6)
    pyro_grads = torch.autograd.grad(pyro_loss, list(vae.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    for a, b in zip(ref_grads, pyro_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_benchmark_reports_every_row_against_the_reference(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--dataset", "digits", "--hidden", "16", "--z-dim", "2", "--steps", "2", "--repeats", "3",
                "--warmup", "2", "--epoch", "--eval-k", "10", "--iwae-n", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["meta"]["dataset"] == "digits" and result["meta"]["architecture"] == "64-16-2"
    for estimator in ("mc", "analytic"):
        rows = result["results"][estimator]
        assert list(rows) == ["reference", "reference, fused Adam", "pyro-vae"]  # no CUDA rows on CPU
        ref = rows["reference"]["ms_per_step_all"]
        for name, row in rows.items():
            assert len(row["ms_per_step_all"]) == 3 and row["epoch_s_measured"] > 0
            paired = sorted(t / r for t, r in zip(row["ms_per_step_all"], ref, strict=True))
            assert row["ratio_to_reference"] == pytest.approx(paired[1])  # the median of 3
            assert f"| {estimator} | {name} |" in printed
    assert result["iwae"]["images"] == 4 and result["iwae"]["k"] == 10


def test_the_benchmark_times_the_vampprior_step_against_the_normal_prior_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--dataset", "digits", "--hidden", "16", "--z-dim", "2", "--steps", "2", "--repeats", "3",
                "--warmup", "1", "--estimator", "mc", "--prior", "normal", "vamp", "--prior-components", "7",
                "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["results"]["mc"]
    assert list(rows)[-2:] == ["pyro-vae", "pyro-vae, VampPrior K=7"]
    paired = sorted(v / n for v, n in zip(rows["pyro-vae, VampPrior K=7"]["ms_per_step_all"],
                                          rows["pyro-vae"]["ms_per_step_all"], strict=True))
    assert result["meta"]["vamp_ratio"]["mc"] == pytest.approx(paired[1])
    assert "VampPrior (K=7) step / normal-prior step" in printed
