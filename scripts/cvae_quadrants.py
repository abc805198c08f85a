"""The quadrant-completion table (issue 26; Sohn et al. 2015, Pyro's examples/cvae): for N = 1, 2, 3
given quadrants and each seed, train the NN baseline, then the CVAE on its prediction, with Pyro's SVI,
and score on the test set: the baseline's exact log p(x_missing | x_given), the CVAE's ELBO and its
importance-sampled estimate (k draws), and the paired differences. Writes OUT/table.md,
OUT/results.json (every summary) and OUT/completions_N_seed.png; prints the table.

    python scripts/cvae_quadrants.py --dataset digits --epochs 30 --out cvae-digits
    python scripts/cvae_quadrants.py --dataset fashion-mnist --hidden 500 500 --z-dim 200 --epochs 50 \
        --eval-k 5000 --device cuda --out cvae-fm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro
import torch

from pyro_vae.data import binarize, load_dataset
from pyro_vae.device import resolve_device
from pyro_vae.evaluation.conditional import fit_svi, score_conditional
from pyro_vae.figures.conditional import plot_completions
from pyro_vae.models.cvae import build_cvae
from pyro_vae.models.nn_baseline import build_baseline
from pyro_vae.renames import add_renamed_flag
from pyro_vae.stats import mean_se


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--given", type=int, nargs="+", default=[1, 2, 3], help="quadrants given (1, 2, 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30, help="SVI epochs, for the baseline and for the CVAE")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=[64])
    p.add_argument("--z-dim", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--estimator", default="mc", help="the CVAE's: mc, analytic, iwae, stl, iwae-dreg")
    p.add_argument("--eval-k", type=int, default=1000, help="importance samples per test example")
    add_renamed_flag(p, "--k", "--eval-k", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, x_train: torch.Tensor, x_test: torch.Tensor, given: int, seed: int,
            out: Path) -> dict:
    """Baseline, then CVAE, for `given` quadrants and `seed`; the scores' summary."""
    pyro.clear_param_store()  # each pair of models on its own in Pyro's param store
    condition = f"quadrants:{given}"
    torch.manual_seed(seed)  # the initial weights
    baseline = build_baseline(x_train.shape[1:], condition, args.hidden).to(x_train.device)
    c_train, c_test = baseline.condition.condition(x_train), baseline.condition.condition(x_test)
    fit_svi(baseline, x_train, c_train, args.epochs, args.batch_size, args.lr, seed=seed)
    cvae = build_cvae(x_train.shape[1:], condition, args.hidden, args.z_dim, baseline=baseline)
    cvae = cvae.to(x_train.device)
    fit_svi(cvae, x_train, c_train, args.epochs, args.batch_size, args.lr, args.estimator, seed=seed)
    summary = score_conditional(cvae, x_test, c_test, args.eval_k, baseline=baseline, seed=seed).summary()
    plot_completions(cvae, x_test, c_test, out / f"completions_{given}_{seed}.png", baseline=baseline)
    return {"given": given, "seed": seed, **summary}


def table(results: list[dict], k: int) -> str:
    """One row per number of given quadrants: each column's mean over seeds ± the standard error over
    seeds (paired differences per example first, then over seeds); with one seed, ± the standard error
    over examples."""
    columns = [("baseline", "NN baseline"), ("elbo", "CVAE ELBO"), ("log_lik", f"CVAE IS (k={k})"),
               ("log_lik_minus_baseline", "IS − baseline"), ("log_lik_minus_elbo", "IS − ELBO")]
    lines = ["| quadrants given | seeds | " + " | ".join(f"{name} (nats)" for _, name in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for given in sorted({r["given"] for r in results}):
        rows = [r for r in results if r["given"] == given]
        cells = []
        for key, _ in columns:
            mean, se = mean_se([r[key] for r in rows])
            if len(rows) == 1:  # one seed: the standard error over examples
                se = rows[0][f"{key}_se"]
            cells.append(f"{mean:.3f} ± {se:.3f}")
        lines.append(f"| {given} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, train_size=args.train_size, test_size=args.test_size)
    g = torch.Generator().manual_seed(0)  # one fixed binarization of train and test
    x_train, x_test = binarize(data.train_x, g).to(device), binarize(data.test_x, g).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for given in args.given:
        for seed in args.seeds:
            results.append(run_one(args, x_train, x_test, given, seed, out))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = table(results, args.eval_k)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (out / "table.md").write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
