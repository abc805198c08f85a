"""`pyro-vae report RUN RUN ...`: evaluated runs side by side, and each run's paired difference from the
first on the same test examples.

For runs a and b evaluated on the same N test examples, the paired difference of log p(x) is
d_i = log p_b(x_i) - log p_a(x_i): its mean is b's log p(x) minus a's, and its standard error
sd(d) / sqrt(N) is smaller than the two runs' own standard errors combined whenever the runs agree on
which examples are hard (which they do: the spread of log p(x) over examples is mostly the examples').
The per-example values come from RUN/eval_examples.pt, written by `pyro-vae evaluate`; eval.json records
the test set's size and fingerprint (eval_record.test_fingerprint), and runs evaluated on different test
sets are refused, as are runs not evaluated (unless unevaluated=True: then their curves and epochs are
reported, without log p(x), e.g. long runs still training), or evaluated on an older checkpoint than they
hold now.
Conditional runs (--model cvae, nn-baseline) pair the same way on their "log_px", which is
log p(x_missing | x_given) (or log p(x | class)); runs under different conditions are refused.

Runs whose config.json agree on every setting but the seed are one group (seed_groups): report.md and
report.json give each group's log p(x) (and test accuracy, where its runs have one) as mean ± s.e. over
its seeds, and its difference from the first group paired by seed.

Writes report.md, report.csv, report.json and report_curves.png (the runs' learning curves overlaid,
against epochs, or with x="seconds" against training wall time, a curve and band per group).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import ADDED_SETTINGS
from ..errors import InputError
from ..figures.plots import TimedRun, bound_key, plot_run_curves, plot_seconds_curves
from ..stats import mean_se
from ..training.run_dir import (
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

MARKDOWN, CSV, JSON, CURVES = "report.md", "report.csv", "report.json", "report_curves.png"
X_AXES = ("epochs", "seconds")  # report_curves.png's x axis
MAX_LABEL_SETTINGS = 3  # a group is labelled by the settings that differ between groups, up to this many
GROUPED = {"log_px": "log_px", "accuracy": "test_accuracy"}  # a group row's quantity -> its eval.json key
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
class SeedGroup:
    """Runs whose config.json agree on every setting but `seed`; labelled by what differs between groups."""

    label: str
    runs: list[EvaluatedRun]
    seeds: list[object]


@dataclass
class Report:
    """The report's rows (one per run, COLUMNS), the runs, the files written, and one row per group of
    seeds (group_rows)."""

    rows: list[dict]
    runs: list[EvaluatedRun]
    paths: list[Path]
    groups: list[dict] = field(default_factory=list)


def read_run(run: str | Path, name: str | None = None, unevaluated: bool = False) -> EvaluatedRun:
    """A run's evaluation (eval.json and its per-example values), summary and metrics; an InputError
    naming the run if it has not been evaluated (with unevaluated=True: the run without an evaluation,
    its `evaluation` and `values` empty), its evaluation predates the per-example file or the model it
    holds now, or it is an autoencoder (no log p(x) to compare)."""
    path = Path(run)
    name = name or path.name
    if not (path / CONFIG).is_file():
        raise InputError(f"run {name} ({path}) is not a pyro-vae run directory (no {CONFIG})")
    summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
    if not (path / EVAL).is_file():
        if unevaluated:
            return EvaluatedRun(name, path, {}, {}, summary, read_metrics(path / METRICS))
        raise InputError(f"run {name} ({path}) has not been evaluated: run {_evaluate_hint(path)} first "
                         "(or report it with --unevaluated: its curves and epochs, without log p(x))")
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
    return EvaluatedRun(name, path, evaluation, values, summary, read_metrics(path / METRICS))


def _evaluate_hint(path: Path) -> str:
    """How to evaluate the run: `pyro-vae evaluate RUN`, or for a run of the user's own model/guide pair,
    which the command line cannot rebuild, the Python call that can."""
    if recorded_pair(path) is not None:
        return f"`{evaluate_pair_hint(path)}` in Python"
    return f"`pyro-vae evaluate {path}`"


def load_checkpoint_values(path: Path, needed: tuple[str, ...] = ("log_px", "elbo")) -> dict[str, Tensor]:
    """The per-example values of eval_examples.pt (weights-only load), each of shape (N,) as float64
    (stored as float32 where that is exact, eval_record.compact_values); those `needed` must be there."""
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file fails in any way the unpickler likes
        raise InputError(f"{path} is corrupt ({type(err).__name__}); evaluate the run again") from None
    if (not isinstance(values, dict) or not set(needed) <= set(values)
            or not all(isinstance(value, Tensor) for value in values.values())):
        raise InputError(f"{path} lacks per-example {', '.join(needed)}; evaluate the run again")
    return {name: value.double() for name, value in values.items()}


def check_same_test_set(runs: list[EvaluatedRun]) -> None:
    """Every evaluated run evaluated on the first run's test examples (same count and fingerprint), else an
    InputError naming the run that differs; the first run, the reference, must be evaluated."""
    first = runs[0]
    if not first.evaluation:
        raise InputError(f"run {first.name} ({first.path}) is the reference of the paired differences but "
                         "has not been evaluated: put an evaluated run first")
    runs = [run for run in runs if run.evaluation]
    for run in runs[1:]:
        for key, what in (("n_examples", "test examples"), ("test_fingerprint", "test set (fingerprint)")):
            if run.evaluation.get(key) != first.evaluation.get(key):
                raise InputError(
                    f"run {run.name} was evaluated on other {what} than run {first.name} "
                    f"({run.evaluation.get(key)} vs {first.evaluation.get(key)}): a paired comparison needs "
                    "the same test set; evaluate both with the same dataset and --test-size")
    for run in runs[1:]:
        if run.evaluation.get("condition") != first.evaluation.get("condition"):
            raise InputError(
                f"run {run.name} scores {_quantity(run)} but run {first.name} scores {_quantity(first)}: a "
                "paired comparison needs the same quantity; report runs with the same --condition together")


def _quantity(run: EvaluatedRun) -> str:
    """What a run's "log_px" is: log p(x), or a conditional model's log p(x_missing | x_given) (eval.json's
    log_px_of) under its --condition."""
    e = run.evaluation
    return f"{e['log_px_of']} (--condition {e['condition']})" if e.get("condition") else "log p(x)"


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """mean(d) and its standard error sd(d) / sqrt(N) for d = b - a, per example (N >= 2; the s.e. is
    NaN for one example)."""
    return mean_se(b.double() - a.double())


def best_epoch(run: EvaluatedRun) -> int | None:
    """The epoch the run's early stopping kept: summary.json's "best_epoch"; for a run not finished (no
    summary yet), the epoch of the best.pt its evaluation scored; for a run not evaluated, the best epoch
    so far (metrics.jsonl); None without early stopping."""
    if "best_epoch" in run.summary:
        return run.summary["best_epoch"]
    if not run.evaluation:
        return run.metrics[-1].get("best_epoch") if run.metrics else None
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
               "n_examples": e.get("n_examples"), "k": e.get("k")}
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


def unevaluated_note(runs: list[EvaluatedRun]) -> str:
    """A line per run not evaluated (report's unevaluated=True): where its training stands, the bound at
    its best epoch so far (bound_key: the validation ELBO, else the test ELBO); "" when every run is
    evaluated."""
    lines = []
    for run in runs:
        if run.evaluation:
            continue
        best, found = best_epoch(run), bound_key(run.metrics)
        row = next((m for m in run.metrics if m["epoch"] == best), None)
        at = (f", {found[1]} {row[found[0]]:.2f} at its best epoch {best}"
              if found and row and row.get(found[0]) is not None else "")
        state = "finished" if run.summary else "no summary.json: still training or stopped"
        lines.append(f"- {run.name}: not evaluated, {epochs_trained(run)} epochs ({state}){at}")
    if not lines:
        return ""
    return ("\nRuns not evaluated (no log p(x) and no paired differences; their curves are drawn):\n\n"
            + "\n".join(lines) + "\n")


def to_csv(table: list[dict]) -> str:
    """The table as CSV with the COLUMNS header (empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)
    return buffer.getvalue()


def _setting(value: object) -> str:
    """A setting's value in a label: lists joined by '-' (hidden 300-300)."""
    return "-".join(map(str, value)) if isinstance(value, list) else str(value)


# settings that do not change what a run trains: runs differing only in these (and the seed) are one group
NOT_GROUPED = frozenset({"seed", "data_dir", "device", "checkpoint_every", "eval_k", "threads", "workers",
                         "cuda_graph"})


def names_label(names: list[str]) -> str:
    """Runs' names as one label: "runs/mc-s{0,1,2}" where they differ only in a trailing number, else
    joined by " + "."""
    stem = re.sub(r"\d+$", "", names[0])
    numbers = [name[len(stem):] for name in names]
    if len(names) > 1 and all(name.startswith(stem) and re.fullmatch(r"\d+", number)
                              for name, number in zip(names, numbers, strict=True)):
        return f"{stem}{{{','.join(numbers)}}}"
    return " + ".join(names)


def seed_groups(runs: list[EvaluatedRun], configs: list[dict]) -> list[SeedGroup]:
    """Group runs whose configs (config.json, one per run) are equal once `seed` and the settings that do
    not change what is trained (NOT_GROUPED: where the data live, the device, checkpoint interval, the
    closing evaluation's samples ...) are removed, a setting an older config.json lacks counting as the
    value it ran under (ADDED_SETTINGS), in the order of each group's first run. Each group is labelled
    by the settings that differ between the groups
    ("estimator iwae, particles 5"; up to MAX_LABEL_SETTINGS of them), else (one group, or more settings
    differing) by its runs' names (names_label)."""
    members: dict[str, list[tuple[EvaluatedRun, dict]]] = {}
    for run, config in zip(runs, configs, strict=True):
        rest = json.dumps({k: v for k, v in {**ADDED_SETTINGS, **config}.items() if k not in NOT_GROUPED},
                          sort_keys=True)
        members.setdefault(rest, []).append((run, config))
    settings = [json.loads(rest) for rest in members]
    keys = list(dict.fromkeys(k for config in settings for k in config))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in settings}) > 1]
    by_setting = 0 < len(differ) <= MAX_LABEL_SETTINGS
    return [SeedGroup(", ".join(f"{k} {_setting(setting.get(k))}" for k in differ) if by_setting
                      else names_label([run.name for run, _ in group]),
                      [run for run, _ in group], [config.get("seed") for _, config in group])
            for setting, group in zip(settings, members.values(), strict=True)]


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """mean_se over seeds as plain numbers (None where there are no values, s.e. None for one)."""
    if not values:
        return None, None
    mean, se = mean_se(values)
    return mean, None if math.isnan(se) else se


def _over_seeds(group: SeedGroup, first: SeedGroup, key: str) -> tuple[list[float], list[float]]:
    """eval.json's `key` of each of the group's runs that has it, and, for each of those whose seed the
    first group has a run with `key` for, the run's value minus that run's (empty for the first group)."""
    theirs = {seed: run.evaluation[key] for run, seed in zip(first.runs, first.seeds, strict=True)
              if run.evaluation.get(key) is not None}
    mine = [(run.evaluation[key], seed) for run, seed in zip(group.runs, group.seeds, strict=True)
            if run.evaluation.get(key) is not None]
    paired = [] if group is first else [value - theirs[seed] for value, seed in mine if seed in theirs]
    return [value for value, _ in mine], paired


def _evaluated_seeds(group: SeedGroup) -> set:
    """The seeds of the group's runs that have an evaluation."""
    return {seed for run, seed in zip(group.runs, group.seeds, strict=True) if run.evaluation}


def group_rows(groups: list[SeedGroup]) -> list[dict]:
    """One row per group: its runs and seeds, log p(x) and (where runs have one) test accuracy as mean ±
    s.e. over its seeds (s.e. = sd / sqrt(n), for 2 seeds half their difference; over the runs evaluated,
    n_evaluated of n_runs), the runs' mean wall time (train_seconds), and each quantity's paired difference
    from the first group: d_s = the value of this group's run with seed s minus the first group's run with
    seed s, mean ± s.e. over the seeds both have (None for the first group and where no seed matches);
    n_paired counts the seeds both groups have evaluated runs of."""
    evaluated = _evaluated_seeds(groups[0])
    table = []
    for group in groups:
        seconds = [train_seconds(run) for run in group.runs]
        row = {"group": group.label, "runs": [run.name for run in group.runs], "seeds": group.seeds,
               "n_runs": len(group.runs),
               "n_evaluated": sum(bool(run.evaluation) for run in group.runs)}
        for name, key in GROUPED.items():
            values, paired = _over_seeds(group, groups[0], key)
            row[name], row[f"{name}_se"] = _mean_se(values)
            row[f"diff_{name}"], row[f"diff_{name}_se"] = _mean_se(paired)
        row["n_paired"] = None if group is groups[0] else len(_evaluated_seeds(group) & evaluated)
        row["train_seconds"] = None if None in seconds else float(np.mean(seconds))
        table.append(row)
    return table


def _evaluated_of(group: dict) -> str:
    """" (2 of 3 runs evaluated)" where runs of the group have no log p(x) (report --unevaluated), else ""."""
    n, evaluated = group["n_runs"], group["n_evaluated"]
    return f" ({evaluated} of {n} runs evaluated)" if evaluated < n else ""


def group_markdown(groups: list[dict]) -> str:
    """The group rows (group_rows) as a markdown section; accuracy columns where a group has one."""
    first = groups[0]["group"]
    accuracy = any(g["accuracy"] is not None for g in groups)
    head = ("| group | runs | seeds | log p(x) (nats), mean ± s.e. over seeds | "
            f"Δ log p(x) vs {first} (nats), paired by seed | "
            + (f"accuracy, mean ± s.e. over seeds | Δ accuracy vs {first}, paired by seed | " if accuracy
               else "")
            + "seeds paired | wall time (s), mean |")
    lines = ["", "Runs grouped by their settings without the seed:", "", head,
             "|" + " --- |" * (len(head.split("|")) - 2)]
    for g in groups:
        lines.append(f"| {g['group']} | {', '.join(g['runs'])} | {', '.join(map(str, g['seeds']))} | "
                     f"{_pm(g['log_px'], g['log_px_se'])}{_evaluated_of(g)} | "
                     f"{_pm(g['diff_log_px'], g['diff_log_px_se'], 3)} | "
                     + (f"{_pm(g['accuracy'], g['accuracy_se'], 4)} | "
                        f"{_pm(g['diff_accuracy'], g['diff_accuracy_se'], 4)} | " if accuracy else "")
                     + f"{_fmt(g['n_paired'])} | {_fmt(g['train_seconds'], 1)} |")
    lines += ["", "s.e. over seeds: sd / sqrt(n) (for 2 seeds, half their difference); Δ: for each seed both "
              "groups have, the group's run minus the first group's run, mean ± s.e. over those seeds."]
    return "\n".join(lines) + "\n"


def _check_seconds(run: EvaluatedRun) -> None:
    """Every metrics.jsonl row of the run has its epoch's wall time, else an InputError naming the run."""
    missing = next((m for m in run.metrics if not isinstance(m.get("seconds"), int | float)), None)
    if not run.metrics or missing is not None:
        where = f"at epoch {missing.get('epoch')}" if missing is not None else "(no epochs)"
        raise InputError(f"run {run.name} ({run.path}) has no seconds in metrics.jsonl {where}: --x seconds "
                         "draws each epoch at its wall time; use --x epochs")


def report(runs: list[str | Path], out: str | Path, x: str = "epochs", unevaluated: bool = False) -> Report:
    """Read the evaluated runs, check they share a test set, group them by their settings without the
    seed, and write report.md, report.csv, report.json and report_curves.png into `out`; x ("epochs" or
    "seconds", X_AXES) is the figure's x axis: with "seconds", seconds_curves_figure over the groups.
    With unevaluated=True, runs not evaluated (all but the first may be) are reported too: their curves,
    epochs and best epoch so far, without log p(x) (unevaluated_note)."""
    if x not in X_AXES:
        raise InputError(f"unknown x axis {x!r}: choose among {', '.join(X_AXES)}")
    if not runs:
        raise InputError("report needs one or more run directories")
    paths = [Path(r) for r in runs]
    names = [p.name for p in paths]
    names = names if len(set(names)) == len(names) else [str(p) for p in paths]
    evaluated = [read_run(p, name, unevaluated) for p, name in zip(paths, names, strict=True)]
    check_same_test_set(evaluated)
    if x == "seconds":
        for run in evaluated:
            _check_seconds(run)
    groups = seed_groups(evaluated, [read_json(p / CONFIG) for p in paths])
    table, grouped = rows(evaluated), group_rows(groups)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pooled = any(len(g.runs) > 1 for g in groups)
    conditional = evaluated[0].evaluation.get("condition") is not None  # the same in every run
    note = f"\nlog p(x) and ELBO here are of {_quantity(evaluated[0])}, in nats.\n" if conditional else ""
    (out / MARKDOWN).write_text(markdown(table) + note + unevaluated_note(evaluated)
                                + (group_markdown(grouped) if pooled else ""))
    (out / CSV).write_text(to_csv(table))
    write_json(out / JSON, {"runs": table, "groups": grouped, "paths": [str(p) for p in paths]})
    written = [out / MARKDOWN, out / CSV, out / JSON]
    if x == "seconds":
        timed = {g.label: [TimedRun(run.metrics, run.evaluation.get("log_px")) for run in g.runs]
                 for g in groups}
        written.append(plot_seconds_curves(timed, out / CURVES))
    else:
        written.append(plot_run_curves({run.name: run.metrics for run in evaluated}, out / CURVES))
    return Report(table, evaluated, written, grouped)
