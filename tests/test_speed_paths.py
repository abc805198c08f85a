"""The fast training step (step.SVIStep) computes what the plain Pyro step computes, never waits for
the device (so it can run ahead of a GPU, and be captured in a CUDA graph), and never applies a
non-finite step, reporting it later with the step and the site named."""

import contextlib
import types

import pyro
import pytest
import torch
from pyro.infer import trace_elbo, trace_mean_field_elbo
from torch.overrides import TorchFunctionMode

from pyro_vae.cli import main
from pyro_vae.inference.estimators import ESTIMATORS, make_estimator
from pyro_vae.inference.step import CUDAGraphStep, SVIStep
from pyro_vae.models.vae import build_vae

X_SHAPE = (1, 8, 8)
# what makes the host wait for a CUDA device: a Python value read from a tensor, or a result whose size
# depends on the data
SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
         "masked_select", "unique", "equal"}


class _RecordSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


PYRO_ELBOS = {"mc": pyro.infer.Trace_ELBO, "analytic": pyro.infer.TraceMeanField_ELBO}


def _setup(estimator, seed: int = 0, fused: bool = True):
    pyro.set_rng_seed(seed)
    vae = build_vae(X_SHAPE, hidden=[16], z_dim=3)
    elbo = make_estimator(estimator)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2, fused=fused)
    data = torch.bernoulli(torch.rand(5, 32, *X_SHAPE, generator=torch.Generator().manual_seed(1)))
    return vae, elbo, optimizer, data


def _loss_fn(vae, elbo):
    return lambda x, weight: elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]


PYRO_HELPERS = [(module, name, getattr(module, name)) for module in (trace_elbo, trace_mean_field_elbo)
                for name in ("torch_item", "warn_if_nan")]


@pytest.mark.parametrize("clip", [None, 10.0])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_the_step_never_waits_for_the_device_nor_touches_pyros_state(estimator, clip):
    vae, elbo, optimizer, data = _setup(estimator)
    plain = _loss_fn(vae, elbo)
    helpers_seen = []

    def loss_fn(x, weight):  # what Pyro's modules hold while the loss is computed
        helpers_seen.append([getattr(module, name) for module, name, _ in PYRO_HELPERS])
        return plain(x, weight)

    step = SVIStep(loss_fn, optimizer, list(vae.parameters()), clip, torch.device("cpu"))
    step(data[0], 1.0)  # the first step runs Pyro's validation, which reads values on the host
    with _RecordSyncs() as mode:
        for x in data[1:]:
            step(x, 1.0)
    assert mode.seen == []
    assert all(seen == [original for _, _, original in PYRO_HELPERS] for seen in helpers_seen)
    assert not pyro.get_param_store().keys()  # the step optimizes the parameters itself: no param sites


@pytest.mark.parametrize("estimator", ["mc", "analytic"])
def test_the_step_matches_pyros_own_elbo_with_a_plain_adam_step(estimator):
    """Same seed, same batches: the step with our estimator, the step with Pyro's own ELBO object (it
    waits for the device, and still works) and a plain loop with Pyro's ELBO and per-tensor Adam. The
    losses agree to float32 rounding (sums in another order) and so do the parameters (fused vs.
    per-tensor Adam differ in rounding only, ~1e-9 a step; a missing or extra step would move them by
    ~lr = 1e-2)."""
    runs = {}
    for name, elbo in (("ours", estimator), ("pyro's", PYRO_ELBOS[estimator]())):
        vae, elbo, optimizer, data = _setup(elbo)
        step = SVIStep(_loss_fn(vae, elbo), optimizer, list(vae.parameters()), None, torch.device("cpu"))
        runs[name] = vae, [float(step(x, 1.0)) for x in data]
    assert isinstance(make_estimator(estimator), PYRO_ELBOS[estimator])

    plain_vae, _, plain_opt, data = _setup(estimator, fused=False)
    plain_elbo, plain = PYRO_ELBOS[estimator](), []
    for x in data:
        loss = plain_elbo.differentiable_loss(plain_vae.model, plain_vae.guide, x) / x.shape[0]
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        plain.append(float(loss.detach()))

    for vae, losses in runs.values():
        assert losses == pytest.approx(plain, rel=1e-6)
        for (name, a), b in zip(vae.named_parameters(), plain_vae.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_non_finite_step_is_not_applied_nor_any_after_it():
    vae, elbo, optimizer, data = _setup("mc")
    params = list(vae.parameters())
    plain = _loss_fn(vae, elbo)
    poison = {"from": 2}

    def loss_fn(x, weight):
        loss = plain(x, weight)
        return loss * float("nan") if poison["from"] <= 0 else loss

    step = SVIStep(loss_fn, optimizer, params, None, torch.device("cpu"))
    for x in data[:2]:
        step(x, 1.0)
    assert step.fault() == 0
    before = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
    poison["from"] = 0
    step(data[2], 1.0)
    poison["from"] = 1  # the next steps are finite again, and still not applied
    for x in data[3:]:
        step(x, 1.0)
    assert step.fault() == 3
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments, strict=True))
    assert all(int(optimizer.state[p]["step"]) == 2 for p in params)


@pytest.mark.parametrize("clip", [None, 10.0])
def test_a_non_finite_gradient_under_a_finite_loss_is_not_applied(clip):
    """The gradient check, not the loss check, must catch it: by the fused non-finite pass without
    clipping, by the gradient norm with it."""
    vae, elbo, optimizer, data = _setup("mc")
    params = list(vae.parameters())
    plain = _loss_fn(vae, elbo)
    poison = {"on": False}

    def loss_fn(x, weight):
        loss = plain(x, weight)
        if poison["on"]:
            loss.register_hook(lambda g: g * float("nan"))  # the backward pass turns NaN
        return loss

    step = SVIStep(loss_fn, optimizer, params, clip, torch.device("cpu"))
    step(data[0], 1.0)
    before = [p.detach().clone() for p in params]
    poison["on"] = True
    assert torch.isfinite(step(data[1], 1.0))
    assert step.fault() == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


FAST = ["--train-size", "200", "--test-size", "50", "--batch-size", "32", "--hidden", "32",
        "--eval-k", "5", "--quiet"]


def test_a_non_finite_gradient_found_later_names_its_step_and_parameter(tmp_path, capsys, monkeypatch):
    """The loss stays finite, the gradient does not, from the 10th training step on; the check runs at
    the end of epoch 2 (step 14) and still names step 10 and the first parameter it poisoned."""
    calls = {"n": 0}
    real_forward = torch.nn.Sequential.forward

    def poisoned(self, x):
        y = real_forward(self, x)
        if y.shape[-1] == 64 and self.training and torch.is_grad_enabled():  # the decoder's output
            calls["n"] += 1
            if calls["n"] >= 10:
                y.register_hook(lambda g: g * float("inf"))
        return y

    monkeypatch.setattr(torch.nn.Sequential, "forward", poisoned)
    out = tmp_path / "run"
    assert main(["train", "--epochs", "3", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "at step 10 (epoch 2)" in err
    assert "non-finite gradient (first in parameter 'encoder.net.0.weight')" in err


def test_cuda_graph_mode_needs_a_gpu(tmp_path, capsys):
    assert main(["train", "--device", "cpu", "--cuda-graph", "on", "--out", str(tmp_path / "r"), *FAST]) == 2
    assert "--cuda-graph on" in capsys.readouterr().err and not (tmp_path / "r").exists()


def _cuda_steps(graph: bool):
    pyro.set_rng_seed(0)
    device = torch.device("cuda")
    vae = build_vae(X_SHAPE, hidden=[64], z_dim=4).to(device)
    elbo = make_estimator("mc")
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True, capturable=graph)
    step = SVIStep(_loss_fn(vae, elbo), optimizer, list(vae.parameters()), None, device)
    return vae, (CUDAGraphStep(step) if graph else step)


@pytest.mark.cuda
def test_the_cuda_graph_step_trains_like_the_eager_step():
    """Same seed, same batches. The warm-up steps are the eager step itself (equal losses); after capture
    z is drawn by the graph-safe generator, so the mean loss of the last 100 of 300 steps agrees
    within 4 standard errors (per-step spread / sqrt(100), both runs) - the same curve within noise."""
    gen = torch.Generator().manual_seed(1)
    batches = torch.bernoulli(torch.rand(300, 64, *X_SHAPE, generator=gen)).cuda()
    losses = {}
    for graph in (False, True):
        vae, step = _cuda_steps(graph)
        losses[graph] = torch.stack([step(x, 1.0) for x in batches]).cpu()
    assert step.graph is not None
    warm = CUDAGraphStep.WARMUP
    assert torch.equal(losses[True][:warm], losses[False][:warm])
    tail = {g: v[-100:] for g, v in losses.items()}
    se = (tail[True].var() / 100 + tail[False].var() / 100).sqrt()
    assert abs(tail[True].mean() - tail[False].mean()) < 4 * se
    step(batches[0, :10], 1.0)  # a shorter batch runs eagerly
    before = [p.detach().clone() for p in vae.parameters()]
    step(batches[0] * float("nan"), 1.0)  # replayed, and not applied
    assert step.fault() == 1
    assert all(torch.equal(p, b) for p, b in zip(vae.parameters(), before, strict=True))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture records the step's work, replay redoes it."""

    capturing = None

    def __init__(self):
        self.work, self.replays = None, 0

    def replay(self):
        self.replays += 1
        self.work()


@contextlib.contextmanager
def _fake_capture(graph):
    _FakeGraph.capturing = graph
    try:
        yield
    finally:
        _FakeGraph.capturing = None


class _FakeStream:
    def wait_stream(self, other):
        pass


class _RecordingStep:
    """Stands in for SVIStep: its result is x.sum() + the args; under capture it runs nothing and
    leaves the work to the graph, reading x (the graph's input buffer) when replayed."""

    def __init__(self):
        self.calls = []
        self.optimizer = types.SimpleNamespace(zero_grad=lambda set_to_none: None)

    def __call__(self, x, *args):
        out = torch.zeros(())

        def work():
            out.copy_(x.sum() + sum(args))

        if _FakeGraph.capturing is None:
            work()
            self.calls.append("eager")
        else:
            _FakeGraph.capturing.work = work
            self.calls.append("capture")
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)


def test_the_cuda_graph_step_captures_replays_and_falls_back_as_documented(fake_cuda):
    """The logic of CUDAGraphStep, on the CPU with a stand-in graph: eager until the same batch shape
    and arguments have come WARMUP times, then one capture and replays that read each new batch;
    another shape runs eagerly and keeps the graph; changed arguments are captured again once they
    settle."""
    inner = _RecordingStep()
    step = CUDAGraphStep(inner)
    warm = CUDAGraphStep.WARMUP
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 3, generator=gen) for _ in range(12)]

    for i, x in enumerate(xs):
        assert float(step(x, 1.0)) == pytest.approx(float(x.sum() + 1.0))
        assert inner.calls == ["eager"] * min(i + 1, warm) + ["capture"] * (i >= warm)
    graph = step.graph
    assert graph.replays == len(xs) - warm

    short = torch.rand(2, 3, generator=gen)
    assert float(step(short, 1.0)) == pytest.approx(float(short.sum() + 1.0))
    assert inner.calls[-1] == "eager" and step.graph is graph
    step(xs[0], 1.0)
    assert graph.replays == len(xs) - warm + 1  # back to the captured shape: replayed, not captured again

    calls = len(inner.calls)
    for i, x in enumerate(xs):  # a KL weight that changes every step never settles: all eager
        assert float(step(x, 0.01 * (i + 1))) == pytest.approx(float(x.sum() + 0.01 * (i + 1)))
    assert inner.calls[calls:] == ["eager"] * len(xs) and step.graph is graph
    calls = len(inner.calls)
    for x in xs[:warm + 2]:  # it settles at 0.5: captured again, then replayed
        assert float(step(x, 0.5)) == pytest.approx(float(x.sum() + 0.5))
    assert inner.calls[calls:] == ["eager"] * warm + ["capture"]
    assert step.graph is not graph and step.key == ((4, 3), (0.5,)) and step.graph.replays == 2


def test_a_failed_capture_warns_once_and_training_goes_on_eagerly(fake_cuda, monkeypatch):
    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    inner = _RecordingStep()
    step = CUDAGraphStep(inner)
    xs = [torch.full((4, 3), float(i)) for i in range(10)]
    with pytest.warns(UserWarning, match="capturing the training step failed") as caught:
        results = [float(step(x, 1.0)) for x in xs]
    assert len(caught) == 1
    assert results == [float(x.sum() + 1.0) for x in xs]
    assert inner.calls == ["eager"] * len(xs) and step.graph is None
