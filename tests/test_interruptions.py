"""Runs survive interruption: a stop request (what SIGINT/SIGTERM make) checkpoints after the step
in progress and exits 130/143, kill -9 leaves a loadable checkpoint, resuming from any checkpoint
(epoch end, mid-epoch) is bit-identical on CPU, and a NaN stops training with the step and the site
named, keeping the last good checkpoint. The stop is requested in process at a chosen step; one
smoke test sends the real signals to `pyro-vae train` processes."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.training import run_dir

# the module (pyro_vae.train is the function)
train_module = importlib.import_module("pyro_vae.training.train")
# where the trainer builds its model
training_model = importlib.import_module("pyro_vae.training.training_model")

# 200 examples in batches of 32: 7 steps an epoch
FAST = ["--train-size", "200", "--test-size", "50", "--batch-size", "32", "--hidden", "32",
        "--eval-k", "5", "--quiet"]


def _state(run: Path):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall time differs; everything else must not
    return ckpt["model"], rows


def _assert_same_run(a: Path, b: Path) -> None:
    model_a, rows_a = _state(a)
    model_b, rows_b = _state(b)
    assert rows_a == rows_b
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert summary_a["log_px"] == summary_b["log_px"] and summary_a["steps"] == summary_b["steps"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A reference run trained without interruption."""
    root = tmp_path_factory.mktemp("straight")
    assert main(["train", "--epochs", "4", "--out", str(root / "fast4"), *FAST]) == 0
    return root


def test_four_epochs_equal_two_plus_two_resumed(straight, tmp_path):
    assert main(["train", "--epochs", "2", "--out", str(tmp_path / "run"), *FAST]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "4", "--quiet"]) == 0
    _assert_same_run(straight / "fast4", tmp_path / "run")


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(straight, tmp_path, monkeypatch, crash_copy):
    saved = crash_copy(tmp_path / "crashed", epoch=2, batch=3)
    # checkpoint after every step (a minute is 60 s; this is a millionth of one)
    assert main(["train", "--epochs", "4", "--checkpoint-every", "1e-6",
                 "--out", str(tmp_path / "run"), *FAST]) == 0
    monkeypatch.undo()
    assert saved == [7 + 3]  # ceil(200 / 32) = 7 steps in epoch 1, then 3 into epoch 2
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--quiet"]) == 0
    _assert_same_run(straight / "fast4", tmp_path / "crashed")


@pytest.mark.parametrize("weighting", [["--beta", "0.5"], ["--kl-anneal", "2"]], ids=["beta", "kl-anneal"])
def test_resume_after_an_epochs_last_step_with_a_kl_weight(tmp_path, monkeypatch, weighting, crash_copy):
    """A checkpoint written after the last step of an epoch but before its end (what a SIGTERM in that
    step, or --checkpoint-every then kill -9, leaves) resumes to the run that never stopped, with a KL
    weight too: the weight the epoch's metrics row records was once set only inside the batch loop."""
    assert main(["train", "--epochs", "2", "--out", str(tmp_path / "straight"), *FAST, *weighting]) == 0
    saved = crash_copy(tmp_path / "crashed", epoch=1, batch=7)  # 7 steps: ceil(200 / 32)
    assert main(["train", "--epochs", "2", "--checkpoint-every", "1e-6", "--out", str(tmp_path / "run"),
                 *FAST, *weighting]) == 0
    monkeypatch.undo()
    assert saved == [7]
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    assert "kl_weight" in _state(tmp_path / "crashed")[1][0]


def _stop_after(monkeypatch, step: int, signum: int) -> None:
    """Request a stop, as signal `signum` does, right after training step `step` (counted over the run)."""
    real_step = train_module.Trainer.step

    def step_then_stop(self, idx, x):
        loss = real_step(self, idx, x)
        if self.steps == step:
            self.request_stop(signum)
        return loss

    monkeypatch.setattr(train_module.Trainer, "step", step_then_stop)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_request_mid_epoch_checkpoints_and_resumes_bit_identically(straight, tmp_path, monkeypatch,
                                                                          capsys, signum, code):
    """Asked to stop after step 10 (3 steps into epoch 2): that step finishes, a checkpoint is written,
    the command says in one line how to resume and exits 128 + signum; the resumed run equals the one
    that never stopped."""
    out = tmp_path / "run"
    _stop_after(monkeypatch, 10, signum)
    assert main(["train", "--epochs", "4", "--out", str(out), *FAST]) == code
    monkeypatch.undo()
    assert capsys.readouterr().err == (f"pyro-vae: stopped by {signal.Signals(signum).name} after step 10; "
                                       f"checkpoint saved; resume with: pyro-vae train --resume {out}\n")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (2, 3, 10)
    assert not (out / "summary.json").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _assert_same_run(straight / "fast4", out)


@pytest.fixture
def start():
    """start(out, *flags): `pyro-vae train` in a process of its own, for more epochs than it will be let
    run: a line on stdout at the end of each epoch, stderr (progress bars, the last line) to OUT.err.
    A process still running when the test ends is killed."""
    started = []

    def spawn(out: Path, *extra: str) -> subprocess.Popen:
        with open(out.with_suffix(".err"), "w") as err:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "pyro_vae", "train", "--epochs", "1000", "--out", str(out),
                 *[f for f in FAST if f != "--quiet"], *extra],
                stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        return started[-1]

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _wait_for_first_epoch(proc: subprocess.Popen, out: Path) -> None:
    """Block until the process has printed epoch 1's line (it is training epoch 2 then)."""
    line = proc.stdout.readline()
    assert line.startswith("epoch 1:"), line + out.with_suffix(".err").read_text()[-2000:]


def test_a_real_signal_exits_130_or_143_leaving_a_checkpoint_that_resumes(tmp_path, start):
    """The smoke test of the real handlers: SIGINT to one `pyro-vae train` process and SIGTERM to another,
    once each has finished epoch 1: each exits 128 + signum saying how to resume, and its checkpoint
    resumes to the end of the epoch it stopped in."""
    runs = {signum: tmp_path / signal.Signals(signum).name for signum in (signal.SIGINT, signal.SIGTERM)}
    procs = {signum: start(out) for signum, out in runs.items()}
    for signum, proc in procs.items():
        _wait_for_first_epoch(proc, runs[signum])
        proc.send_signal(signum)
    for signum, proc in procs.items():
        out = runs[signum]
        proc.communicate(timeout=120)
        err = out.with_suffix(".err").read_text()
        assert proc.returncode == 128 + signum, err[-2000:]
        assert f"pyro-vae: stopped by {signal.Signals(signum).name} after step" in err
        assert f"checkpoint saved; resume with: pyro-vae train --resume {out}\n" in err
        assert "Traceback" not in err
        state = run_dir.load_checkpoint(out / "checkpoint.pt")
        assert state["epoch"] >= 2 and state["batch"] >= 1 and not (out / "summary.json").exists()
        assert main(["train", "--resume", str(out), "--epochs", str(state["epoch"]), "--quiet"]) == 0
        assert json.loads((out / "summary.json").read_text())["epochs"] == state["epoch"]


def test_kill_9_always_leaves_a_loadable_checkpoint(tmp_path, start):
    out = tmp_path / "run"
    proc = start(out, "--checkpoint-every", "1e-6")  # rewrite the checkpoint after every step
    _wait_for_first_epoch(proc, out)
    for _ in range(20):  # while the process rewrites it
        state = run_dir.load_checkpoint(out / "checkpoint.pt")  # never half-written
        assert state["step"] >= 7
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    state = run_dir.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] >= 2 and state["step"] >= 7
    assert main(["train", "--resume", str(out), "--epochs", str(state["epoch"]), "--checkpoint-every", "0",
                 "--quiet"]) == 0
    assert not list(out.glob(".*.tmp"))


def test_a_nan_in_the_decoder_stops_training_naming_the_step_and_site(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_forward = torch.nn.Sequential.forward

    def poisoned(self, x):
        y = real_forward(self, x)
        if y.shape[-1] == 64 and self.training:  # the decoder's last layer (8x8 pixels)
            calls["n"] += 1
            if calls["n"] >= 10:  # from the 10th training step on
                y = y * float("nan")
        return y

    monkeypatch.setattr(torch.nn.Sequential, "forward", poisoned)
    assert main(["train", "--epochs", "3", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "at step 10 (epoch 2)" in err and "model's sample site 'x'" in err
    assert "--lr" in err and "--clip-grad" in err
    state = run_dir.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["batch"] == 0 and state["step"] == 7  # end of epoch 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_nan_gradient_is_reported_with_its_parameter(tmp_path, capsys, monkeypatch):
    real_build = training_model.build_from_config

    def build_with_bad_gradient(config, x_shape):
        vae = real_build(config, x_shape)
        bias = vae.encoder.net[0].bias
        bias.register_hook(lambda g: g * float("inf"))
        return vae

    monkeypatch.setattr(training_model, "build_from_config", build_with_bad_gradient)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "non-finite gradient (first in parameter 'encoder.net.0.bias')" in err
    assert "at step 1 (epoch 1)" in err


def _norms_at_optimizer_steps(monkeypatch) -> list[float]:
    """Record the gradient norm each time Adam takes a step."""
    norms = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.stack([g.norm() for g in grads]).norm()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    return norms


def test_clip_grad_bounds_the_gradient_norm(tmp_path, monkeypatch):
    unclipped = _norms_at_optimizer_steps(monkeypatch)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "a"), *FAST]) == 0
    monkeypatch.undo()
    clipped = _norms_at_optimizer_steps(monkeypatch)
    assert main(["train", "--epochs", "1", "--clip-grad", "0.5", "--out", str(tmp_path / "b"), *FAST]) == 0
    assert len(clipped) == len(unclipped) == 7
    assert max(unclipped) > 0.5  # without clipping the bound is exceeded...
    assert max(clipped) <= 0.5 + 1e-4  # ...with it, never


def test_overwrite_replaces_a_run_and_resume_may_change_the_learning_rate(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *FAST]) == 0
    assert main(["train", "--epochs", "1", "--z-dim", "3", "--out", str(out), *FAST]) == 2
    assert main(["train", "--epochs", "1", "--z-dim", "3", "--overwrite", "--out", str(out), *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["z_dim"] == 3
    assert main(["train", "--resume", str(out), "--epochs", "2", "--lr", "1e-4", "--quiet"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4


def test_wall_time_sums_every_session_of_a_resumed_run(tmp_path, monkeypatch, crash_copy):
    """The first session spends >= 1.75 s in epoch 1 and >= 0.75 s in epoch 2 before the checkpoint the
    crash leaves (0.25 s asleep in each step); the resumed session does not sleep. Epoch 2's seconds,
    summary.json's train_seconds and report's wall time count the first session's part too."""
    step = train_module.Trainer.step

    def slow_step(self, idx, x):
        if self.epoch <= 2:
            time.sleep(0.25)
        return step(self, idx, x)

    monkeypatch.setattr(train_module.Trainer, "step", slow_step)
    saved = crash_copy(tmp_path / "crashed", epoch=2, batch=3)
    assert main(["train", "--epochs", "3", "--checkpoint-every", "1e-6", "--out", str(tmp_path / "run"),
                 *FAST]) == 0
    monkeypatch.undo()
    assert saved == [7 + 3]
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--quiet"]) == 0
    run = tmp_path / "crashed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["seconds"] >= 7 * 0.25 and rows[1]["seconds"] >= 3 * 0.25
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_seconds"] >= sum(r["seconds"] for r in rows) >= 10 * 0.25
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    table = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert table[0]["train_seconds"] == summary["train_seconds"]
