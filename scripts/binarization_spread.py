"""How much a test bound moves with the draw of the test set's binarization: the trained model of RUN
scored (test ELBO, `--samples` draws of z per image) on `--draws` other Bernoulli draws of the same
test images; prints each draw's mean, their s.d., and the run's own fixed draw's (eval.json, else
summary.json). A published number measured on another draw differs from ours by about that s.d.

    OMP_NUM_THREADS=1 python scripts/binarization_spread.py runs/fm-vae --draws 6
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from pyro_vae.data import binarize, load_dataset
from pyro_vae.evaluation.evaluate import elbo_terms
from pyro_vae.training.run_dir import EVAL, SUMMARY, load_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--samples", type=int, default=10, help="draws of z per image for the ELBO")
    args = parser.parse_args(argv)
    config, vae = load_model(args.run, torch.device("cpu"))
    raw = load_dataset(config.dataset, config.data_dir, None, config.test_size, config.image_size,
                       config.channels).test_x
    torch.manual_seed(0)
    means = []
    with torch.no_grad():
        for draw in range(args.draws):
            x = binarize(raw, torch.Generator().manual_seed(1000 + draw))
            means.append(float(elbo_terms(vae.model, vae.guide, x, samples=args.samples)["elbo"].mean()))
            print(f"draw {draw}: test ELBO {means[-1]:.3f}", flush=True)
    scored = [args.run / name for name in (EVAL, SUMMARY) if (args.run / name).is_file()]
    own = json.loads(scored[0].read_text()).get("test_elbo") if scored else None
    result = {"means": means, "mean": statistics.mean(means), "sd": statistics.stdev(means), "own": own}
    print(f"over {args.draws} draws: mean {result['mean']:.3f}, s.d. {result['sd']:.3f}"
          + (f"; the run's own draw {own:.3f}" if own is not None else ""))
    return result


if __name__ == "__main__":
    main()
