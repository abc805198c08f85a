"""How much of the epoch-to-epoch movement of the early-stopping criterion is the draw of z: the trained
model of RUN (best.pt) scored on its own validation set, as training scores it (the mean ELBO per example,
one draw of z per example), `--repeats` times with fresh draws; against the epochs' changes in
metrics.jsonl's validation_elbo past the KL warm-up.

If the criterion moved only because of the draw, its epoch-to-epoch change would have s.d. sqrt(2) s_draw
(two independent draws); what is left, var(change) - 2 s_draw^2, is the movement of the parameters
themselves, which averaging the criterion over more draws cannot remove.

    OMP_NUM_THREADS=1 python scripts/validation_noise.py runs/estimators-budget-60min/mc-s1 --repeats 20
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from pyro_vae.inference.program import Program
from pyro_vae.models.kind import model_kind
from pyro_vae.training.run_dir import load_model, read_metrics
from pyro_vae.training.train_data import prepare_data


def epoch_changes(run: Path, first_epoch: int) -> list[float]:
    """validation_elbo(e) - validation_elbo(e - 1) for the epochs e > first_epoch in metrics.jsonl."""
    values = {r["epoch"]: r["validation_elbo"] for r in read_metrics(run / "metrics.jsonl")
              if r.get("validation_elbo") is not None}
    return [values[e] - values[e - 1] for e in sorted(values) if e > first_epoch and e - 1 in values]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=20,
                        help="fresh draws of z for the whole validation set")
    parser.add_argument("--from-epoch", type=int, default=None,
                        help="epoch changes counted after this epoch (default: the KL warm-up's end)")
    args = parser.parse_args(argv)
    config, vae = load_model(args.run, torch.device("cpu"))
    kind, data = model_kind(config.model), prepare_data(config)
    if data.val_x is None:
        raise SystemExit(f"{args.run} has no validation set (--validation-size)")
    program = Program.of(vae)
    torch.manual_seed(0)
    with torch.no_grad():  # the kind's criterion, as training computes it each epoch
        draws = [float(kind.validation_elbo(program, data)) for _ in range(args.repeats)]
    s_draw = statistics.stdev(draws)
    first = args.from_epoch if args.from_epoch is not None else config.kl_anneal
    changes = epoch_changes(args.run, first)
    s_change = statistics.stdev(changes)
    parameters = max(s_change ** 2 - 2 * s_draw ** 2, 0.0)
    result = {"run": str(args.run), "repeats": args.repeats, "validation_elbo_mean": statistics.mean(draws),
              "sd_draw": s_draw, "epochs": len(changes), "from_epoch": first, "sd_epoch_change": s_change,
              "draw_share_of_variance": 2 * s_draw ** 2 / s_change ** 2,
              "sd_parameters": math.sqrt(parameters)}
    print(f"{args.run}: validation ELBO over {args.repeats} draws of z {result['validation_elbo_mean']:.3f}, "
          f"s.d. {s_draw:.4f} nats; epoch-to-epoch change past epoch {first} ({len(changes)} epochs) "
          f"s.d. {s_change:.4f}; the draw's share of its variance (2 s_draw^2 / var) "
          f"{result['draw_share_of_variance']:.2f}; what is left, the parameters' movement, "
          f"s.d. {result['sd_parameters']:.4f}")
    return result


if __name__ == "__main__":
    main()
