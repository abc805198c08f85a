"""`pyro-vae report RUN RUN ...`: evaluated runs side by side, and each run's paired difference from the
first on the same test examples.

For runs a and b evaluated on the same N test examples, the paired difference of log p(x) is
d_i = log p_b(x_i) - log p_a(x_i): its mean is b's log p(x) minus a's, and its standard error
sd(d) / sqrt(N) is smaller than the two runs' own standard errors combined whenever the runs agree on
which examples are hard (which they do: the spread of log p(x) over examples is mostly the examples').
The per-example values come from RUN/eval_examples.pt, written by `pyro-vae evaluate`; eval.json records
the test set's size and fingerprint (evaluate.test_fingerprint), and runs evaluated on different test
sets are refused, as are runs not evaluated, or evaluated on an older checkpoint than they hold now.

Writes report.md, report.csv, report.json and report_curves.png (the runs' learning curves overlaid).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .plots import plot_run_curves
from .run_dir import (
    BEST,
    CHECKPOINT,
    CONFIG,
    EVAL,
    EVAL_EXAMPLES,
    EVAL_FIELDS,
    METRICS,
    STAMP_FIELDS,
    SUMMARY,
    check_fields,
    evaluate_pair_hint,
    load_checkpoint,
    model_stamp,
    read_json,
    read_metrics,
    recorded_pair,
    write_json,
)
from .stats import mean_se

MARKDOWN, CSV, JSON, CURVES = "report.md", "report.csv", "report.json", "report_curves.png"
PAIRED = ("log_px", "elbo", "correct")  # the per-example values whose paired difference the report gives
COLUMNS = ("run", "log_px", "log_px_se", "test_elbo", "test_elbo_se", "kl", "active_units", "accuracy",
           "accuracy_se", "epochs", "best_epoch", "train_seconds", "device", "n_examples", "k",
           "diff_log_px", "diff_log_px_se", "diff_elbo", "diff_elbo_se", "diff_correct", "diff_correct_se")


@dataclass
class EvaluatedRun:
    """What the report reads from one run directory."""

    name: str
    path: Path
    evaluation: dict
    values: dict[str, Tensor]
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)


@dataclass
class Report:
    """The report's rows (one per run, COLUMNS), the runs, and the files written."""

    rows: list[dict]
    runs: list[EvaluatedRun]
    paths: list[Path]


def read_run(run: str | Path, name: str | None = None) -> EvaluatedRun:
    """A run's evaluation (eval.json and its per-example values), summary and metrics; an InputError
    naming the run if it has not been evaluated, its evaluation predates the per-example file or the
    model it holds now, or it is an autoencoder (no log p(x) to compare)."""
    path = Path(run)
    name = name or path.name
    if not (path / CONFIG).is_file():
        raise InputError(f"run {name} ({path}) is not a pyro-vae run directory (no {CONFIG})")
    if not (path / EVAL).is_file():
        raise InputError(f"run {name} ({path}) has not been evaluated: run {_evaluate_hint(path)} first")
    evaluation = check_fields(path / EVAL, read_json(path / EVAL), EVAL_FIELDS, required=("n_examples",))
    if evaluation.get("log_px") is None and evaluation.get("test_accuracy") is None:
        raise InputError(f"run {name} ({path}) is an autoencoder: it has no log p(x) to compare")
    if not (path / EVAL_EXAMPLES).is_file() or "test_fingerprint" not in evaluation:
        raise InputError(f"run {name} ({path}) was evaluated without per-example values (an older "
                         f"pyro-vae): run {_evaluate_hint(path)} again")
    stamp = evaluation.get("model_checkpoint")
    if stamp is not None:
        check_fields(path / EVAL, stamp, STAMP_FIELDS, tuple(STAMP_FIELDS), where=" (model_checkpoint)")
    if stamp and stamp["checkpoint"] in (CHECKPOINT, BEST) and (path / stamp["checkpoint"]).is_file():
        now = model_stamp(path, stamp["checkpoint"])
        if now["step"] != stamp["step"]:
            raise InputError(f"run {name} ({path}) was evaluated at step {stamp['step']} (epoch "
                             f"{stamp['epoch']}) but {stamp['checkpoint']} is now at step {now['step']}: run "
                             f"{_evaluate_hint(path)} again")
    needed = ("log_px", "elbo") if evaluation.get("log_px") is not None else ("correct",)
    values = load_checkpoint_values(path / EVAL_EXAMPLES, needed)
    summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
    return EvaluatedRun(name, path, evaluation, values, summary, read_metrics(path / METRICS))


def _evaluate_hint(path: Path) -> str:
    """How to evaluate the run: `pyro-vae evaluate RUN`, or for a run of the user's own model/guide pair,
    which the command line cannot rebuild, the Python call that can."""
    if recorded_pair(path) is not None:
        return f"`{evaluate_pair_hint(path)}` in Python"
    return f"`pyro-vae evaluate {path}`"


def load_checkpoint_values(path: Path, needed: tuple[str, ...] = ("log_px", "elbo")) -> dict[str, Tensor]:
    """The per-example values of eval_examples.pt (weights-only load), each of shape (N,); those
    `needed` must be there."""
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file fails in any way the unpickler likes
        raise InputError(f"{path} is corrupt ({type(err).__name__}); evaluate the run again") from None
    if not isinstance(values, dict) or not set(needed) <= set(values):
        raise InputError(f"{path} lacks per-example {', '.join(needed)}; evaluate the run again")
    return values


def check_same_test_set(runs: list[EvaluatedRun]) -> None:
    """Every run evaluated on the first run's test examples (same count and fingerprint), else an
    InputError naming the run that differs."""
    first = runs[0]
    for run in runs[1:]:
        for key, what in (("n_examples", "test examples"), ("test_fingerprint", "test set (fingerprint)")):
            if run.evaluation.get(key) != first.evaluation.get(key):
                raise InputError(
                    f"run {run.name} was evaluated on other {what} than run {first.name} "
                    f"({run.evaluation.get(key)} vs {first.evaluation.get(key)}): a paired comparison needs "
                    "the same test set; evaluate both with the same dataset and --test-size")


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """mean(d) and its standard error sd(d) / sqrt(N) for d = b - a, per example (N >= 2; the s.e. is
    NaN for one example)."""
    return mean_se(b.double() - a.double())


def best_epoch(run: EvaluatedRun) -> int | None:
    """The epoch the run's early stopping kept: summary.json's "best_epoch"; for a run not finished (no
    summary yet), the epoch of the best.pt its evaluation scored; None without early stopping."""
    if "best_epoch" in run.summary:
        return run.summary["best_epoch"]
    scored = run.evaluation.get("model_checkpoint") or {}
    return scored.get("epoch") if scored.get("checkpoint") == BEST else None


def train_seconds(run: EvaluatedRun) -> float | None:
    """Training wall time, summed over the run's sessions: summary.json's "train_seconds"; for a run not
    finished, the sum of its epochs' seconds in metrics.jsonl (None without either)."""
    if "train_seconds" in run.summary:
        return run.summary["train_seconds"]
    seconds = [m["seconds"] for m in run.metrics if m.get("seconds") is not None]
    return float(sum(seconds)) if seconds else None


def epochs_trained(run: EvaluatedRun) -> int:
    """The epochs in metrics.jsonl (the checkpoint's, where metrics are missing)."""
    if run.metrics:
        return int(run.metrics[-1]["epoch"])
    if (run.path / CHECKPOINT).is_file():
        return int(load_checkpoint(run.path / CHECKPOINT)["epoch"]) - 1
    return 0


def rows(runs: list[EvaluatedRun]) -> list[dict]:
    """One row per run (COLUMNS): its evaluation, training facts, and its paired difference from the
    first run (None for the first, and where either run lacks the value: a classifier has no log p(x),
    a VAE no accuracy)."""
    table = []
    for run in runs:
        e = run.evaluation
        row = {"run": run.name, "log_px": e.get("log_px"), "log_px_se": e.get("log_px_se"),
               "test_elbo": e.get("test_elbo"), "test_elbo_se": e.get("test_elbo_se"), "kl": e.get("kl"),
               "active_units": e.get("active_units"), "accuracy": e.get("test_accuracy"),
               "accuracy_se": e.get("test_accuracy_se"),
               "epochs": epochs_trained(run), "best_epoch": best_epoch(run),
               "train_seconds": train_seconds(run), "device": run.summary.get("device"),
               "n_examples": e["n_examples"], "k": e.get("k")}
        for key in PAIRED:
            both = run is not runs[0] and key in runs[0].values and key in run.values
            diff = paired_difference(runs[0].values[key], run.values[key]) if both else (None, None)
            row[f"diff_{key}"], row[f"diff_{key}_se"] = diff
        table.append(row)
    return table


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(value: float | None, se: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f} ± {_fmt(se, digits)}"


def markdown(table: list[dict]) -> str:
    """The table as markdown: bounds in nats per example, ± one standard error; the paired columns are
    each run minus the first run on the same test examples; accuracy columns where a run has one."""
    first = table[0]["run"]
    accuracy = any(r["accuracy"] is not None for r in table)
    head = ("| run | log p(x) (nats) | ELBO (nats) | KL (nats) | active units | "
            + ("accuracy | " if accuracy else "") + "epochs | best epoch | "
            f"wall time (s) | device | Δ log p(x) vs {first} | Δ ELBO vs {first} |"
            + (f" Δ accuracy vs {first} |" if accuracy else ""))
    lines = [head, "|" + " --- |" * (len(head.split("|")) - 2)]
    for r in table:
        lines.append(
            f"| {r['run']} | {_pm(r['log_px'], r['log_px_se'])} | {_pm(r['test_elbo'], r['test_elbo_se'])} | "
            f"{_fmt(r['kl'])} | {_fmt(r['active_units'])} | "
            + (f"{_pm(r['accuracy'], r['accuracy_se'], 4)} | " if accuracy else "")
            + f"{r['epochs']} | {_fmt(r['best_epoch'])} | "
            f"{_fmt(r['train_seconds'], 1)} | {_fmt(r['device'])} | "
            f"{_pm(r['diff_log_px'], r['diff_log_px_se'], 3)} | "
            f"{_pm(r['diff_elbo'], r['diff_elbo_se'], 3)} |"
            + (f" {_pm(r['diff_correct'], r['diff_correct_se'], 4)} |" if accuracy else ""))
    n, k = table[0]["n_examples"], next((r["k"] for r in table if r["k"] is not None), None)
    lines.append("")
    lines.append(f"{n} test examples, the same in every run; log p(x) by importance sampling with k={k}; "
                 "± one standard error over examples; Δ: the run minus the first run per example, ± the "
                 "paired standard error sd(Δ)/sqrt(N)"
                 + (" (for accuracy, of the per-example difference of correctness)." if accuracy else "."))
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
    """The table as CSV with the COLUMNS header (empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)
    return buffer.getvalue()


def report(runs: list[str | Path], out: str | Path) -> Report:
    """Read the evaluated runs, check they share a test set, and write report.md, report.csv,
    report.json and report_curves.png into `out`."""
    if not runs:
        raise InputError("report needs one or more run directories")
    paths = [Path(r) for r in runs]
    names = [p.name for p in paths]
    names = names if len(set(names)) == len(names) else [str(p) for p in paths]
    evaluated = [read_run(p, name) for p, name in zip(paths, names, strict=True)]
    check_same_test_set(evaluated)
    table = rows(evaluated)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKDOWN).write_text(markdown(table))
    (out / CSV).write_text(to_csv(table))
    write_json(out / JSON, {"runs": table, "paths": [str(p) for p in paths]})
    written = [out / MARKDOWN, out / CSV, out / JSON]
    written.append(plot_run_curves({run.name: run.metrics for run in evaluated}, out / CURVES))
    return Report(table, evaluated, written)
