"""On a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs them): the CLI end to end on the
device, eager and as a CUDA graph, and the same numbers on the GPU as on the CPU for the same
parameters and the same draws of z."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.cli import main
from pyro_vae.model import build_vae

from .conftest import QUICK

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
    assert main(["evaluate", str(run), "--k", "50", "--device", "cuda"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["log_px"] > ev["test_elbo"] - 3 * (ev["log_px_se"] + ev["test_elbo_se"])
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
