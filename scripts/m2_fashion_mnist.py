"""The semi-supervised table of docs/results.md: M2 on Fashion-MNIST with N labelled training examples
(the rest unlabelled), each way of handling the class y, against the classifier alone trained on the
same N labels with the same network. Rows: enum + aux (y summed out, plus alpha * log q(y|x) on the
labels), enum, score (y sampled, score function with a baseline), relaxed (Gumbel-softmax), classifier.
Cells: test accuracy of q(y|x), mean +- standard error over seeds, the accuracy minus the classifier's
of the same seed on the same test images (paired; its standard error over the seeds), and the test ELBO.

Two protocols (--protocol; each flag below overrides its setting):
* quick (default; the first table of docs/results.md): M2 for --epochs 5 over batches drawn from the
  whole training set (at 100 labels in 60,000 most batches hold no label), alpha = 50 fixed, no
  validation set; the classifier 200 epochs over its N labels; N = 100, 1000, 3000.
* fair: the budget Kingma et al. and Pyro's example give M2. Every M2 batch holds --labelled-per-batch
  10 labelled examples (the loss weighted to stay unbiased: pyro_vae/training/labelled_batches.py);
  --validation-size 10000 labelled images held out; up to --epochs 100, stopped early on the validation
  accuracy of q(y|x) (--patience 20; best.pt is what is evaluated); enum + aux with Kingma's alpha,
  --aux-loss 0.1 --aux-loss-scale data (each label's log q(y|x) weighs 0.1 * N / N_labelled); the
  classifier on the same validation set up to --classifier-epochs 2000, stopped at its own early stop
  (--classifier-patience 100); N = 100 and 1000.

Each run is `pyro-vae train` in its own process with one torch thread, JOBS at a time; a run already
finished (summary.json) is kept, one interrupted (checkpoint.pt) is resumed, so the script can be
stopped and started again. Prints the Markdown table and writes it (table.md, table.json) to OUT.

    nice -n 19 python scripts/m2_fashion_mnist.py --data-dir /usr/share/datasets/fashion-mnist \
        --epochs 5 --jobs 2
    nice -n 19 python scripts/m2_fashion_mnist.py --data-dir /usr/share/datasets/fashion-mnist \
        --protocol fair --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyro_vae.renames import add_renamed_flag

ROWS = {  # label -> the settings of the row
    "enum + aux": ["--model", "m2", "--discrete", "enum", "--aux-loss", "{aux}",
                   "--aux-loss-scale", "{scale}"],
    "enum": ["--model", "m2", "--discrete", "enum"],
    "score": ["--model", "m2", "--discrete", "score"],
    "relaxed": ["--model", "m2", "--discrete", "relaxed", "--temperature", "1", "--temperature-final", "0.3"],
    "classifier": ["--model", "classifier"],
}
SLUG = {"enum + aux": "enum-aux", "enum": "enum", "score": "score", "relaxed": "relaxed",
        "classifier": "classifier"}
PROTOCOLS = {  # the settings each protocol gives a flag left out
    "quick": {"out": Path("runs/m2-fashion-mnist"), "labels": [100, 1000, 3000], "epochs": 5,
              "classifier_epochs": 200, "aux_loss": 50.0, "aux_loss_scale": "fixed",
              "labelled_per_batch": None, "validation_size": None, "patience": None,
              "classifier_patience": None},
    "fair": {"out": Path("runs/m2-fashion-mnist-fair"), "labels": [100, 1000], "epochs": 100,
             "classifier_epochs": 2000, "aux_loss": 0.1, "aux_loss_scale": "data", "labelled_per_batch": 10,
             "validation_size": 10000, "patience": 20, "classifier_patience": 100},
}


def run_dir(out: Path, row: str, labels: int, seed: int) -> Path:
    """Where the run of `row` with `labels` labels and `seed` lives."""
    return out / f"n{labels}-{SLUG[row]}-s{seed}"


def command(args: argparse.Namespace, row: str, labels: int, seed: int) -> list[str]:
    """The `pyro-vae train` command line of one run (or its --resume)."""
    out = run_dir(args.out, row, labels, seed)
    if (out / "checkpoint.pt").is_file():
        return [sys.executable, "-m", "pyro_vae", "train", "--resume", str(out), "--quiet"]
    classifier = row == "classifier"
    epochs = args.classifier_epochs if classifier else args.epochs
    settings = [s.format(aux=args.aux_loss, scale=args.aux_loss_scale) for s in ROWS[row]]
    latent = [] if classifier else ["--z-dim", str(args.z_dim), "--eval-k", str(args.eval_k)]  # M2's z
    cmd = [sys.executable, "-m", "pyro_vae", "train", "--dataset", args.dataset, "--data-dir", args.data_dir,
           *settings, "--labels", str(labels), "--seed", str(seed), "--epochs", str(epochs),
           "--hidden", *map(str, args.hidden), *latent, "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--checkpoint-every", "5", "--out", str(out), "--quiet"]
    options = {"train_size": args.train_size, "test_size": args.test_size,
               "validation_size": args.validation_size,
               "early_stop": args.classifier_patience if classifier else args.patience,
               "labelled_per_batch": None if classifier else args.labelled_per_batch}
    for flag, value in options.items():
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd


def train_one(args: argparse.Namespace, row: str, labels: int, seed: int) -> None:
    """Train one run unless it has finished; its output goes to OUT/<run>.log."""
    out = run_dir(args.out, row, labels, seed)
    if (out / "summary.json").is_file():
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(f"{out}.log", "a") as log:
        done = subprocess.run(command(args, row, labels, seed), env=env, stdout=log, stderr=subprocess.STDOUT)
    status = "done" if done.returncode == 0 else f"failed (exit {done.returncode}), see {out}.log"
    print(f"{out.name}: {status}", flush=True)


def summarize(out: Path, rows: list[str], labels: list[int], seeds: list[int]) -> dict:
    """Per (labels, row): accuracy mean and standard error over the seeds that finished, the test ELBO
    mean, the epochs trained and (with early stopping) the best epochs, as a range over the seeds,
    seconds per run, device."""
    table = {}
    for n in labels:
        for row in rows:
            runs = [json.loads((run_dir(out, row, n, s) / "summary.json").read_text()) for s in seeds
                    if (run_dir(out, row, n, s) / "summary.json").is_file()]
            if not runs:
                continue
            acc = [r["test_accuracy"] for r in runs]
            elbo = [r["test_elbo"] for r in runs if r.get("test_elbo") is not None]
            table[f"{n}/{row}"] = {
                "labels": n, "row": row, "seeds": len(runs),
                "accuracy": statistics.fmean(acc),
                "accuracy_se": statistics.stdev(acc) / len(acc) ** 0.5 if len(acc) > 1 else None,
                "test_elbo": statistics.fmean(elbo) if elbo else None,
                "epochs": span([r["epochs"] for r in runs]),
                "best_epochs": span([r["best_epoch"] for r in runs if "best_epoch" in r]),
                "seconds": statistics.fmean(r["train_seconds"] for r in runs),
                "device": runs[0]["device"],
            }
    return table


def span(values: list[int]) -> str | int | None:
    """One value if the seeds agree, else "lowest-highest"; None for none."""
    if not values:
        return None
    low, high = min(values), max(values)
    return low if low == high else f"{low}-{high}"


def correct(run: Path):
    """Per test example, whether the run's q(y|x) (or classifier) gets its label: 1.0 or 0.0."""
    from pyro_vae.evaluation.evaluate import labelled_correct
    from pyro_vae.training.run_dir import load_model
    from pyro_vae.training.train_data import prepare_data

    config, model = load_model(run)
    data = prepare_data(config)
    return labelled_correct(model, data.test_x, data.test_y)


def paired_with_classifier(out: Path, table: dict, rows: list[str], labels: list[int],
                           seeds: list[int]) -> None:
    """Add to each M2 cell the accuracy minus the classifier's, paired by seed and by test example:
    "vs_classifier" the mean over seeds of mean_i (correct_M2 - correct_classifier), "vs_classifier_se"
    its standard error over seeds (or, with one seed, over test examples)."""
    for n in labels:
        both = [s for s in seeds if (run_dir(out, "classifier", n, s) / "summary.json").is_file()]
        baseline = {s: correct(run_dir(out, "classifier", n, s)) for s in both}
        for row in rows:
            cell = table.get(f"{n}/{row}")
            runs = [s for s in both if (run_dir(out, row, n, s) / "summary.json").is_file()]
            if row == "classifier" or cell is None or not runs:
                continue
            diffs = [correct(run_dir(out, row, n, s)) - baseline[s] for s in runs]
            means = [float(d.mean()) for d in diffs]
            cell["vs_classifier"] = statistics.fmean(means)
            cell["vs_classifier_se"] = (statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1
                                        else float(diffs[0].std() / len(diffs[0]) ** 0.5))


def markdown(table: dict, labels: list[int], rows: list[str]) -> str:
    """Rows: the ways of handling y; columns: accuracy (and ELBO) per number of labels."""
    head = "| | " + " | ".join(f"N = {n}: accuracy | test ELBO" for n in labels) + " |"
    lines = [head, "|---|" + "---|---|" * len(labels)]
    for row in rows:
        cells = []
        for n in labels:
            cell = table.get(f"{n}/{row}")
            if cell is None:
                cells += ["", ""]
                continue
            se = f" ± {cell['accuracy_se']:.3f}" if cell["accuracy_se"] is not None else ""
            paired = (f"; {cell['vs_classifier']:+.3f} ± {cell['vs_classifier_se']:.3f} vs classifier"
                      if "vs_classifier" in cell else "")
            best = f", best {cell['best_epochs']}" if cell.get("best_epochs") is not None else ""
            seeds = f"{cell['seeds']} seed" + ("" if cell["seeds"] == 1 else "s")
            budget = f"{seeds}, {cell['epochs']} ep{best}"
            cells.append(f"{cell['accuracy']:.3f}{se} ({budget}{paired})")
            cells.append("" if cell["test_elbo"] is None else f"{cell['test_elbo']:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="quick",
                        help="quick (default: today's short table) | fair (labelled examples in every batch, "
                        "early stopping on validation accuracy, Kingma's alpha); the flags below override it")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, help="default: runs/m2-fashion-mnist(-fair)")
    parser.add_argument("--labels", type=int, nargs="+", help="quick: 100 1000 3000; fair: 100 1000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--epochs", type=int, help="epochs of each M2 run (quick: 5; fair: at most 100)")
    parser.add_argument("--classifier-epochs", type=int,
                        help="epochs of the classifier over its N labelled examples (quick: 200; fair: at "
                        "most 2000)")
    parser.add_argument("--aux-loss", type=float, help="alpha of the enum + aux row (quick: 50; fair: 0.1)")
    parser.add_argument("--aux-loss-scale", choices=("fixed", "data"),
                        help="quick: fixed; fair: data (alpha * N / N_labelled, Kingma's)")
    parser.add_argument("--labelled-per-batch", type=int,
                        help="labelled examples in every M2 batch (quick: none; fair: 10)")
    parser.add_argument("--validation-size", type=int,
                        help="labelled training images held out for early stopping (quick: none; "
                        "fair: 10000)")
    parser.add_argument("--patience", type=int, help="M2's early stopping on validation accuracy, in "
                        "epochs (quick: off; fair: 20)")
    parser.add_argument("--classifier-patience", type=int, help="the classifier's (quick: off; fair: 100)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[500])
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-k", type=int, default=100, help="importance samples per example for the "
                        "final log p(x)")
    add_renamed_flag(parser, "--k", "--eval-k", type=int)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    args = parser.parse_args(argv)
    for name, value in PROTOCOLS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows = [r for r in ROWS if r in args.rows]
    jobs = [(row, n, s) for s in args.seeds for n in args.labels for row in rows]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: train_one(args, *job), jobs))
    table = summarize(args.out, rows, args.labels, args.seeds)
    paired_with_classifier(args.out, table, rows, args.labels, args.seeds)
    text = markdown(table, args.labels, rows)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    print(text)
    return table


if __name__ == "__main__":
    main()
