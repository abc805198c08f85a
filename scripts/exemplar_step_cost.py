"""What a training step with the exemplar prior costs against one with the VampPrior, measured in the
same run: the protocol's network (gated MLP 784-300-300-40), Bernoulli likelihood, batch 100, mc, fused
Adam (the step `pyro-vae train` runs, step.SVIStep), batches drawn by index from the statically binarized
training images; the exemplars are the first --train-size grey training images (50,000, as after the
protocol's validation split). Rows: the VampPrior with K pseudo-inputs, and the exemplar prior with each
subset size M of --subsets (M exemplars encoded with gradient per step; each step leaves out its batch's
own rows, as training does), and with --k K also each M with retrieval (--exemplar-k K: only the batch's
K nearest of the M are encoded). Repeats are interleaved, and each exemplar row's ratio is the median
over repeats of its time over the VampPrior's in the same repeat (bench.py's paired ratio), in wall time
and in this process's CPU time (less disturbed by other processes on a loaded machine). With
--eval-images n, also the test-time cost: encoding all N exemplars once (per parameter state) and one
ELBO pass over n test images with the exact mixture over all N, against the VampPrior's pass.

    OMP_NUM_THREADS=1 python scripts/exemplar_step_cost.py --k 10 --steps 10 --repeats 5 --eval-images 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _paired_ratio, batches, device_name, time_steps  # noqa: E402

from pyro_vae.data import binarize, load_dataset  # noqa: E402
from pyro_vae.errors import InputError  # noqa: E402
from pyro_vae.evaluation.evaluate import elbo_terms  # noqa: E402
from pyro_vae.inference.estimators import make_estimator  # noqa: E402
from pyro_vae.inference.step import SVIStep  # noqa: E402
from pyro_vae.models.exemplar import leave_out, use_training_set  # noqa: E402
from pyro_vae.models.vae import VAE, build_vae  # noqa: E402
from pyro_vae.param_store import param_sites  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-size", type=int, default=50_000, help="exemplars N (default 50,000)")
    parser.add_argument("--subsets", type=int, nargs="+", default=[25_000],
                        help="exemplar subset sizes M per step (default 25,000: the preset's)")
    parser.add_argument("--k", type=int, default=None,
                        help="also time retrieval (--exemplar-k K) with each subset size (default: no)")
    parser.add_argument("--components", type=int, default=500, help="VampPrior K (default 500)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[300, 300])
    parser.add_argument("--z-dim", type=int, default=40)
    parser.add_argument("--encoder", default="gated-mlp")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="steps in one timed repeat (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (default 2)")
    parser.add_argument("--eval-images", type=int, default=0,
                        help="also time one test ELBO pass over this many test images (default 0: no)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


class Remembered:
    """An iterator of batch indices that remembers the last one it gave (the rows the exemplar prior
    leaves out in the step that uses it)."""

    def __init__(self, indices):
        self.indices, self.last = indices, None

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        self.last = next(self.indices)
        return self.last


def build(x_shape, args: argparse.Namespace, prior: str, train_x: Tensor, subset: int | None = None,
          k: int | None = None) -> VAE:
    options = ({"prior_components": args.components} if prior == "vamp"
               else {"exemplar_subset": subset, "exemplar_k": k})
    vae = build_vae(x_shape, encoder=args.encoder, hidden=args.hidden, z_dim=args.z_dim, prior=prior,
                    **options)
    use_training_set(vae, train_x)  # nothing for the VampPrior
    return vae


def make_step(vae: VAE, rows: Remembered):
    """The training step on batch x; the exemplar prior leaves out the batch's rows (`rows.last`)."""
    elbo = make_estimator("mc")
    optimizer = torch.optim.Adam(vae.parameters(), lr=5e-4, fused=True)

    def loss_fn(x: Tensor, weight: float, per: float) -> Tensor:
        return elbo.differentiable_loss(vae.model, vae.guide, x) / per

    params = [p for p in vae.parameters() if p.requires_grad]
    step = SVIStep(loss_fn, optimizer, params, None, params[0].device)

    def run(x: Tensor) -> Tensor:
        with leave_out(vae, rows.last):
            return step(x, 1.0, x.shape[0])
    return run


def time_eval(vae: VAE, x: Tensor) -> dict:
    """CPU seconds of this process to encode every exemplar (the exemplar prior, eval mode; 0 for the
    VampPrior) and for one ELBO pass over x (evaluate.elbo_terms: one z per image, the exact mixture),
    after an untimed pass
    over two images (made before the parameters move by 1e-6, so the exemplars are encoded again)."""
    vae.eval()
    with param_sites(False):  # the models' tensors stay out of Pyro's param store, as in training steps
        elbo_terms(vae.model, vae.guide, x[:2])
        with torch.no_grad():
            for p in vae.encoder.parameters():
                p.add_(1e-6)  # in place, as an optimizer step: the cached means are stale
        start = time.process_time()
        if hasattr(vae.prior, "all_means"):
            vae.prior.all_means()
        encode = time.process_time() - start
        start = time.process_time()
        elbo_terms(vae.model, vae.guide, x)
    return {"encode_exemplars_cpu_s": encode, "elbo_pass_cpu_s": time.process_time() - start,
            "images": x.shape[0]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.dataset, args.data_dir)
    except InputError as err:
        raise SystemExit(f"exemplar_step_cost.py: {err}") from None
    train_x = data.train_x[:args.train_size]
    x_bin = binarize(train_x, torch.Generator().manual_seed(0))
    x_shape = tuple(train_x.shape[1:])
    pyro.set_rng_seed(0)
    rows = Remembered(batches(train_x.shape[0], args.batch_size, torch.device("cpu")))
    vamp = f"VampPrior K={args.components}"
    models = {vamp: build(x_shape, args, "vamp", train_x)}
    for m in args.subsets:
        models[f"exemplar M={m}"] = build(x_shape, args, "exemplar", train_x, m)
    for m in args.subsets if args.k else ():
        models[f"exemplar M={m}, k={args.k}"] = build(x_shape, args, "exemplar", train_x, m, args.k)
    steps = {name: make_step(vae, rows) for name, vae in models.items()}
    for step in steps.values():
        time_steps(step, x_bin, rows, args.warmup, torch.device("cpu"))
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a different row first each time
            wall, cpu_s = time_steps(steps[name], x_bin, rows, args.steps, torch.device("cpu"))
            times[name].append(wall)
            cpu[name].append(cpu_s)
    results = {name: {"s_per_step": statistics.median(t), "s_per_step_all": t,
                      "ratio_to_vampprior": _paired_ratio(t, times[vamp]),
                      "cpu_s_per_step": statistics.median(cpu[name]), "cpu_s_per_step_all": cpu[name],
                      "cpu_ratio_to_vampprior": _paired_ratio(cpu[name], cpu[vamp])}
               for name, t in times.items()}
    meta = {"command": " ".join(["python", "scripts/exemplar_step_cost.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "device_name": device_name(torch.device("cpu")), "dataset": args.dataset,
            "exemplars": train_x.shape[0], "batch_size": args.batch_size, "steps": args.steps,
            "repeats": args.repeats, "torch": torch.__version__, "pyro": pyro.__version__}
    print(f"{meta['device_name']}; {args.dataset}, N = {train_x.shape[0]} exemplars, {args.encoder} "
          f"{args.hidden} z {args.z_dim}, batch {args.batch_size}, mc; median of {args.repeats} repeats x "
          f"{args.steps} steps\n\n| prior | s/step | step / VampPrior step | CPU s/step | CPU time / "
          f"VampPrior's |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_step']:.4f} | {r['ratio_to_vampprior']:.1f}x | "
              f"{r['cpu_s_per_step']:.4f} | {r['cpu_ratio_to_vampprior']:.1f}x |")
    out = {"meta": meta, "results": results}
    if args.eval_images:
        x_test = binarize(data.test_x[:args.eval_images], torch.Generator().manual_seed(1))
        out["eval"] = {name: time_eval(vae, x_test) for name, vae in models.items()}
        print(f"\ntest time (CPU seconds), one ELBO pass over {x_test.shape[0]} test images (exact mixture "
              "over all N):")
        for name, e in out["eval"].items():
            print(f"  {name}: encode exemplars {e['encode_exemplars_cpu_s']:.2f} s, "
                  f"ELBO pass {e['elbo_pass_cpu_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
