"""MLflow tracking of runs (`--mlflow URI`, or the MLFLOW_TRACKING_URI environment variable).

A run tracked in MLflow gets, in an experiment named after its grid (or, for `pyro-vae train`, after its
run directory): the config as parameters; tags for what it is (model kind, prior, likelihood, estimator,
seed, device, the run directory); every epoch's row of metrics.jsonl as metrics at step = epoch; at the
end summary.json's numbers as `final/...` metrics, and summary.json, metrics.jsonl, config.json and the
figures as artifacts. RUN/mlflow.json records the server and the MLflow run, so that a resumed run
continues the same MLflow run (logging the epochs the server has not seen) and `pyro-vae evaluate`,
`compare` and `report` add their results to it later (`log_results`).

The server is asked once, before anything is written, whether it answers (`check_server`): if not, the
command ends with one line (an InputError). During training every call to the server goes through one
background thread (`_Sender`), so a slow or vanished server never holds up a step; once a call fails,
nothing more is sent, and the end of the run warns once, saying what was not logged (the run directory
holds all of it). mlflow is an optional extra: `pip install -e ".[mlflow]"`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from ..errors import InputError
from .epoch_report import EpochView, Reporter, RunView
from .run_dir import CONFIG, EVAL, METRICS, SUMMARY, read_json, write_json

RECORD = "mlflow.json"  # in the run directory: {"tracking_uri", "experiment_id", "run_id"}
ENV = "MLFLOW_TRACKING_URI"
PROBE_SECONDS = 5.0  # how long the start-up check waits for the server
FLUSH_SECONDS = 30.0  # how long the end of a run waits for calls still queued for the server
TAGGED = ("model", "prior", "likelihood", "estimator", "seed")  # config settings also set as tags
FINAL = "final/"  # prefix of summary.json's numbers as metrics
EVALUATED = "eval/"  # prefix of eval.json's numbers as metrics


def _mlflow() -> SimpleNamespace:
    """mlflow's client and entity classes; an InputError saying how to install mlflow without it."""
    try:  # mlflow is an optional dependency: imported only when tracking is asked for
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InputError('--mlflow needs the mlflow package: pip install -e ".[mlflow]" (or pip install '
                         "mlflow)") from None
    return SimpleNamespace(Client=MlflowClient, Metric=Metric, Param=Param, RunTag=RunTag)


def resolve_uri(flag: str | None) -> str | None:
    """The tracking URI to use: the --mlflow flag's, else MLFLOW_TRACKING_URI's, else None (no tracking)."""
    return flag or os.environ.get(ENV) or None


def check_server(uri: str) -> None:
    """Raise InputError (one line: what to do) unless mlflow is installed and, for an http(s) URI, the
    tracking server answers its /health endpoint within PROBE_SECONDS. Other URIs (a local file or
    database store) are opened by mlflow itself."""
    _mlflow()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
            pass
    except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts, a malformed URI
        reason = getattr(err, "reason", None) or err
        raise InputError(f"the MLflow tracking server {uri} does not answer ({reason}); start it (mlflow "
                         "server ...) or point --mlflow / MLFLOW_TRACKING_URI at a running one") from None


def _number(value: object) -> float | None:
    """value as a finite float, or None for what is not a number (None, strings, lists, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _params(settings: dict) -> dict[str, str]:
    """The config's settings as MLflow parameters (strings; lists as JSON)."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in settings.items()}


def error_line(err: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _epochs_text(epochs: list[int]) -> str:
    """[3, 4, 5, 8] -> 'epochs 3-5, 8'."""
    spans: list[list[int]] = []
    for e in sorted(epochs):
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return f"epoch{'s' if len(epochs) > 1 else ''} {text}"


class _Sender:
    """Runs calls to the server in order on a daemon thread. After the first call that fails nothing
    more is sent; `close` waits up to `timeout` seconds for the queue and returns what was not logged
    (the labels of calls that failed, were skipped or did not finish) and the first error."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.labels: list[str | int] = []  # an epoch number (its metrics) or a label
        self.done: set[int] = set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="pyro-vae-mlflow", daemon=True)
        self.thread.start()

    def send(self, label: str | int, call: Callable[[], object]) -> None:
        self.labels.append(label)
        self.queue.put((len(self.labels) - 1, call))

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            index, call = item
            if self.error is not None:
                continue
            try:
                call()
            except Exception as err:  # any failure of the server or the network
                self.error = err
            else:
                self.done.add(index)

    def close(self, timeout: float) -> tuple[list[str | int], BaseException | None]:
        self.queue.put(None)
        self.thread.join(timeout)
        return [label for i, label in enumerate(self.labels) if i not in self.done], self.error


class MLflowTracker(Reporter):
    """Logs one training run to MLflow: a reporter of the epoch report (epoch_report.py), given with
    train(..., reporters=[tracker]): `start` once the run directory is ready, `epoch` with each epoch's
    metrics row, `finish` with summary.json. The server is checked when the tracker is made, so make it
    before anything is written."""

    def __init__(self, uri: str, experiment: str | None = None):
        check_server(uri)
        self.uri, self.experiment = uri, experiment
        self.mlflow = _mlflow()
        self.client = self.mlflow.Client(tracking_uri=uri)
        self.run_id: str | None = None
        self.sender: _Sender | None = None
        self.out: Path | None = None

    def start(self, run: RunView) -> None:
        """Continue the MLflow run recorded in the run directory (a resumed run: the epochs the server
        has not seen are logged again), or start one: parameters, tags, RUN/mlflow.json. An InputError
        if the server refuses (a new run's directory is then emptied by the trainer)."""
        out = self.out = Path(run.out)
        record = read_json(out / RECORD) if run.resumed and (out / RECORD).is_file() else {}
        self.sender = _Sender()
        try:
            self._start(run, out, record)
        except Exception as err:  # the server answered the check but refuses this run
            raise InputError(f"the MLflow server {self.uri} refused to track {out} ({error_line(err)}); "
                             "check the server, or train without --mlflow") from None

    def _start(self, run: RunView, out: Path, record: dict) -> None:
        config = run.config
        if record.get("tracking_uri") == self.uri:
            self.run_id = record["run_id"]
            seen = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            self.client.update_run(self.run_id, status="RUNNING")
            for row in run.metrics:
                if row["epoch"] not in seen:
                    self._log_epoch(row)
            return
        experiment_id = self._experiment_id(self.experiment or out.name)
        tags = {**{k: str(getattr(config, k)) for k in TAGGED}, "device": str(run.device),
                "run_dir": str(out.resolve())}
        self.run_id = self.client.create_run(experiment_id, run_name=out.name, tags=tags).info.run_id
        write_json(out / RECORD, {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                  "run_id": self.run_id})
        params = _params(config.to_dict())
        self.sender.send("parameters", lambda: self._log(params=params))
        for row in run.metrics:  # none for a new run; kept for a run resumed into another server
            self._log_epoch(row)

    def _experiment_id(self, name: str) -> str:
        """The id of experiment `name`, made if missing (by this run, or by another run of its grid
        that made it first)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another run of the grid made it just now
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def epoch(self, row: dict, view: EpochView) -> None:
        self._log_epoch(row)

    def _log_epoch(self, row: dict) -> None:
        """Queue the epoch's metrics (every number of its metrics.jsonl row but the epoch) at step = epoch."""
        values = {k: v for k, v in row.items() if k != "epoch" and _number(v) is not None}
        self.sender.send(int(row["epoch"]), lambda: self._log(values, step=int(row["epoch"])))

    def finish(self, summary: dict) -> None:
        """Queue summary.json's numbers as final/ metrics and the run's files as artifacts, end the MLflow
        run, and wait (FLUSH_SECONDS at most) for the queue; warn once if anything was not logged."""
        out = self.out
        final = {FINAL + k: v for k, v in summary.items() if _number(v) is not None}
        self.sender.send("the final metrics", lambda: self._log(final))
        files = [out / name for name in (SUMMARY, METRICS, CONFIG, EVAL)] + sorted(out.glob("*.png"))
        for path in (p for p in files if p.is_file()):
            self.sender.send(path.name, lambda path=path: self.client.log_artifact(self.run_id, str(path)))
        self.sender.send("the run's end", lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self._flush(out)

    def _flush(self, out: Path) -> None:
        """Wait for the queued calls (FLUSH_SECONDS at most); one warning lists what was not logged."""
        missing, error = self.sender.close(FLUSH_SECONDS)
        if not missing:
            return
        epochs = [m for m in missing if isinstance(m, int)]
        rest = [m for m in missing if not isinstance(m, int)]
        parts = ([f"the metrics of {_epochs_text(epochs)}"] if epochs else []) + rest
        why = error_line(error) if error else f"no answer within {FLUSH_SECONDS:g} s"
        warnings.warn(f"the MLflow server {self.uri} stopped answering ({why}); not logged: "
                      f"{', '.join(parts)}; {out} holds them all", stacklevel=2)

    def _log(self, metrics: dict | None = None, step: int = 0, params: dict | None = None) -> None:
        """One log_batch call: metrics (a name -> number dict) at `step`, and params."""
        stamp, m = int(time.time() * 1000), self.mlflow
        self.client.log_batch(self.run_id, metrics=[m.Metric(k, float(v), stamp, step)
                                                    for k, v in (metrics or {}).items()],
                              params=[m.Param(k, v) for k, v in (params or {}).items()])


def recorded_run(run: str | Path) -> dict | None:
    """RUN/mlflow.json (the server and MLflow run a tracked run logs to), or None for an untracked run."""
    path = Path(run) / RECORD
    return read_json(path) if path.is_file() else None


def log_results(run: str | Path, metrics: dict, files: list[Path], prefix: str = EVALUATED,
                tags: dict | None = None) -> None:
    """Add results computed after training (evaluate, compare, report) to a tracked run's MLflow run:
    the numbers in `metrics` (as prefix + name), `files` as artifacts, `tags`. Nothing for an untracked
    run; where mlflow is missing or the server does not answer, one warning says what was not logged
    (the results are in the run directory all the same)."""
    record = recorded_run(run)
    if record is None:
        return
    try:
        check_server(record["tracking_uri"])
        m, stamp = _mlflow(), int(time.time() * 1000)
        client, run_id = m.Client(tracking_uri=record["tracking_uri"]), record["run_id"]
        numbers = {prefix + k: _number(v) for k, v in metrics.items() if _number(v) is not None}
        client.log_batch(run_id, metrics=[m.Metric(k, v, stamp, 0) for k, v in numbers.items()],
                         tags=[m.RunTag(k, str(v)) for k, v in (tags or {}).items()])
        for path in files:
            client.log_artifact(run_id, str(path))
    except Exception as err:  # tracking never fails the command whose results it logs
        names = ", ".join(Path(p).name for p in files) or "metrics"
        warnings.warn(f"{Path(run).name}: not logged to MLflow ({error_line(err)}): {names}; they are in "
                      f"{run}", stacklevel=2)


def mark_stopped(run: str | Path, by: str, epoch: int) -> None:
    """A run the grid's scheduler stopped: its MLflow run ends as KILLED, tagged stopped_by and
    stopped_at_epoch (nothing for an untracked run; a warning if the server does not answer)."""
    record = recorded_run(run)
    if record is None:
        return
    try:
        check_server(record["tracking_uri"])
        client = _mlflow().Client(tracking_uri=record["tracking_uri"])
        client.set_tag(record["run_id"], "stopped_by", by)
        client.set_tag(record["run_id"], "stopped_at_epoch", str(epoch))
        client.set_terminated(record["run_id"], "KILLED")
    except Exception as err:  # as in log_results
        warnings.warn(f"{Path(run).name}: its MLflow run was not marked stopped ({error_line(err)})",
                      stacklevel=2)
