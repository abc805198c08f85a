"""The priors table of docs/results.md: the four priors with the same network (784-300-300-40 MLP),
Bernoulli likelihood, dynamic binarization and the same number of epochs on Fashion-MNIST; test
log p(x) by IWAE with k=1000. Prints a Markdown table and writes it, with every run's summary, to OUT.

    python scripts/priors_fashion_mnist.py --epochs 5 --test-size 2000 --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_vae import Config, train
from pyro_vae.models.priors import DEFAULT_COMPONENTS
from pyro_vae.renames import add_renamed_flag

PRIORS = ("normal", "learned", "mog", "vamp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--eval-k", type=int, default=1000, help="importance samples per example for "
                        "log p(x)")
    add_renamed_flag(parser, "--k", "--eval-k", type=int)
    parser.add_argument("--test-size", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior-init", default="data", help="VampPrior pseudo-inputs: data | noise")
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS,
                        help="train these (default all); the table shows every prior run in OUT")
    parser.add_argument("--out", default="runs/priors-fashion-mnist")
    args = parser.parse_args()

    out = Path(args.out)
    for prior in args.priors:
        config = Config(dataset="fashion-mnist", hidden=[300, 300], z_dim=40, prior=prior,
                        likelihood="bernoulli", binarize="dynamic", epochs=args.epochs,
                        test_size=args.test_size, eval_k=args.eval_k, device=args.device,
                        prior_init=args.prior_init if prior == "vamp" else "noise")
        s = train(config, out=out / prior, progress=False, overwrite=True).summary
        print(f"{prior}: log p(x) {s['log_px']:.2f} nats", flush=True)

    rows, runs = [], {}
    for prior in PRIORS:
        if not (out / prior / "summary.json").is_file():
            continue
        s = runs[prior] = json.loads((out / prior / "summary.json").read_text())
        c = json.loads((out / prior / "config.json").read_text())
        label = prior
        if prior in DEFAULT_COMPONENTS:
            k = c["prior_components"] or DEFAULT_COMPONENTS[prior]
            label += f" (K={k}, init {c['prior_init']})" if prior == "vamp" else f" (K={k})"
        rows.append(f"| {label} | "
                    f"{s['log_px']:.2f} ± {s['log_px_se']:.2f} | {s['test_elbo']:.2f} | {s['kl']:.2f} | "
                    f"{s['active_units']} | {s['train_seconds']:.0f} |")
    s = next(iter(runs.values()))
    table = "\n".join([
        f"{s['epochs']} epochs, device {s['device']}, {s['n_examples']} test images, k={s['k']}.",
        "",
        "| prior | test log p(x) (nats, ± s.e.) | test ELBO (nats) | KL (nats) | active units of 40 "
        "| train + eval time (s) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
