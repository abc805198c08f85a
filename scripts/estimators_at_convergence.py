"""Which ELBO estimator trains the best model for a given compute budget: the protocol VAE (the
`fashion-mnist-vae` preset: gated MLP 300-300, z 40, normal prior, its settings) trained with each
estimator spec (NAME or NAME:K, K samples of z per example), over seeds, then evaluated and tabulated
against `mc`, paired by seed and by test image.

Two modes. `--mode budget --minutes M`: every run gets `pyro-vae train --time-budget M` (training stops at
the first epoch end past M minutes of its wall time; early stopping stays on, so a run may stop sooner).
`--mode converge`: every run trains to early stopping (default specs mc and analytic, seeds 0 1 2).
The importance-weighted bounds (iwae, iwae-dreg) have no KL term to warm up, so they train without the
preset's KL warm-up (`--kl-anneal 0`; pyro-vae refuses it for them); the others keep it (or take
--kl-anneal EPOCHS, e.g. 0 for all alike). The table says which runs warmed up.

Each run is `pyro-vae train` in its own process with one torch thread (OMP_NUM_THREADS=1, --threads 1),
JOBS at a time; a finished run (summary.json) is kept, an unfinished one (checkpoint.pt) is continued with
--resume, so the script can be stopped and called again, across sessions, until the study is done. A
finished run's record without checkpoints (config, metrics, summary, eval.json and eval_examples.pt, as
kept under docs/runs/) copied into OUT counts as done, so a study can go on on a new machine. Each
run's training ends with its evaluation with K samples (eval.json and eval_examples.pt); a finished run is
evaluated again (`pyro-vae evaluate RUN --eval-k K`) only where its eval.json does not describe its final
model with K samples (another K, or a run trained before training wrote eval.json). Writes
OUT/estimators.md (printed) and OUT/estimators.json, and `pyro-vae report` of every run into OUT/report.

    nice -n 19 python scripts/estimators_at_convergence.py --mode budget --minutes 60 \
        --data-dir /usr/share/datasets/fashion-mnist --jobs 2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout, suppress
from pathlib import Path

from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare import parse_specs
from pyro_vae.evaluation.report import check_same_test_set, paired_difference, read_run
from pyro_vae.training.run_dir import CHECKPOINT, CONFIG, EVAL, SUMMARY, model_file, model_stamp, read_json

PRESET = "fashion-mnist-vae"
SPECS = {"budget": ["mc", "analytic", "iwae:5", "iwae:50", "stl", "iwae-dreg:5", "iwae-dreg:50"],
         "converge": ["mc", "analytic"]}
SEEDS = {"budget": [0, 1], "converge": [0, 1, 2]}
BASELINE = "mc"  # the spec every other one is paired against (the first spec where mc is not studied)
PASS_THROUGH = ("train_size", "test_size", "validation_size", "epochs", "hidden", "z_dim")
CPU = {**os.environ, "OMP_NUM_THREADS": "1"}  # the environment of every pyro-vae process: one torch thread


def has_kl_term(name: str) -> bool:
    """Whether the estimator's bound has a KL term a warm-up can weight (config.py refuses --kl-anneal
    for the importance-weighted ones, iwae*)."""
    return not name.startswith("iwae")


def label(name: str, k: int) -> str:
    """How a spec is written: NAME for one sample of z, NAME:K for K."""
    return name if k == 1 else f"{name}:{k}"


def run_dir(out: Path, spec: str, seed: int) -> Path:
    """Where the run of `spec` (a label) with `seed` lives."""
    return out / f"{spec.replace(':', '-')}-s{seed}"


def pyro_vae(*args: str) -> list[str]:
    """A pyro-vae command line run by this Python."""
    return [sys.executable, "-m", "pyro_vae", *args]


def command(args: argparse.Namespace, name: str, k: int, seed: int) -> list[str]:
    """The `pyro-vae train` command of one run, or its --resume where it has a checkpoint; a directory
    left without one (stopped before its first checkpoint) is started again (--overwrite)."""
    out = run_dir(args.out, label(name, k), seed)
    budget = ["--time-budget", str(args.minutes)] if args.mode == "budget" else []
    resumable = budget + device_flag(args)  # settings a resumed run takes again
    if (out / CHECKPOINT).is_file():
        return pyro_vae("train", "--resume", str(out), *resumable, "--threads", "1", "--quiet")
    cmd = pyro_vae("train", "--preset", args.preset, "--dataset", args.dataset, "--data-dir", args.data_dir,
                   "--estimator", name, "--particles", str(k), "--seed", str(seed), *resumable,
                   "--eval-k", str(args.eval_k), "--threads", "1", "--out", str(out),
                   "--quiet")
    for flag in PASS_THROUGH:
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    if not has_kl_term(name) or args.kl_anneal is not None:
        cmd += ["--kl-anneal", str(args.kl_anneal if has_kl_term(name) else 0)]
    return cmd + (["--overwrite"] if out.is_dir() and any(out.iterdir()) else [])


def device_flag(args: argparse.Namespace) -> list[str]:
    """--device for every train, resume and evaluate call, where one was asked for (a resumed run may move:
    a run begun on the CPU goes on on the GPU)."""
    return ["--device", args.device] if args.device else []


def _call(cmd: list[str], log: Path, what: str) -> bool:
    """Run `cmd` with one torch thread, its output appended to `log`; say if it failed."""
    with open(log, "a") as stream:
        done = subprocess.run(cmd, env=CPU, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode:
        print(f"{what}: failed (exit {done.returncode}), see {log}", flush=True)
    return done.returncode == 0


def train_one(args: argparse.Namespace, name: str, k: int, seed: int) -> None:
    """Train one run unless it has finished, then evaluate it unless eval.json describes its final
    model with --eval-k samples; output goes to OUT/<run>.log."""
    out = run_dir(args.out, label(name, k), seed)
    if not (out / SUMMARY).is_file():
        if not _call(command(args, name, k, seed), Path(f"{out}.log"), out.name):
            return
        print(f"{out.name}: trained", flush=True)
    if not evaluated(out, args.eval_k):
        if _call(pyro_vae("evaluate", str(out), "--eval-k", str(args.eval_k), *device_flag(args), "--quiet"),
                 Path(f"{out}.log"), f"{out.name} (evaluate)"):
            print(f"{out.name}: evaluated with k = {args.eval_k}", flush=True)


def evaluated(run: Path, k: int) -> bool:
    """Whether RUN/eval.json describes the run's final model (same checkpoint, step) with k samples. A
    finished run's record without checkpoints (one restored from docs/runs/ onto a new machine) has no
    model to compare with: its eval.json with k samples is the result, so the run counts as evaluated."""
    if not (run / EVAL).is_file():
        return False
    record = read_json(run / EVAL)
    if record.get("k") != k:
        return False
    if not model_file(run).is_file():
        return (run / SUMMARY).is_file()
    return record.get("model_checkpoint") == model_stamp(run)


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean over seeds and its standard error stdev / sqrt(n) (None for one seed)."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return statistics.fmean(values), se


def paired(runs: dict[int, object], base: dict[int, object], key: str) -> dict | None:
    """The spec minus the baseline on the same test images, per seed s: d_s = mean_i (v_si - b_si) and its
    s.e. over images se_s (report.paired_difference); overall the mean of d_s over the seeds both have,
    its s.e. over seeds, and over images sqrt(sum se_s^2) / S (the evaluation's part alone)."""
    seeds = sorted(set(runs) & set(base))
    if not seeds:
        return None
    per_seed = {s: paired_difference(base[s].values[key], runs[s].values[key]) for s in seeds}
    mean, se_seeds = _mean_se([d for d, _ in per_seed.values()])
    se_images = math.sqrt(sum(se ** 2 for _, se in per_seed.values())) / len(seeds)
    return {"mean": mean, "se_seeds": se_seeds, "se_images": se_images, "seeds": seeds,
            "per_seed": {str(s): {"mean": d, "se": se} for s, (d, se) in per_seed.items()}}


def _validation(metrics: list[dict], after: int) -> dict[int, float]:
    """metrics.jsonl's validation ELBO by epoch, for the epochs past `after`."""
    return {int(m["epoch"]): float(m["validation_elbo"]) for m in metrics
            if m.get("validation_elbo") is not None and int(m["epoch"]) > after}


def equal_epochs(runs: dict[int, object], base: dict[int, object], after: int) -> dict | None:
    """The spec minus the baseline in validation ELBO at equal epochs, per seed s: d_s = mean over the
    epochs e > `after` (past the warm-up) both runs reached of v_se - b_se (metrics.jsonl); overall the
    mean of d_s over the seeds and its s.e. over seeds. Unlike the test columns it does not depend on
    where early stopping ended each run. None where no seed has such an epoch."""
    per_seed = {}
    for s in sorted(set(runs) & set(base)):
        spec, baseline = _validation(runs[s].metrics, after), _validation(base[s].metrics, after)
        common = sorted(set(spec) & set(baseline))
        if common:
            per_seed[s] = (statistics.fmean(spec[e] - baseline[e] for e in common), len(common))
    if not per_seed:
        return None
    mean, se_seeds = _mean_se([d for d, _ in per_seed.values()])
    return {"mean": mean, "se_seeds": se_seeds, "after_epoch": after, "seeds": sorted(per_seed),
            "per_seed": {str(s): {"mean": d, "epochs": n} for s, (d, n) in per_seed.items()}}


def finished(run: Path, k: int) -> bool:
    """Whether the run has finished training (summary.json) and been evaluated with k samples."""
    return (run / SUMMARY).is_file() and evaluated(run, k)


def summarize(out: Path, specs: list[str], seeds: list[int], k: int) -> dict:
    """Per spec, over the seeds whose run finished and was evaluated with k samples: test log p(x),
    test ELBO, KL and active units (eval.json) as mean and s.e. over seeds; epochs, steps, seconds per
    step (train_seconds / steps) and stop reasons (summary.json); and the paired differences of log p(x)
    and ELBO from the baseline (`paired`). Every run must be evaluated on the same test images."""
    done = {spec: [run_dir(out, spec, s) for s in seeds] for spec in specs}
    found = {spec: {s: read_run(run) for s, run in zip(seeds, runs, strict=True) if finished(run, k)}
             for spec, runs in done.items()}
    everything = [run for runs in found.values() for run in runs.values()]
    if everything:
        check_same_test_set(everything)
    baseline = BASELINE if BASELINE in specs else specs[0]
    warm_up_epochs = {spec: [read_json(r.path / CONFIG)["kl_anneal"] for r in runs.values()]
                      for spec, runs in found.items()}  # each run's --kl-anneal
    table = {}
    for spec, runs in found.items():
        if not runs:
            continue
        evals = [r.evaluation for r in runs.values()]
        sums = [r.summary for r in runs.values()]
        cell = {"seeds": sorted(runs), "n_examples": evals[0]["n_examples"], "k": evals[0].get("k")}
        for key in ("log_px", "test_elbo", "kl", "active_units"):
            cell[key], cell[f"{key}_se"] = _mean_se([float(e[key]) for e in evals])
        cell["epochs"] = [s["epochs"] for s in sums]
        cell["best_epoch"] = [s.get("best_epoch") for s in sums]
        cell["steps"] = [s["steps"] for s in sums]
        cell["seconds_per_step"] = statistics.fmean(s["train_seconds"] / max(s["steps"], 1) for s in sums)
        cell["stop_reason"] = [s.get("stop_reason") for s in sums]
        cell["time_budget_minutes"] = sums[0].get("time_budget_minutes")
        cell["kl_anneal"] = warm_up_epochs[spec]
        if spec != baseline:
            cell["vs"] = baseline
            cell["diff_log_px"] = paired(runs, found[baseline], "log_px")
            cell["diff_elbo"] = paired(runs, found[baseline], "elbo")
            warm = max(warm_up_epochs[spec] + warm_up_epochs[baseline])
            cell["diff_validation"] = equal_epochs(runs, found[baseline], warm)
        table[spec] = cell
    return table


def _pm(value: float, se: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _diff(d: dict | None) -> str:
    """A difference from the baseline: mean ± s.e. over seeds, and the images' part where it has one."""
    if d is None:
        return "—"
    seeds = "" if d["se_seeds"] is None else f" ± {d['se_seeds']:.3f}"
    images = f" (images ± {d['se_images']:.3f})" if "se_images" in d else ""
    return f"{d['mean']:+.3f}{seeds}{images}"


def _counts(values: list) -> str:
    return ", ".join(dict.fromkeys(f"{v} ×{values.count(v)}" if values.count(v) > 1 else str(v)
                                   for v in values))


def markdown(table: dict, mode: str, minutes: float | None) -> str:
    """One row per spec: the means ± s.e. over seeds, and the paired differences from the baseline."""
    if not table:
        return "No run has finished and been evaluated yet.\n"
    base = next((c["vs"] for c in table.values() if "vs" in c), BASELINE)
    lines = [f"| estimator | seeds | test log p(x) | Δ log p(x) vs {base} | test ELBO | Δ ELBO vs {base} | "
             f"Δ validation ELBO vs {base}, equal epochs | KL | active units | epochs (best) | steps | "
             "s / step | stop reason |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, c in table.items():
        epochs = ", ".join(f"{e} ({b})" if b is not None else str(e)
                           for e, b in zip(c["epochs"], c["best_epoch"], strict=True))
        lines.append(
            f"| {spec} | {len(c['seeds'])} | {_pm(c['log_px'], c['log_px_se'])} | "
            f"{_diff(c.get('diff_log_px'))} | {_pm(c['test_elbo'], c['test_elbo_se'])} | "
            f"{_diff(c.get('diff_elbo'))} | {_diff(c.get('diff_validation'))} | "
            f"{_pm(c['kl'], c['kl_se'])} | "
            f"{_pm(c['active_units'], c['active_units_se'], 1)} | {epochs} | "
            f"{', '.join(map(str, c['steps']))} | {c['seconds_per_step'] * 1000:.1f} ms | "
            f"{_counts(c['stop_reason'])} |")
    first = next(iter(table.values()))
    how = (f"each run trained for a budget of {minutes:g} minutes of one CPU thread (`--time-budget`), "
           "early stopping on" if mode == "budget" else "each run trained to early stopping")
    lines += ["", f"{how}; {first['n_examples']} test images, the same in every run; log p(x) by "
              f"importance sampling with S = {first['k']}; values in nats, mean ± s.e. over seeds; Δ: the "
              f"estimator minus {base} on the same seed and the same test images, mean over seeds ± its s.e. "
              "over seeds (images: the paired s.e. over test images alone, sqrt(Σ se_s²)/seeds); equal "
              "epochs: the validation ELBO's difference averaged over the epochs past the warm-up that both "
              "runs reached, mean ± s.e. over seeds; epochs "
              "reached (best epoch kept by early stopping); s / step: train_seconds / steps. "
              + warm_up(table)]
    return "\n".join(lines) + "\n"


def warm_up(table: dict) -> str:
    """Which specs trained with the KL warm-up over how many epochs (config.json's kl_anneal)."""
    by_epochs: dict[int, list[str]] = {}
    for spec, cell in table.items():
        for epochs in dict.fromkeys(cell["kl_anneal"]):
            by_epochs.setdefault(epochs, []).append(spec)
    return "; ".join((f"KL warm-up over {n} epochs: " if n else "no KL warm-up: ") + ", ".join(specs)
                     for n, specs in sorted(by_epochs.items(), reverse=True)) + "."


def report(args: argparse.Namespace, runs: list[Path]) -> None:
    """`pyro-vae report` of the runs (the baseline's first) into OUT/report, its output in
    OUT/report.log; against seconds (--x seconds) where `pyro-vae report --help` offers --x."""
    from pyro_vae.cli import main as pyro_vae_main

    if not runs:
        return
    help_text = io.StringIO()
    with redirect_stdout(help_text), suppress(SystemExit):
        pyro_vae_main(["report", "--help"])
    x = ["--x", "seconds"] if "--x" in help_text.getvalue() else []
    with open(args.out / "report.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
        code = pyro_vae_main(["report", *map(str, runs), "--out", str(args.out / "report"), *x])
    if code:
        print(f"report: failed (exit {code}), see {args.out / 'report.log'}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("budget", "converge"), required=True)
    parser.add_argument("--minutes", type=float, default=None, help="--mode budget: each run's time budget")
    parser.add_argument("--specs", nargs="+", default=None, metavar="NAME[:K]",
                        help="estimators (default: budget " + " ".join(SPECS["budget"]) + "; converge "
                        + " ".join(SPECS["converge"]) + ")")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: budget 0 1; converge 0 1 2")
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: runs/estimators-budget-<M>min or runs/estimators-converge")
    parser.add_argument("--kl-anneal", type=int, default=None,
                        help="KL warm-up epochs of the estimators with a KL term (default: the preset's; "
                        "iwae and iwae-dreg always 0)")
    parser.add_argument("--eval-k", type=int, default=5000, help="importance samples S of the test log p(x)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--device", default=None,
                        help="every run's --device (default: pyro-vae's, auto); on one GPU, the --jobs runs "
                        "share it")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--validation-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--z-dim", type=int, default=None)
    args = parser.parse_args(argv)
    if (args.mode == "budget") != (args.minutes is not None):
        parser.error("--minutes is needed with --mode budget, and only there")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    try:
        args.specs = [label(n, k) for n, k in parse_specs(args.specs or SPECS[args.mode], [1])]
    except InputError as err:
        parser.error(str(err))
    args.seeds = args.seeds if args.seeds is not None else SEEDS[args.mode]
    args.out = args.out or Path(f"runs/estimators-budget-{args.minutes:g}min" if args.mode == "budget"
                                else "runs/estimators-converge")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(*parse_specs([spec], [1])[0], seed) for seed in args.seeds for spec in args.specs]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: train_one(args, *job), jobs))
    table = summarize(args.out, args.specs, args.seeds, args.eval_k)
    text = markdown(table, args.mode, args.minutes)
    waiting = [run.name for spec in args.specs for s in args.seeds
               if not finished(run := run_dir(args.out, spec, s), args.eval_k)]
    if waiting:
        text += f"\nNot finished or not evaluated yet (call the script again): {', '.join(waiting)}.\n"
    (args.out / "estimators.md").write_text(text)
    (args.out / "estimators.json").write_text(json.dumps(
        {"mode": args.mode, "minutes": args.minutes, "preset": args.preset, "dataset": args.dataset,
         "eval_k": args.eval_k, "specs": table}, indent=2))
    first = [s for s in args.specs if s == BASELINE] + [s for s in args.specs if s != BASELINE]
    report(args, [run_dir(args.out, spec, s) for spec in first for s in table.get(spec, {}).get("seeds", [])])
    print(text)
    return table


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # e.g. runs evaluated on different test images: one line, exit 2
        print(f"estimators_at_convergence: error: {err}", file=sys.stderr)
        sys.exit(2)
