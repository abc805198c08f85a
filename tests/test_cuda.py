"""On a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs them): the CLI end to end on the
device, eager and as a CUDA graph, and the same numbers on the GPU as on the CPU for the same
parameters and the same draws of z."""

import json
import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.cli import main
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.inference.step import CUDAGraphStep, SVIStep
from pyro_vae.models.vae import build_vae

from .conftest import QUICK, assert_log_px_at_least_elbo

pytestmark = pytest.mark.cuda


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("graph", ["off", "on", "auto"])
def test_train_evaluate_and_sample_on_the_gpu(tmp_path, graph):
    run = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--cuda-graph", graph, "--epochs", "3", "--out", str(run),
                 *QUICK]) == 0
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) and r["test_elbo"] < 0 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert summary["cuda_graph"] is (graph != "off")  # auto: the graph, for our own VAE on one GPU
    assert main(["evaluate", str(run), "--eval-k", "50", "--device", "cuda"]) == 0
    assert_log_px_at_least_elbo(torch.load(run / "eval_examples.pt", weights_only=True))
    assert main(["sample", str(run), "--device", "cuda"]) == 0
    assert (run / "samples.png").stat().st_size > 1000


def test_log_densities_on_the_gpu_equal_those_on_the_cpu():
    """Same parameters, same z: log p(x|z), log p(z) and log q(z|x) agree to float32 rounding."""
    pyro.set_rng_seed(0)
    vae = build_vae((1, 8, 8), hidden=[32], z_dim=3)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)).bernoulli()
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    values = {}
    for device in ("cpu", "cuda"):
        vae.to(device)
        data = {"z": z.to(device)}
        model_trace = poutine.trace(poutine.condition(vae.model, data=data)).get_trace(x.to(device))
        guide_trace = poutine.trace(poutine.condition(vae.guide, data=data)).get_trace(x.to(device))
        values[device] = torch.stack([model_trace.nodes["x"]["fn"].log_prob(x.to(device)),
                                      model_trace.nodes["z"]["fn"].log_prob(data["z"]),
                                      guide_trace.nodes["z"]["fn"].log_prob(data["z"])]).cpu()
    assert values["cpu"].isfinite().all()
    torch.testing.assert_close(values["cuda"], values["cpu"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("estimator", ["mc", "analytic", "iwae", "stl", "iwae-dreg"])
def test_the_step_makes_no_host_sync_on_the_gpu(estimator):
    """After the first (validated) step, no step waits for the GPU: torch's sync debug mode raises on
    any synchronizing call."""
    pyro.set_rng_seed(0)
    vae = build_vae((1, 8, 8), hidden=[32], z_dim=3).cuda()
    elbo = make_estimator(estimator, 2 if estimator.startswith("iwae") else 1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
    step = SVIStep(lambda x, w: elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0], optimizer,
                   list(vae.parameters()), None, torch.device("cuda"))
    data = torch.rand(5, 16, 1, 8, 8, device="cuda").bernoulli()
    step(data[0], 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in data[1:]:
            step(x, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.fault() == 0


def test_pyros_svi_trains_our_vae_on_the_gpu():
    pyro.set_rng_seed(0)
    vae = build_vae((1, 8, 8), hidden=[32], z_dim=3).cuda()
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=make_estimator("mc"))
    x = torch.linspace(0.02, 0.98, 64, device="cuda").reshape(1, 1, 8, 8).expand(64, 1, 8, 8).bernoulli()
    losses = [svi.step(x) for _ in range(30)]
    assert all(not torch.equal(p, before[name]) for name, p in vae.named_parameters())
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("estimator", ["iwae", "stl", "iwae-dreg"])
def test_the_importance_weighted_step_is_captured_as_a_cuda_graph(estimator):
    pyro.set_rng_seed(0)
    vae = build_vae((1, 8, 8), hidden=[32], z_dim=3).cuda()
    elbo = make_estimator(estimator, 4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True, capturable=True)
    step = CUDAGraphStep(SVIStep(lambda x, w: elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0],
                                 optimizer, list(vae.parameters()), None, torch.device("cuda")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and goes on eagerly: make it fail here
        losses = [step(x, 1.0) for x in torch.rand(8, 16, 1, 8, 8, device="cuda").bernoulli()]
    assert step.graph is not None and torch.stack(losses).isfinite().all()
