"""The same trained models scored on two binarizations of the same test images: how much a published
number measured on another draw of the test set (the authors' NumPy seed 777, `--heldout authors`) is
the draw, not the model. Each pair A:B is one model's two evaluations (eval.json and eval_examples.pt),
A on our test draw and B on the other: the same best.pt (eval.json's model_checkpoint; config.json the
same but for "heldout"), the same images in the same order, other fingerprints. Prints per pair log
p(x) on each draw and the per-image difference B - A +- its paired s.e.; over the pairs, each draw's
mean +- s.e. over the models, and the shift: per image the mean over models of B - A, mean +- s.e. over
images (the models share the draws, so their shifts are not independent; the images are).

    pyro-vae evaluate RUN --heldout authors --out COPY   # B: a copy of A's model, scored on the other draw
    R=docs/runs/fashion-mnist-vae
    python scripts/draw_shift.py $R-s3:$R-s3-on-authors-test $R-s4:$R-s4-on-authors-test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_vae.errors import InputError
from pyro_vae.evaluation.report import paired_difference, read_run
from pyro_vae.stats import mean_se
from pyro_vae.training.run_dir import CONFIG, read_json


def pair_shift(a: Path, b: Path) -> dict:
    """One model on two draws: each draw's log p(x), and B - A per image (mean, paired s.e.)."""
    run_a, run_b = read_run(a), read_run(b)  # the report's checks: evaluated, per-image values, current model
    (ea, xa), (eb, xb) = ((run.evaluation, run.values["log_px"].double()) for run in (run_a, run_b))
    if ea.get("n_examples") != eb.get("n_examples") or xa.shape != xb.shape:
        raise InputError(f"{a} and {b} scored other numbers of test images "
                         f"({ea.get('n_examples')} vs {eb.get('n_examples')}): evaluate both on all of them")
    if ea.get("model_checkpoint") != eb.get("model_checkpoint"):
        raise InputError(f"{a} and {b} scored other models ({ea.get('model_checkpoint')} vs "
                         f"{eb.get('model_checkpoint')}): a pair is one best.pt on two test draws")
    if ea.get("test_fingerprint") == eb.get("test_fingerprint"):
        raise InputError(f"{a} and {b} scored the same test draw (fingerprint {ea.get('test_fingerprint')})")
    ca, cb = read_json(a / CONFIG), read_json(b / CONFIG)
    differ = sorted(k for k in ca.keys() | cb.keys() if k != "heldout" and ca.get(k) != cb.get(k))
    if differ:
        raise InputError(f"{a} and {b} were trained with other settings ({', '.join(differ)}): a pair is "
                         "one run's model on two test draws")
    shift, se = paired_difference(xa, xb)
    return {"a": str(a), "b": str(b), "log_px_a": float(xa.mean()), "log_px_b": float(xb.mean()),
            "shift": shift, "shift_se": se, "k": [ea.get("k"), eb.get("k")], "per_image": xb - xa}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="A:B", help="one model's records on our draw : another")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    pairs = []
    for spec in args.pairs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"draw_shift: {spec!r} is not A:B (two run directories)")
        try:
            pairs.append(pair_shift(Path(a), Path(b)))
        except InputError as err:
            raise SystemExit(f"draw_shift: {err}") from None
    print("| model (A) | log p(x), draw A | log p(x), draw B | B - A, paired over images |")
    print("|---|---|---|---|")
    for p in pairs:
        print(f"| {p['a']} | {p['log_px_a']:.2f} | {p['log_px_b']:.2f} "
              f"| {p['shift']:+.3f} +- {p['shift_se']:.3f} |")
    per_image = torch.stack([p.pop("per_image") for p in pairs]).mean(0)
    result = {"pairs": pairs}
    for key in ("log_px_a", "log_px_b"):
        result[key], result[key + "_se"] = mean_se([p[key] for p in pairs])
    result["shift"], result["shift_se_images"] = mean_se(per_image)
    several = len(pairs) > 1
    levels = ", ".join(f"draw {d} {result[f'log_px_{d.lower()}']:.2f}"
                       + (f" +- {result[f'log_px_{d.lower()}_se']:.2f}" if several else "") for d in "AB")
    print(f"\nover {len(pairs)} model{'s' * several}: {levels} "
          + ("(+- over models)" if several else "(one model: no spread over models)")
          + f"; B - A {result['shift']:+.3f} +- {result['shift_se_images']:.3f} (the models' mean per image, "
          "+- over images)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
