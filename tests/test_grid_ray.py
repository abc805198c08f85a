"""`pyro-vae grid --backend ray` on a real local Ray cluster (`ray start --head`, 2 CPUs, 127.0.0.1) with
a real MLflow server: a 2x2 grid whose one trial's worker is killed mid-run finishes every run, the killed
one resumed from its checkpoint (the same metrics as a run never stopped); the server holds the 4 runs;
ASHA stops a bad configuration early and the report marks it stopped; without Ray, one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pyro_vae.cli import main
from pyro_vae.training.run_lock import holder

from .servers import QUIET, ray_cluster

# epochs long enough (63 steps) that a kill after the first checkpoint lands mid-training
BASE = {"train_size": 1000, "test_size": 60, "validation_size": 100, "hidden": [16], "z_dim": 2,
        "batch_size": 16, "eval_k": 5, "epochs": 5}
KILLED = "lr-0.003_seed-0"
RUN_SECONDS = 600  # a grid's subprocess; about 1-2 minutes on 2 busy cores


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    """No MLflow telemetry from the test process (without a network it waits at exit)."""
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(cpus=2) as address:
        yield address


def _grid_file(path, sweep, base=None):
    path.write_text(yaml.safe_dump({"base": base or BASE, "sweep": sweep}))
    return path


def _grid(args) -> subprocess.Popen:
    """`pyro-vae grid ...` in a process of its own (the driver of the Ray trials)."""
    return subprocess.Popen([sys.executable, "-m", "pyro_vae", "grid", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **QUIET})


def _kill_after_first_checkpoint(run, process) -> int:
    """Wait for RUN's first checkpoint, then SIGKILL the process holding RUN's lock (the trial's Ray
    worker); returns the number of epochs it had finished."""
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        # the checkpoint is written before the epoch's metrics.jsonl: wait for both
        written = (run / "checkpoint.pt").is_file() and (run / "metrics.jsonl").is_file()
        pid = holder(run) if written else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return len((run / "metrics.jsonl").read_text().splitlines())
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of {run} appeared while the grid ran")


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_trial_resumes_from_its_checkpoint_and_every_run_is_tracked(cluster, mlflow_uri, tmp_path):
    out = tmp_path / "out"
    grid = _grid_file(tmp_path / "sweep2x2.yaml", {"lr": [0.003, 0.001], "seed": [0, 1]})
    process = _grid([str(grid), "--out", str(out), "--backend", "ray", "--address", cluster, "--eval-k", "5",
                     "--mlflow", mlflow_uri])
    try:
        epochs_at_kill = _kill_after_first_checkpoint(out / KILLED, process)
        stdout, stderr = process.communicate(timeout=RUN_SECONDS)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert 1 <= epochs_at_kill < BASE["epochs"]  # killed mid-training
    names = ["lr-0.003_seed-0", "lr-0.003_seed-1", "lr-0.001_seed-0", "lr-0.001_seed-1"]
    for name in names:
        assert f"{name}: {'resumed' if name == KILLED else 'trained'}: log p(x)" in stdout, stdout
        assert [r["epoch"] for r in _metrics(out / name)] == [1, 2, 3, 4, 5]
        assert (out / name / "eval.json").is_file()
    assert json.loads((out / "report" / "report.json").read_text())["paths"] == [str(out / n) for n in names]

    # the killed run continued from its checkpoint: the same metrics as a run never stopped
    reference = tmp_path / "reference"
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump({**BASE, "lr": 0.003, "seed": 0}))
    assert main(["train", "--config", str(tmp_path / "killed.yaml"), "--out", str(reference), "--quiet"]) == 0
    assert _metrics(out / KILLED) == _metrics(reference)

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("sweep2x2")  # named after the grid file
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(names)  # the killed run is one MLflow run
    for mlrun in runs:
        run = out / mlrun.info.run_name
        assert mlrun.info.status == "FINISHED"
        history = client.get_metric_history(mlrun.info.run_id, "validation_elbo")
        expected = [(r["epoch"], r["validation_elbo"]) for r in _metrics(run)]
        assert [(m.step, m.value) for m in history] == expected
        assert mlrun.data.metrics["eval/log_px"] == json.loads((run / "eval.json").read_text())["log_px"]
        assert "report/diff_log_px" in mlrun.data.metrics or mlrun.info.run_name == names[0]
        files = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
        assert {"summary.json", "eval.json", "metrics.jsonl", "samples.png", "report.md"} <= files


def test_asha_stops_a_bad_configuration_early_and_the_report_says_stopped(cluster, tmp_path):
    grid = _grid_file(tmp_path / "asha.yaml", {"lr": [0.003, 1.0e-7]}, {**BASE, "epochs": 4})
    out = tmp_path / "out"
    # one trial at a time (2 CPUs each): the good one reaches every ASHA epoch first
    args = [str(grid), "--out", str(out), "--backend", "ray", "--address", cluster, "--eval-k", "5",
            "--scheduler", "asha", "--cpus-per-run", "2"]
    process = _grid(args)
    stdout, stderr = process.communicate(timeout=RUN_SECONDS)
    assert process.returncode == 0, stderr[-3000:]
    good, bad = out / "lr-0.003", out / "lr-1e-07"
    assert [r["epoch"] for r in _metrics(good)] == [1, 2, 3, 4] and (good / "eval.json").is_file()
    assert _metrics(bad)[0]["validation_elbo"] < _metrics(good)[0]["validation_elbo"]  # it lags at epoch 1
    assert len(_metrics(bad)) == 1 and not (bad / "summary.json").exists()  # stopped there
    assert json.loads((bad / "stopped.json").read_text())["epoch"] == 1
    assert "lr-1e-07: stopped by asha after epoch 1" in stdout and ": failed" not in stdout
    report = (out / "report" / "report.md").read_text()
    assert "Stopped by the scheduler (asha; not failed, not in the table)" in report
    assert "- lr-1e-07: after epoch 1" in report
    # a second call skips both, the stopped one as stopped
    process = _grid(args)
    stdout, _ = process.communicate(timeout=RUN_SECONDS)
    assert process.returncode == 0
    assert "lr-0.003: done, skipped" in stdout
    assert "lr-1e-07: stopped by asha after epoch 1, skipped" in stdout


def test_the_ray_backend_without_ray_installed_is_one_line_saying_how_to_install(tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as if not installed
    grid, out = _grid_file(tmp_path / "grid.yaml", {"seed": [0]}), tmp_path / "out"
    assert main(["grid", str(grid), "--out", str(out), "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[ray]"' in err
    assert not out.exists()
