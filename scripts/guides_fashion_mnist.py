"""The guides table of docs/results.md: each posterior family q(z|x) with the same model (784-300-300-40
MLP, Bernoulli likelihood, dynamic binarization) and the same budget on Fashion-MNIST: test ELBO,
log p(x) by IWAE, the approximation and amortization gaps from `pyro-vae diagnose`, and ms per
training step (a bench row: batch 128, --estimator mc). Prints a Markdown table and writes it, with
every run and its diagnosis, to OUT.

    nice -n 19 env OMP_NUM_THREADS=1 python scripts/guides_fashion_mnist.py --epochs 3 \
        --test-size 1000 --eval-k 1000 --diagnose-examples 20 --diagnose-eval-k 1000 --svi-steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import Config, train
from pyro_vae.evaluation.evaluate import elbo_terms, iwae_log_px
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.param_store import param_sites
from pyro_vae.renames import add_renamed_flag
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train import prepare_data

GUIDES = {  # label -> the Config settings of the guide
    "diagonal": {"guide": "diagonal"},
    "lowrank R=8": {"guide": "lowrank", "guide_rank": 8},
    "fullrank": {"guide": "fullrank"},
    "iaf 2 steps": {"guide": "iaf", "flows": 2},
    "iaf 4 steps": {"guide": "iaf", "flows": 4},
}


# the family of diagnose's per-example q* that is the guide's own (an IAF has none there)
FAMILY_Q_STAR = {"diagonal": "diagonal", "fullrank": "full_rank", "lowrank": None, "iaf": None}


def run_name(label: str) -> str:
    return label.replace(" ", "-").replace("=", "")


def ms_per_step(run: Path, steps: int, repeats: int, batch_size: int = 128) -> float:
    """Median over `repeats` of the wall time of `steps` training steps (-ELBO by --estimator mc,
    backward, Adam), in ms per step, on the run's trained model and the first training images."""
    config, vae = load_model(run)
    vae.train()
    x = prepare_data(config).train_x[:batch_size].bernoulli()
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    loss_fn = make_estimator("mc")

    def step() -> None:
        with param_sites(False):
            loss = loss_fn.differentiable_loss(vae.model, vae.guide, x) / len(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def per_example(run: Path, samples: int, k: int) -> dict[str, torch.Tensor]:
    """Per test image, the ELBO (mean of `samples` draws) and IWAE log p(x) with k draws, computed
    once and kept in RUN/per_example.pt: every run scores the same images, so guides can be compared
    pairwise, image by image (the spread between images cancels)."""
    path = run / "per_example.pt"
    if path.is_file():
        return torch.load(path)
    config, vae = load_model(run)
    x = prepare_data(config).test_x
    pyro.set_rng_seed(0)
    with torch.no_grad():
        values = {"elbo": elbo_terms(vae.model, vae.guide, x, samples)["elbo"],
                  "log_px": iwae_log_px(vae.model, vae.guide, x, k)}
    torch.save(values, path)
    return values


def _paired(a: torch.Tensor, b: torch.Tensor) -> str:
    """mean(a - b) ± its standard error over the examples."""
    d = (a - b).double()
    return f"{float(d.mean()):+.2f} ± {float(d.std() / len(d) ** 0.5):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-k", type=int, default=1000, help="importance samples per example for test "
                        "log p(x)")
    add_renamed_flag(parser, "--k", "--eval-k", type=int)
    parser.add_argument("--test-size", type=int, default=1000, help="first N test images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--diagnose-examples", type=int, default=20)
    parser.add_argument("--diagnose-eval-k", type=int, default=1000)
    add_renamed_flag(parser, "--diagnose-k", "--diagnose-eval-k", type=int)
    parser.add_argument("--svi-steps", type=int, default=200)
    parser.add_argument("--bench-steps", type=int, default=10)
    parser.add_argument("--bench-repeats", type=int, default=5)
    parser.add_argument("--paired-samples", type=int, default=10, help="ELBO draws per image, paired")
    parser.add_argument("--paired-k", type=int, default=100, help="IWAE draws per image, paired")
    parser.add_argument("--guides", nargs="+", default=list(map(run_name, GUIDES)),
                        help="train these (default all); the table shows every run in OUT")
    parser.add_argument("--out", default="runs/guides-fashion-mnist")
    args = parser.parse_args()

    out = Path(args.out)
    for label, settings in GUIDES.items():
        name = run_name(label)
        if name not in args.guides:
            continue
        run = out / name
        pyro.set_rng_seed(0)
        config = Config(dataset="fashion-mnist", hidden=[300, 300], z_dim=40, likelihood="bernoulli",
                        binarize="dynamic", epochs=args.epochs, test_size=args.test_size, eval_k=args.eval_k,
                        device=args.device, **settings)
        s = train(config, out=run, progress=False, overwrite=True).summary
        subprocess.run([sys.executable, "-m", "pyro_vae", "diagnose", str(run), "--n-examples",
                        str(args.diagnose_examples), "--mcmc-examples", "0", "--eval-k",
                        str(args.diagnose_eval_k), "--svi-steps", str(args.svi_steps), "--device",
                        args.device, "--quiet"], check=True)
        bench = {"ms_per_step": ms_per_step(run, args.bench_steps, args.bench_repeats),
                 "threads": torch.get_num_threads()}
        (run / "bench.json").write_text(json.dumps(bench) + "\n")
        print(f"{label}: ELBO {s['test_elbo']:.2f}, log p(x) {s['log_px']:.2f}, "
              f"{bench['ms_per_step']:.1f} ms/step", flush=True)
    table = make_table(out, args.paired_samples, args.paired_k)
    (out / "results.md").write_text(table + "\n")
    print(table)


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['se']:.2f}"


def make_table(out: Path, samples: int, k: int) -> str:
    """The Markdown tables of every run in `out`: bounds and gaps, then the paired differences from
    the diagonal guide."""
    rows, paired, first, base, base_gap, index = [], [], None, None, None, None
    for label in GUIDES:
        run = out / run_name(label)
        if not (run / "diagnose.json").is_file():
            continue
        s = json.loads((run / "summary.json").read_text())
        d = json.loads((run / "diagnose.json").read_text())
        bench = json.loads((run / "bench.json").read_text())
        first = first or (s, d)
        gaps, bounds = d["gaps"], d["bounds"]
        total = bounds["log_px"]["mean"] - bounds["elbo_amortized"]["mean"]
        family = FAMILY_Q_STAR[label.split()[0]]
        own = (f"{_pm(gaps[family]['approximation'])} | {_pm(gaps[family]['amortization'])}" if family
               else "– | –")
        rows.append(
            f"| {label} | {s['test_elbo']:.2f} ± {s['test_elbo_se']:.2f} "
            f"| {s['log_px']:.2f} ± {s['log_px_se']:.2f} | {s['log_px'] - s['test_elbo']:.2f} | {total:.2f} "
            f"| {own} | {_pm(gaps['full_rank']['approximation'])} | {_pm(gaps['full_rank']['amortization'])} "
            f"| {bench['ms_per_step']:.1f} |")
        mine = per_example(run, samples, k)
        base = base or mine
        gap = torch.tensor(d["per_example"]["log_px"]) - torch.tensor(d["per_example"]["elbo_amortized"])
        base_gap = gap if base_gap is None else base_gap
        index = index or d["per_example"]["index"]
        assert d["per_example"]["index"] == index, "diagnose examined other images in this run"
        paired.append(f"| {label} | {_paired(mine['elbo'], base['elbo'])} | "
                      f"{_paired(mine['log_px'], base['log_px'])} | "
                      f"{_paired(gap, base_gap)} |")
    if first is None:
        return "no finished runs"
    s, d = first
    return "\n".join([
        f"{s['epochs']} epochs each ({s['steps']} steps of 128), device {s['device']}, "
        f"{s['n_examples']} test images, IWAE k={s['k']}; diagnose on {d['n_examples']} test images "
        f"(k={d['k']}, "
        f"{d['svi_steps']} SVI steps per q*).",
        "",
        "| guide | test ELBO | test log p(x) (IWAE) | log p(x) − ELBO | diagnose: log p(x) − L[q] "
        "| approx. gap, own family | amort. gap, own family | log p(x) − L[q* full-rank] "
        "| L[q* full-rank] − L[q] | ms / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Paired with the diagonal guide, image by image (± s.e. of the mean difference): test ELBO "
        f"({samples} draws per image) and IWAE log p(x) (k={k}) on the same {len(base['elbo'])} images, and "
        f"the gap log p(x) − L[q] on diagnose's {d['n_examples']} images.",
        "",
        "| guide | Δ test ELBO | Δ test log p(x) | Δ (log p(x) − L[q]) |",
        "|---|---|---|---|",
        *paired,
    ])


if __name__ == "__main__":
    main()
