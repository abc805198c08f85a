"""Time pyro-vae's training step against the same VAE written by hand in PyTorch (reference_vae.py),
in one process, side by side: median ms per step over interleaved repeats (warm-up excluded), steps/s,
the ratio to the reference, the time of one epoch, peak memory; optionally IWAE evaluation time.

    python scripts/bench.py --device cpu --batch-size 128 --estimator mc analytic --json bench-cpu.json
    python scripts/bench.py --device cuda --eval-k 5000 --json bench-cuda.json
    OMP_NUM_THREADS=1 python scripts/bench.py --hidden 300 300 --z-dim 40 --batch-size 100 \
        --estimator mc --prior normal vamp      # the VampPrior step against the normal prior's

Rows: `reference` (plain PyTorch, torch.optim.Adam with its defaults: the baseline of every ratio),
`reference, fused Adam` (the same with Adam(fused=True), as pyro-vae uses), `reference, compiled`
(torch.compile; on CUDA, or on CPU with --compile), `pyro-vae` (step.SVIStep, the step `pyro-vae
train` runs), on CUDA `pyro-vae, CUDA graph` (step.CUDAGraphStep, `--cuda-graph on`), with
`--prior ... vamp` the row `pyro-vae, VampPrior K=500` (the same step with the VampPrior of
--prior-components pseudo-inputs; its time over the `pyro-vae` row's, paired by repeat, is printed as
the VampPrior/normal ratio) and, with
--pyro-example, Pyro's own VAE example as its authors train it (pyro_example_vae.py: SVI with
Trace_ELBO or JitTrace_ELBO and pyro.optim.Adam; mc only; its own 784-400-50 softplus network, so
give --hidden 400 --z-dim 50 --batch-size 256 for the example's setting). Each row
draws batches by index from data on the device, as training does. The ratio is the row's time per
step over the reference's: below 1 is faster. Timings on a shared machine are noisy; the repeats of
all rows are interleaved so that they share the noise: a row's ratio is the median, over repeats, of
its time over the reference's time in the same repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pyro_example_vae import ExampleVAE, make_example_step  # noqa: E402
from reference_vae import ReferenceVAE, make_reference_step  # noqa: E402

from pyro_vae.data import batch_indices, binarize, load_dataset  # noqa: E402
from pyro_vae.errors import InputError  # noqa: E402
from pyro_vae.evaluation.evaluate import iwae_log_px  # noqa: E402
from pyro_vae.inference.estimators import make_estimator  # noqa: E402
from pyro_vae.inference.step import CUDAGraphStep, SVIStep  # noqa: E402
from pyro_vae.models.vae import build_vae  # noqa: E402
from pyro_vae.renames import add_renamed_flag  # noqa: E402

Step = Callable[[Tensor], Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--estimator", nargs="+", default=["mc", "analytic"], choices=["mc", "analytic"])
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default; digits where it is missing) or digits")
    parser.add_argument("--data-dir", default="data", help="where load_dataset looks for the data")
    parser.add_argument("--hidden", type=int, nargs="+", default=[400])
    parser.add_argument("--z-dim", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="steps in one timed repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per row (default 15)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row first (default 10)")
    parser.add_argument("--epoch", action="store_true", help="also time one full epoch per row")
    parser.add_argument("--compile", action="store_true", help="add the compiled reference on CPU too")
    parser.add_argument("--eval-k", type=int, default=0, help="also time IWAE evaluation with K importance "
                        "samples per example")
    add_renamed_flag(parser, "--iwae-k", "--eval-k", type=int)
    parser.add_argument("--iwae-n", type=int, default=None,
                        help="test images for the IWAE timing (default: all on CUDA, 20 on CPU)")
    parser.add_argument("--pyro-example", action="store_true",
                        help="add Pyro's VAE example (SVI, Trace_ELBO and JitTrace_ELBO) as rows (mc)")
    parser.add_argument("--prior", nargs="+", default=["normal"], choices=["normal", "vamp"],
                        help="priors of the pyro-vae rows: normal (default), vamp (adds a VampPrior row)")
    parser.add_argument("--prior-components", type=int, default=500, help="VampPrior K (default 500)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def load(name: str, device: torch.device, data_dir: str = "data") -> tuple[str, Tensor, Tensor]:
    """The dataset's training and test images, binarized once, on the device."""
    try:
        data = load_dataset(name, data_dir)
    except InputError:
        if name != "fashion-mnist":
            raise
        name, data = "digits", load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    return name, binarize(data.train_x, gen).to(device), binarize(data.test_x, gen).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pyro_vae_step(x_shape, args: argparse.Namespace, estimator: str, device: torch.device,
                  graph: bool = False, prior: str = "normal") -> Step:
    """The step `pyro-vae train` runs (beta 1, one process): SVIStep over fused Adam, optionally
    captured as a CUDA graph, with the prior `prior`."""
    options = {"prior_components": args.prior_components} if prior == "vamp" else {}
    vae = build_vae(x_shape, hidden=args.hidden, z_dim=args.z_dim, prior=prior, **options).to(device)
    elbo = make_estimator(estimator)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True, capturable=graph)

    def loss_fn(x: Tensor, weight: float, per: float) -> Tensor:
        return elbo.differentiable_loss(vae.model, vae.guide, x) / per

    step = SVIStep(loss_fn, optimizer, [p for p in vae.parameters() if p.requires_grad], None, device)
    step = CUDAGraphStep(step) if graph else step
    return lambda x: step(x, 1.0, x.shape[0])


def vamp_row(args: argparse.Namespace) -> str:
    return f"pyro-vae, VampPrior K={args.prior_components}"


def rows(x_shape, args: argparse.Namespace, estimator: str, device: torch.device) -> dict[str, Step]:
    """Every implementation to time, by row name."""
    def reference(**options) -> Step:
        vae = ReferenceVAE(x_shape, args.hidden, args.z_dim).to(device)
        return make_reference_step(vae, estimator, **options)

    out = {"reference": reference(), "reference, fused Adam": reference(fused=True)}
    if device.type == "cuda" or args.compile:
        out["reference, compiled"] = reference(compile=True)
    if "normal" in args.prior:
        out["pyro-vae"] = pyro_vae_step(x_shape, args, estimator, device)
    if "vamp" in args.prior:
        out[vamp_row(args)] = pyro_vae_step(x_shape, args, estimator, device, prior="vamp")
    if device.type == "cuda":
        out["pyro-vae, CUDA graph"] = pyro_vae_step(x_shape, args, estimator, device, graph=True)
    if args.pyro_example and estimator == "mc":
        for jit, name in ((False, "Pyro example, Trace_ELBO"), (True, "Pyro example, JitTrace_ELBO")):
            vae = ExampleVAE(x_shape, args.hidden[0], args.z_dim, name=f"{name}/").to(device)
            out[name] = make_example_step(vae, jit=jit)
    return out


def batches(n: int, batch_size: int, device: torch.device, seed: int = 0):
    """Endless full batches of indices, a fresh permutation each pass (the last, short batch dropped)."""
    gen = torch.Generator(device).manual_seed(seed)
    while True:
        for idx in batch_indices(n, batch_size, gen, device):
            if len(idx) == batch_size:
                yield idx


def time_steps(step: Step, x_all: Tensor, idx_iter, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step over `steps` steps, from the first launch to the end of the last: wall-clock
    time, and this process's CPU time (all its threads; less disturbed by other processes)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(x_all[next(idx_iter)])
    synchronize(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def time_epoch(step: Step, x_all: Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for one pass over x_all in batches of batch_size (the last one shorter)."""
    gen = torch.Generator(device).manual_seed(1)
    synchronize(device)
    start = time.perf_counter()
    for idx in batch_indices(x_all.shape[0], batch_size, gen, device):
        step(x_all[idx])
    synchronize(device)
    return time.perf_counter() - start


def bench_estimator(estimator: str, x_all: Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """Interleaved timings of every row for one estimator."""
    pyro.set_rng_seed(0)
    steps = rows(tuple(x_all.shape[1:]), args, estimator, device)
    idx_iter = batches(x_all.shape[0], args.batch_size, device)
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    peak = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        time_steps(step, x_all, idx_iter, args.warmup, device)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    names = list(steps)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a different row first each time
            wall, cpu = time_steps(steps[name], x_all, idx_iter, args.steps, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    epochs = {name: time_epoch(step, x_all, args.batch_size, device) for name, step in steps.items()} \
        if args.epoch else {}
    n_batches = math.ceil(x_all.shape[0] / args.batch_size)
    result = {}
    for name in names:
        ms = 1e3 * statistics.median(times[name])
        result[name] = {
            "ms_per_step": ms,
            "steps_per_s": 1e3 / ms,
            "ratio_to_reference": _paired_ratio(times[name], times["reference"]),
            "cpu_ms_per_step": 1e3 * statistics.median(cpu_times[name]),
            "cpu_ratio_to_reference": _paired_ratio(cpu_times[name], cpu_times["reference"]),
            "epoch_s_from_median": ms * n_batches / 1e3,
            "epoch_s_measured": epochs.get(name),
            "peak_mb": peak.get(name),
            "ms_per_step_all": [1e3 * t for t in times[name]],
        }
    return result


def _paired_ratio(times: list[float], reference: list[float]) -> float:
    """median over repeats r of times[r] / reference[r]: each repeat's rows ran back to back, so they
    share the machine's load of the moment, and the ratio cancels it."""
    return statistics.median(t / ref for t, ref in zip(times, reference, strict=True))


def bench_iwae(x_test: Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds for pyro-vae's IWAE log p(x) with k samples on n test images (evaluate.iwae_log_px)."""
    n = args.iwae_n or (x_test.shape[0] if device.type == "cuda" else 20)
    x = x_test[:n]
    pyro.set_rng_seed(0)
    vae = build_vae(tuple(x.shape[1:]), hidden=args.hidden, z_dim=args.z_dim).to(device).eval()
    iwae_log_px(vae.model, vae.guide, x[:2], min(args.eval_k, 100))  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    iwae_log_px(vae.model, vae.guide, x, args.eval_k)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"k": args.eval_k, "images": n, "seconds": seconds,
            "seconds_for_10000_images": seconds * 10000 / n,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def speedups(rows: dict) -> list[str]:
    """How many times the throughput of Pyro's example (each of its rows) each pyro-vae row has: the
    median over repeats of the example's time per step over the pyro-vae row's, in the same repeat."""
    ours = [name for name in rows if name.startswith("pyro-vae")]
    examples = [name for name in rows if name.startswith("Pyro example")]
    return [f"{name}: {_paired_ratio(rows[ex]['ms_per_step_all'], rows[name]['ms_per_step_all']):.2f}x "
            f"the throughput of {ex}" for name in ours for ex in examples]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, " \
           f"{os.cpu_count()} cores visible"


def table(results: dict, meta: dict) -> str:
    """The results as a markdown table."""
    lines = [f"{meta['device_name']}; {meta['dataset']} {meta['x_shape']}, MLP {meta['architecture']}, "
             f"Bernoulli, batch {meta['batch_size']}; median of {meta['repeats']} repeats x "
             f"{meta['steps']} steps; torch {meta['torch']}, Pyro {meta['pyro']}", "",
             "| estimator | implementation | ms/step | steps/s | time vs reference | CPU time vs reference "
             "| epoch (s) | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for estimator, by_row in results.items():
        for name, r in by_row.items():
            epoch = r["epoch_s_measured"] if r["epoch_s_measured"] is not None else r["epoch_s_from_median"]
            mark = "" if r["epoch_s_measured"] is not None else " (est.)"
            peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
            lines.append(f"| {estimator} | {name} | {r['ms_per_step']:.2f} | {r['steps_per_s']:.0f} | "
                         f"{r['ratio_to_reference']:.3f}x | {r['cpu_ratio_to_reference']:.3f}x | "
                         f"{epoch:.1f}{mark} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda was asked for but no CUDA GPU is available")
    device = torch.device(args.device)
    dataset, x_train, x_test = load(args.dataset, device, args.data_dir)
    meta = {
        "command": " ".join(["python", "scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device, "device_name": device_name(device), "dataset": dataset,
        "x_shape": list(x_train.shape[1:]), "architecture": "-".join(map(str, [
            math.prod(x_train.shape[1:]), *args.hidden, args.z_dim])),
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "torch": torch.__version__, "pyro": pyro.__version__,
    }
    results = {est: bench_estimator(est, x_train, args, device) for est in args.estimator}
    print(table(results, meta))
    for estimator, by_row in results.items():
        if {"pyro-vae", vamp_row(args)} <= set(by_row):
            ratio = _paired_ratio(by_row[vamp_row(args)]["ms_per_step_all"],
                                  by_row["pyro-vae"]["ms_per_step_all"])
            meta.setdefault("vamp_ratio", {})[estimator] = ratio
            print(f"\n{estimator}: VampPrior (K={args.prior_components}) step / normal-prior step = "
                  f"{ratio:.2f}x (median over repeats of the paired ratio)")
    if "mc" in results and "Pyro example, Trace_ELBO" in results["mc"]:
        print()
        for line in speedups(results["mc"]):
            print(line)
    out = {"meta": meta, "results": results}
    if args.eval_k:
        out["iwae"] = iwae = bench_iwae(x_test, args, device)
        print(f"\nIWAE log p(x), k={iwae['k']}: {iwae['seconds']:.2f} s for {iwae['images']} test images "
              f"({iwae['seconds_for_10000_images']:.1f} s for 10,000)"
              + (f", peak {iwae['peak_mb']:.0f} MB" if iwae["peak_mb"] is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
