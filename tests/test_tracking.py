"""MLflow tracking against a real `mlflow server` (SQLite backend store, 127.0.0.1): a tracked run's
parameters, tags, every epoch's metrics, summary and figures; later results (evaluate) and a resume in
the same MLflow run; a server that goes away mid-run costs one warning, not the run; without mlflow,
one line."""

import json
import sys
import time
import warnings

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.training.epoch_report import Reporter
from pyro_vae.training.tracking import RECORD, MLflowTracker
from pyro_vae.training.train import train

from .servers import QUIET, mlflow_server, stop_group

SMALL = ["--train-size", "200", "--test-size", "40", "--hidden", "16", "--z-dim", "2", "--eval-k", "5",
         "--quiet"]


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    """No MLflow telemetry from the test process (without a network it waits at exit)."""
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tracked_run_holds_its_config_epochs_files_and_later_results(mlflow_uri, tmp_path, monkeypatch):
    run = tmp_path / "tracked"
    assert main(["train", *SMALL, "--epochs", "2", "--prior", "learned", "--lr", "0.002", "--out", str(run),
                 "--mlflow", mlflow_uri]) == 0
    record = json.loads((run / RECORD).read_text())
    client = MlflowClient(mlflow_uri)
    mlrun = client.get_run(record["run_id"])
    assert client.get_experiment(mlrun.info.experiment_id).name == "tracked"  # named after the run
    assert mlrun.info.run_name == "tracked" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["lr"] == "0.002" and mlrun.data.params["hidden"] == "[16]"
    tagged = ("model", "prior", "likelihood", "estimator", "seed", "device")
    assert {k: mlrun.data.tags[k] for k in tagged} == \
        {"model": "vae", "prior": "learned", "likelihood": "bernoulli", "estimator": "mc", "seed": "0",
         "device": "cpu"}
    history = client.get_metric_history(record["run_id"], "test_elbo")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["test_elbo"]) for r in _rows(run)]
    summary = json.loads((run / "summary.json").read_text())
    assert mlrun.data.metrics["final/log_px"] == summary["log_px"]
    files = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"summary.json", "metrics.jsonl", "config.json", "samples.png", "curves.png"} <= files

    # later results go to the same MLflow run: evaluate, compare, then a resume (tracking URI from the
    # environment)
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    mlrun = client.get_run(record["run_id"])
    assert mlrun.data.metrics["eval/log_px"] == evaluation["log_px"]
    assert "eval.json" in {a.path for a in client.list_artifacts(record["run_id"])}
    assert main(["compare", str(run), "--estimators", "mc", "analytic", "--repeats", "3", "--batch-size", "8",
                 "--eval-k", "10", "--quiet"]) == 0
    assert {"compare.json", "compare.md"} <= {a.path for a in client.list_artifacts(record["run_id"])}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    with pytest.warns(UserWarning, match="training continues: .* moved to"):  # evaluate's files are stale
        assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((run / RECORD).read_text())["run_id"] == record["run_id"]
    history = client.get_metric_history(record["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2, 3]  # each epoch once
    assert [m.value for m in history] == [r["train_loss"] for r in _rows(run)]
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1


class _StopServerAfter(Reporter):
    """A reporter that, once the tracker has logged epoch `epoch`, stops the server's process group."""

    def __init__(self, tracker, process, epoch):
        self.tracker, self.process, self.at = tracker, process, epoch

    def epoch(self, row, view):
        if row["epoch"] != self.at:
            return
        deadline = time.monotonic() + 60
        sender = self.tracker.sender
        while len(sender.done) < len(sender.labels) and sender.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sender.done) == len(sender.labels), "epoch 1 was not logged before the server stopped"
        stop_group(self.process.pid)
        self.process.wait()


def test_a_server_that_goes_away_mid_run_costs_one_warning_not_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries: not minutes
    config = Config.from_dict({"train_size": 200, "test_size": 40, "hidden": [16], "z_dim": 2, "eval_k": 5,
                               "epochs": 3})
    with mlflow_server(tmp_path / "server") as (uri, process):
        tracker = MLflowTracker(uri, "gone")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(config, tmp_path / "run", progress=False,
                           reporters=[tracker, _StopServerAfter(tracker, process, epoch=1)])
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]  # training went on
    assert (tmp_path / "run" / "summary.json").is_file()
    ours = [str(w.message) for w in caught if "MLflow server" in str(w.message)]
    assert len(ours) == 1, ours
    assert "not logged: the metrics of epochs 2-3, the final metrics, summary.json" in ours[0]
    assert str(tmp_path / "run") in ours[0]


def test_tracking_without_mlflow_installed_is_one_line_saying_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out), "--mlflow", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[mlflow]"' in err
    assert not out.exists()


def test_a_local_grid_tracks_every_run_in_an_experiment_named_after_the_grid(mlflow_uri, tmp_path):
    grid, out = tmp_path / "mygrid.yaml", tmp_path / "out"
    grid.write_text(yaml.safe_dump({"base": {"train_size": 200, "test_size": 40, "hidden": [16], "z_dim": 2,
                                             "eval_k": 5, "epochs": 1}, "sweep": {"seed": [0, 1]}}))
    args = [str(grid), "--out", str(out), "--eval-k", "5", "--jobs", "2", "--mlflow", mlflow_uri]
    assert main(["grid", *args]) == 0
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("mygrid").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["seed-0", "seed-1"]
    for mlrun in runs:
        evaluation = json.loads((out / mlrun.info.run_name / "eval.json").read_text())
        assert mlrun.info.status == "FINISHED" and mlrun.data.metrics["eval/log_px"] == evaluation["log_px"]
        files = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
        assert {"eval.json", "summary.json", "report.md"} <= files


def test_a_run_the_server_refuses_to_continue_is_one_line(mlflow_uri, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    (run / RECORD).write_text(json.dumps({"tracking_uri": mlflow_uri, "experiment_id": "0",
                                          "run_id": "0123456789abcdef0123456789abcdef"}))  # not on the server
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--mlflow", mlflow_uri, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the MLflow server {mlflow_uri} refused to track {run}" in err
    assert len(_rows(run)) == 1  # nothing trained
