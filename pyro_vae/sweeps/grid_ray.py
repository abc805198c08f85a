"""`pyro-vae grid FILE --backend ray`: the grid's combinations as Ray Tune trials, on a running Ray
cluster (`address`: HOST:PORT, or "auto" for the one this machine belongs to) or on a local one started
for the grid (no address).

Each trial is one combination. It trains (or resumes) and evaluates OUT/<name> exactly as a worker of the
local backend does (grid.train_and_evaluate), each epoch's row of metrics reported to Tune, and asks for
`cpus_per_run` CPUs and `gpus_per_run` GPUs. OUT must be storage that every node sees (docs/scaling.md):
the run directories are the results; Tune's own records go to OUT/tune. A trial whose worker dies (a
node lost, a process killed) is started again, up to MAX_FAILURES times (Tune's FailureConfig), and
continues from its run's checkpoint (train's resume: bit-identical on CPU), not from the start. A run
that fails with bad input or a numerical fault fails at once: started again it would fail again.

With scheduler="asha", Ray Tune's asynchronous successive halving (ASHAScheduler, time unit: the epoch)
stops trials whose validation ELBO lags: at epochs 1, rf, rf², ... (rf = REDUCTION_FACTOR) a trial whose
validation ELBO is below the 1 - 1/rf quantile of those recorded there by the trials before it is
stopped. The runs need a validation set (validation_size). A stopped run keeps its checkpoint and
metrics; OUT/<name>/stopped.json records the stop, its MLflow run (if tracked) ends as KILLED, the
report lists it as stopped (not failed), and a second call skips it (delete stopped.json to train it
on). Ray is an optional extra: `pip install -e ".[ray]"`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from ..errors import InputError, TrainingError
from ..renames import renamed_keywords
from ..training.epoch_report import EpochView, Reporter
from ..training.run_dir import METRICS, read_json, read_jsonl, write_json
from ..training.tracking import MLflowTracker, error_line, mark_stopped
from .grid import GridRun, check_options, overrides, read_grid, run_state, train_and_evaluate

MAX_FAILURES = 3  # times a trial whose worker died is started again
REDUCTION_FACTOR = 2  # ASHA keeps the top 1/REDUCTION_FACTOR at each of its epochs 1, rf, rf², ...
SCHEDULERS = ("asha",)
STOPPED = "stopped.json"  # in a run directory the scheduler stopped: {"by", "epoch", "validation_elbo"}
TUNE = "tune"  # Tune's own records, in OUT
PROBE_SECONDS = 5.0  # how long the check of --address waits for the cluster to answer
LINE, FAILED = "grid_line", "grid_failed"  # a trial's last report: what was done, or why it failed


def _ray() -> SimpleNamespace:
    """ray, ray.tune and the ASHA scheduler; an InputError saying how to install them without Ray."""
    try:  # Ray is an optional dependency: imported only when the backend is asked for
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        raise InputError('--backend ray needs Ray Tune: pip install -e ".[ray]" (or pip install '
                         '"ray[tune]")') from None
    return SimpleNamespace(ray=ray, tune=tune, ASHAScheduler=ASHAScheduler)


def tune_row(row: dict | None) -> dict:
    """A row of metrics.jsonl as Tune gets it: its numbers, with the scheduler's epoch and validation ELBO
    always there (Tune refuses a report without them; NaN before the first epoch, or for a model without
    a validation ELBO, never stops a trial)."""
    numbers = {k: v for k, v in (row or {}).items() if isinstance(v, int | float)}
    return {"epoch": 0, "validation_elbo": math.nan, **numbers}


class TuneReporter(Reporter):
    """Inside a trial: reports each epoch's row of metrics.jsonl (its numbers) to Ray Tune, a reporter of
    the epoch report (epoch_report.py). Tune's scheduler may stop the trial there (tune.report then ends
    the trial's thread)."""

    def __init__(self, report: Callable[[dict], None]):
        self.report = report

    def epoch(self, row: dict, view: EpochView) -> None:
        self.report(tune_row(row))


def _trial(space: dict, out: str, settings: dict[str, dict], tensorboard: bool, mlflow: str | None,
           experiment: str) -> None:
    """One Tune trial, in a Ray worker: train and evaluate run space["name"] (from its checkpoint when
    the trial is started again), reporting {LINE: what was done} at the end or {FAILED: message}."""
    tune = _ray().tune
    name = space["name"]
    run = Path(out) / name
    try:
        reporters = [*([MLflowTracker(mlflow, experiment)] if mlflow else []), TuneReporter(tune.report)]
        state = run_state(run, settings[name])  # a trial started again finds the checkpoint
        line = train_and_evaluate(str(run), settings[name], state, tensorboard, reporters)
    except (InputError, TrainingError) as err:
        tune.report({**tune_row(_last_row(run)), FAILED: str(err)})
        return
    tune.report({**tune_row(_last_row(run)), LINE: line})


def _last_row(run: Path) -> dict | None:
    """The last row of RUN/metrics.jsonl, or None (none yet, or not readable)."""
    try:
        rows = read_jsonl(run / METRICS)
    except InputError:
        return None
    return rows[-1] if rows else None


def _trial_name(trial) -> str:
    return trial.config["name"]


def _absolute_data_dir(settings: dict) -> dict:
    """A run's settings with data_dir made absolute: a trial runs in a directory of Tune's, maybe on
    another node (which must see the same path). A dataset given as a path is recorded in config.json
    as given, so it is left alone: give it as an absolute path (docs/scaling.md)."""
    return {**settings, "data_dir": str(Path(settings["data_dir"]).resolve())}


def _check_address(address: str) -> None:
    """A HOST:PORT address (or ray://HOST:PORT) must accept a connection within PROBE_SECONDS: Ray itself
    waits for an absent cluster forever. "auto" is left to Ray (it finds this machine's cluster, or says
    there is none)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as err:  # refused, unreachable, timed out, no HOST:PORT
        raise InputError(f"no Ray cluster answers at --address {address} ({error_line(err)}); start one "
                         "(ray start --head), give its HOST:PORT, or leave --address out to start a local "
                         "one") from None


def _connect(ray, address: str | None) -> None:
    """Join the Ray cluster at `address`, or start a local one; an InputError if none answers."""
    if address is not None:
        _check_address(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise InputError(f"no Ray cluster answers at --address {address} ({error_line(err)}); start one "
                         "(ray start --head) or leave --address out to start a local one (a cluster with "
                         "token authentication also needs RAY_AUTH_MODE=token here: docs/scaling.md)"
                         ) from None


@renamed_keywords(k="eval_k")
def run_grid_ray(path: str | Path, out: str | Path, eval_k: int | None = None, threads: int | None = None,
                 tensorboard: bool = False, mlflow: str | None = None, address: str | None = None,
                 cpus_per_run: float = 1, gpus_per_run: float = 0, scheduler: str | None = None,
                 echo: Callable[[str], None] = print) -> tuple[list[GridRun], list[str], dict[str, dict]]:
    """Train and evaluate every combination of the grid file into OUT/<name> as Ray Tune trials (see the
    module's docstring); importance-sampling log p(x) as run_grid does (`eval_k`); with mlflow (a
    tracking URI), each run tracked in the MLflow experiment named after the grid file. Returns the
    combinations, the names that failed, and the runs the scheduler stopped (name -> stopped.json's
    record), now or before."""
    m = _ray()
    check_options(threads=threads or 1, tensorboard=tensorboard, mlflow=mlflow,
                  **({} if eval_k is None else {"eval_k": eval_k}))
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise InputError(f"--cpus-per-run must be positive and --gpus-per-run at least 0, got {cpus_per_run} "
                         f"and {gpus_per_run}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InputError(f"unknown --scheduler {scheduler!r}: choose among {', '.join(SCHEDULERS)}")
    runs, out = read_grid(path, overrides(threads, eval_k)), Path(out).resolve()
    if scheduler and any(r.settings["validation_size"] is None for r in runs):
        raise InputError(f"--scheduler {scheduler} stops runs whose validation ELBO lags: give every run a "
                         "validation set (validation_size in the grid file's base)")
    states = {r.name: run_state(out / r.name, r.settings) for r in runs}
    stopped = {r.name: read_json(out / r.name / STOPPED) for r in runs
               if states[r.name] != "done" and (out / r.name / STOPPED).is_file()}
    for r in runs:
        if states[r.name] == "done":
            echo(f"{r.name}: done, skipped")
        elif r.name in stopped:
            echo(f"{r.name}: stopped by {stopped[r.name]['by']} after epoch {stopped[r.name]['epoch']}, "
                 f"skipped (delete {out / r.name / STOPPED} to train it on)")
    todo = [r for r in runs if states[r.name] != "done" and r.name not in stopped]
    if not todo:
        return runs, [], stopped
    _connect(m.ray, address)
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = _tune(m, todo, out, Path(path).stem, tensorboard, mlflow, cpus_per_run, gpus_per_run,
                        scheduler)
    finally:
        m.ray.shutdown()
    failed = []
    for r in todo:
        result = results[r.name]
        metrics = result.metrics or {}
        if LINE in metrics:
            echo(f"{r.name}: {metrics[LINE]}")
        elif FAILED in metrics or result.error is not None:
            failed.append(r.name)
            why = metrics.get(FAILED) or f"{error_line(result.error)} (Ray's record: {result.path})"
            echo(f"{r.name}: failed: {why}")
        else:  # ended without an error before its end: the scheduler stopped it
            record = {"by": scheduler, "epoch": metrics.get("epoch"),
                      "validation_elbo": metrics.get("validation_elbo")}
            write_json(out / r.name / STOPPED, record)
            mark_stopped(out / r.name, str(scheduler), int(metrics.get("epoch", 0)))
            stopped[r.name] = record
            echo(f"{r.name}: stopped by {scheduler} after epoch {record['epoch']} (validation ELBO "
                 f"{record['validation_elbo']:.2f} nats lagged)")
    return runs, failed, stopped


def _tune(m: SimpleNamespace, todo: list[GridRun], out: Path, grid: str, tensorboard: bool,
          mlflow: str | None, cpus: float, gpus: float, scheduler: str | None) -> dict:
    """Run the combinations `todo` as Tune trials on the connected cluster; their results by name."""
    tune = m.tune
    settings = {r.name: _absolute_data_dir(r.settings) for r in todo}
    trainable = functools.partial(_trial, out=str(out), settings=settings, tensorboard=tensorboard,
                                  mlflow=mlflow, experiment=grid)
    asha = m.ASHAScheduler(time_attr="epoch", metric="validation_elbo", mode="max",
                           max_t=max(s["epochs"] for s in settings.values()), grace_period=1,
                           reduction_factor=REDUCTION_FACTOR, stop_last_trials=False) if scheduler else None
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}),
        param_space={"name": tune.grid_search([r.name for r in todo])},
        # reuse_actors: a worker process trains one run after another, as the local backend's do
        tune_config=tune.TuneConfig(scheduler=asha, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{grid}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(out / TUNE), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)),
    )
    with contextlib.redirect_stdout(io.StringIO()):  # Tune prints a header and a path even at verbose=0
        results = tuner.fit()
    return {result.config["name"]: result for result in results}
