"""The priors table of docs/results.md: the four priors with the same network (784-300-300-40 MLP),
Bernoulli likelihood, dynamic binarization and the same number of epochs on Fashion-MNIST; test
log p(x) by IWAE with k=1000. Prints a Markdown table and writes it, with every run's summary, to OUT.

    python scripts/priors_fashion_mnist.py --epochs 5 --test-size 2000 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyro_vae import Config, train

PRIORS = ("normal", "learned", "mog", "vamp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=1000, help="importance samples for log p(x)")
    parser.add_argument("--test-size", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior-init", default="data", help="VampPrior pseudo-inputs: data | noise")
    parser.add_argument("--out", default="runs/priors-fashion-mnist")
    args = parser.parse_args()

    out = Path(args.out)
    rows = []
    for prior in PRIORS:
        config = Config(dataset="fashion-mnist", hidden=[300, 300], z_dim=40, prior=prior,
                        likelihood="bernoulli", binarize="dynamic", epochs=args.epochs,
                        test_size=args.test_size, eval_k=args.k, device=args.device,
                        prior_init=args.prior_init if prior == "vamp" else "noise")
        started = time.perf_counter()
        s = train(config, out=out / prior, progress=False, overwrite=True).summary
        s["wall_seconds"] = time.perf_counter() - started
        components = {"mog": " (K=10)", "vamp": f" (K=500, init {args.prior_init})"}.get(prior, "")
        rows.append(f"| {prior}{components} | {s['log_px']:.2f} ± {s['log_px_se']:.2f} | "
                    f"{s['test_elbo']:.2f} | {s['kl']:.2f} | {s['active_units']} | "
                    f"{s['train_seconds']:.0f} |")
        print(rows[-1], flush=True)
    device = s["device"]
    table = "\n".join([
        f"{args.epochs} epochs, device {device}, {s['n_examples']} test images, k={args.k}.",
        "",
        "| prior | test log p(x) (nats, ± s.e.) | test ELBO (nats) | KL (nats) | active units of 40 "
        "| train + eval time (s) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args)}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
