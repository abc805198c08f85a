"""`pyro-vae grid FILE`: train every combination of a base config and lists of settings to sweep, each
into its own run directory, evaluate each, and end with `pyro-vae report` over them.

FILE (YAML or JSON) holds two mappings, every key a setting of Config:

    base:  {dataset: digits, epochs: 10}         # settings shared by every run
    sweep: {prior: [normal, vamp], seed: [0, 1]}  # each a non-empty list: every combination is a run

A run is OUT/<name>, its name what varies (prior-vamp_seed-1). Running the grid again skips finished
runs (trained to their epochs and evaluated on that checkpoint), resumes interrupted ones from their
checkpoint, and evaluates those not yet evaluated. Every combination is checked (Config.from_dict)
before anything trains; a bad one is an input error naming it. Runs go `jobs` at a time, each in a
worker process of its own with the run's torch threads (Config.threads, one by default: on a shared
machine several single-threaded processes beat one process with many threads).
"""

from __future__ import annotations

import itertools
import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RESUMABLE, Config, load_config_file
from ..errors import InputError, TrainingError
from ..evaluation.evaluate import evaluate_run
from ..evaluation.report import MARKDOWN, report
from ..models.kind import check_config
from ..renames import renamed_keywords
from ..training.run_dir import CHECKPOINT, CONFIG, EVAL, SUMMARY, load_checkpoint, read_config, read_json
from ..training.run_lock import run_lock
from ..training.tensorboard import check_available as check_tensorboard
from ..training.tracking import MLflowTracker, check_server, log_results
from ..training.train import train

GRID_KEYS = ("base", "sweep")


@dataclass
class GridRun:
    """One combination: its name, what varies, and the full settings of its config."""

    name: str
    varied: dict
    settings: dict


def _label(value: object) -> str:
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "", text.replace(":", "-").replace("/", "-"))


def run_name(varied: dict) -> str:
    """The directory name of a combination: setting-value pairs joined by _ (e.g. prior-vamp_seed-1)."""
    return "_".join(f"{key}-{_label(value)}" for key, value in varied.items()) or "base"


def read_grid(path: str | Path, override: dict | None = None) -> list[GridRun]:
    """The combinations of a grid file (with `override`'s settings over every one), each checked as a
    Config; an InputError for an unknown key, a sweep that is not a non-empty list, or a combination
    the config refuses (naming it)."""
    values = load_config_file(path)
    unknown = sorted(set(values) - set(GRID_KEYS))
    if unknown:
        raise InputError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; a grid file has "
                         f"{' and '.join(GRID_KEYS)} (settings, and lists of settings to sweep)")
    base, sweep = values.get("base") or {}, values.get("sweep") or {}
    for key, value in (("base", base), ("sweep", sweep)):
        if not isinstance(value, dict):
            raise InputError(f"grid file {path}: {key} must be a mapping of settings, "
                             f"got {type(value).__name__}")
    for key, options in sweep.items():
        if not isinstance(options, list) or not options:
            raise InputError(f"grid file {path}: sweep {key} must be a non-empty list of values, "
                             f"got {options!r}")
    runs = []
    for combination in itertools.product(*sweep.values()):
        varied = dict(zip(sweep, combination, strict=True))
        name = run_name(varied)
        try:
            config = check_config(Config.from_dict({**base, **varied, **(override or {})}))
        except InputError as err:
            raise InputError(f"grid file {path}: combination {name} is refused: {err}") from None
        runs.append(GridRun(name, varied, config.to_dict()))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"grid file {path}: two combinations share a run name ({names}); "
                         "sweep distinct values")
    return runs


def run_state(run: Path, settings: dict) -> str:
    """'new', 'partial' (a checkpoint to resume), 'trained' (to its epochs; not evaluated on this
    checkpoint) or 'done'; an InputError if OUT/<name> holds a run of other settings."""
    if not (run / CONFIG).is_file() or not (run / CHECKPOINT).is_file():
        return "new"
    recorded, _ = read_config(run)
    differ = sorted(k for k, v in settings.items() if k not in RESUMABLE and getattr(recorded, k) != v)
    if differ:
        raise InputError(f"{run} holds a run with other settings ({', '.join(differ)}) than the grid's "
                         "combination; move it away or choose another --out")
    state = load_checkpoint(run / CHECKPOINT)
    if not (run / SUMMARY).is_file() or int(state["epoch"]) - 1 < settings["epochs"]:
        return "partial"
    stamp = read_json(run / EVAL).get("model_checkpoint") if (run / EVAL).is_file() else None
    return "done" if isinstance(stamp, dict) and stamp.get("step") == int(state["step"]) else "trained"


def train_and_evaluate(run: str, settings: dict, state: str, tensorboard: bool,
                       reporters: Sequence[object] = ()) -> str:
    """In the process of a worker (local or Ray): train (or resume) the run and evaluate it (with its
    eval_k importance samples per example), each of
    `reporters` following the training (train's docstring) and a tracked run's evaluation logged to
    MLflow; returns a line saying what was done, or raises InputError/TrainingError."""
    config = Config.from_dict(settings)
    torch.set_num_threads(config.threads)  # the worker's own process
    with run_lock(run, create=True):  # one writer at a time, from training to evaluation
        options = {"progress": False, "tensorboard": tensorboard, "reporters": reporters}
        if state == "new":
            train(config, out=run, overwrite=True, **options)
        elif state == "partial":
            train(config, out=run, resume=True, **options)
        result, _, _ = evaluate_run(run, eval_k=config.eval_k, device=config.device)
    log_results(run, result, [Path(run) / EVAL])
    return f"{'trained' if state == 'new' else 'resumed' if state == 'partial' else 'evaluated'}: " \
           f"log p(x) {result['log_px']:.2f} nats"


def _job(run: str, settings: dict, state: str, tensorboard: bool, mlflow: str | None,
         experiment: str) -> str:
    """A local worker's run: train_and_evaluate, tracked in MLflow at URI `mlflow` (if given)."""
    reporters = [MLflowTracker(mlflow, experiment)] if mlflow else []
    return train_and_evaluate(run, settings, state, tensorboard, reporters)


def overrides(threads: int | None, eval_k: int | None) -> dict | None:
    """The settings the command line sets for every run of a grid (`threads`, `eval_k`), those given."""
    given = {name: value for name, value in (("threads", threads), ("eval_k", eval_k)) if value}
    return given or None


@renamed_keywords(k="eval_k")
def run_grid(path: str | Path, out: str | Path, jobs: int = 1, eval_k: int | None = None,
             threads: int | None = None, tensorboard: bool = False, echo: Callable[[str], None] = print,
             mlflow: str | None = None) -> tuple[list[GridRun], list[str]]:
    """Train and evaluate every combination of the grid file into OUT/<name>, `jobs` worker processes
    at a time, each with its config's torch threads (`threads`, if given, for every run), importance-
    sampling log p(x) with its config's eval_k draws per example (`eval_k`, if given, for every run:
    at the end of training and in the evaluation). Returns the combinations and the names that failed
    (each line of progress goes to echo); with tensorboard, each run writes TensorBoard events
    (training/tensorboard.py); with mlflow (a tracking URI), each run is tracked in the MLflow experiment
    named after
    the grid file."""
    check_options(jobs=jobs, threads=threads or 1, tensorboard=tensorboard, mlflow=mlflow,
                  **({} if eval_k is None else {"eval_k": eval_k}))
    runs, out = read_grid(path, overrides(threads, eval_k)), Path(out)
    states = {r.name: run_state(out / r.name, r.settings) for r in runs}
    todo = [r for r in runs if states[r.name] != "done"]
    for r in runs:
        if states[r.name] == "done":
            echo(f"{r.name}: done, skipped")
    failed = []
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("spawn")  # a clean process: no inherited torch threads, locks
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
            futures = {r.name: pool.submit(_job, str(out / r.name), r.settings, states[r.name], tensorboard,
                                           mlflow, Path(path).stem) for r in todo}
            for name, future in futures.items():
                try:
                    echo(f"{name}: {future.result()}")
                except (InputError, TrainingError) as err:
                    failed.append(name)
                    echo(f"{name}: failed: {err}")
    return runs, failed


def check_options(tensorboard: bool = False, mlflow: str | None = None, **counts: int) -> None:
    """Refuse, before anything is written, a count (--jobs, --eval-k, ...) that is not positive, TensorBoard
    events without tensorboard, and an MLflow tracking URI whose server does not answer."""
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if tensorboard:
        check_tensorboard()
    if mlflow:
        check_server(mlflow)


def grid_report(runs: list[GridRun], out: Path, failed: list[str], stopped: dict[str, dict] | None = None):
    """`pyro-vae report` over the grid's runs that did not fail, written to OUT/report; runs a scheduler
    stopped (grid_ray: name -> {"by", "epoch", "validation_elbo"}) are left out of the table and listed
    under it as stopped."""
    stopped = stopped or {}
    result = report([out / r.name for r in runs if r.name not in failed and r.name not in stopped],
                    out / "report")
    if stopped:
        lines = [f"- {name}: after epoch {s['epoch']}, validation ELBO {s['validation_elbo']:.2f} nats"
                 for name, s in stopped.items()]
        by = ", ".join(sorted({str(s["by"]) for s in stopped.values()}))
        with (out / "report" / MARKDOWN).open("a") as f:
            f.write(f"\nStopped by the scheduler ({by}; not failed, not in the table):\n\n" + "\n".join(lines)
                    + "\n")
    return result
