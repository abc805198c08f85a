"""Latents for users: the posterior q(z|x) of every example summarized by its mean and scale (encode),
and the pictures decoded along the straight line between two examples' posterior means (interpolate);
for a trained run directory or, in Python, any model/guide pair that meets the Program contract.

    encode:       mean_n = E_q[z | x_n],  scale_n = sd_q[z | x_n]   (continuous latent sites, flattened)
    interpolate:  z_t = (1 - t) E_q[z | x_i] + t E_q[z | x_j],  picture_t = mean of p(x | z_t),  t in [0, 1]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..device import resolve_device
from ..errors import InputError
from ..figures.plots import save_tiles
from ..inference.program import Program, check_conditions
from ..models.kind import kind_of
from ..staging import write_all_or_none
from ..training.run_dir import check_data_shape, load_model, model_stamp
from ..training.run_lock import run_lock
from ..training.train_data import prepare_data

SPLITS = ("test", "train")  # which examples of a run's data `encode` and `interpolate` read
ENCODE_BATCH = 1000  # examples per guide call


def _latent_program(program: object, what: str) -> Program:
    """The pair as a Program, refused with an InputError where its kind refuses `what` (a conditional
    model) or it has no latent to encode (a classifier)."""
    pair = Program.of(program)
    kind_of(pair).refuse(what, "this run")
    if not kind_of(pair).latent:
        raise InputError(f"this run trained a classifier, which has no latent z: there is nothing to {what}; "
                         "use a VAE, autoencoder or M2 run")
    return pair


@torch.no_grad()
def encode(program: object, x: Tensor, labels: Tensor | None = None, scales: bool = True,
           batch_size: int = ENCODE_BATCH, c: Tensor | None = None) -> dict[str, np.ndarray]:
    """Per example: "mean", E_q[z|x] (N, D), and with scales=True "scale", the standard deviation of
    q(z|x) (N, D), over the continuous latent sites flattened and concatenated in the guide's order
    (a class site has no mean); "labels" (N,) where given. An autoencoder's guide is a point mass, so
    it has codes but no scales: scales=True is an InputError there. `c`: the condition of a
    conditional pair model(x, c) / guide(x, c) (a CVAE, or your own), one row per example of x; the
    moments are then those of q(z|x, c)."""
    pair = _latent_program(program, "encode")
    if scales and not kind_of(pair).scales:
        raise InputError("an autoencoder's guide is a point mass: its codes have no scales; ask for the "
                         "means only (--no-scales, or scales=False)")
    if x.shape[0] == 0:
        raise InputError("there are no examples to encode")
    if c is None and kind_of(pair).conditional:
        raise InputError("this model's guide is q(z | x, c): pass the condition of each example, "
                         "encode(model, x, c=c) (a CVAE's: model.condition.condition(x, labels))")
    conditions = () if c is None else (c,)
    check_conditions(x, conditions)
    continuous = pair.continuous_sites(x, *conditions)
    means, sds = [], []
    for start in range(0, x.shape[0], batch_size):
        rows = x[start:start + batch_size]
        moments = pair.posterior_moments(rows, *(c[start:start + batch_size] for c in conditions))
        means.append(torch.cat([moments[n][0].reshape(len(rows), -1) for n in continuous], dim=-1).cpu())
        sds.append(torch.cat([moments[n][1].reshape(len(rows), -1) for n in continuous], dim=-1).cpu())
    out = {"mean": torch.cat(means).numpy()}
    if scales:
        out["scale"] = torch.cat(sds).numpy()
    if labels is not None:
        out["labels"] = labels.cpu().numpy()
    return out


@torch.no_grad()
def interpolate(program: object, x_from: Tensor, x_to: Tensor, steps: int = 9) -> tuple[Tensor, Tensor]:
    """The mean of p(x|z_t) at z_t = (1 - t) E_q[z|x_from] + t E_q[z|x_to] for `steps` values of t from 0
    to 1, for x_from and x_to of one example each (1, C, H, W) and a pair with one continuous latent
    site (other sites, such as a class, held at their most likely value for x_from): the pictures
    (steps, C, H, W) and the latents z_t (steps, *event)."""
    if steps < 2:
        raise InputError(f"--steps must be at least 2 (the two ends), got {steps}")
    pair = _latent_program(program, "interpolate")
    latent = pair.continuous_sites(x_from)
    if len(latent) != 1:
        raise InputError(f"an interpolation moves along one continuous latent site; this pair has "
                         f"{len(latent)} ({', '.join(map(repr, latent))})")
    (name,) = latent
    both = torch.cat([x_from, x_to])
    moments = pair.posterior_moments(both)
    mean = moments[name][0]
    t = torch.linspace(0, 1, steps, device=both.device).view(-1, *[1] * (mean.dim() - 1))
    z = (1 - t) * mean[:1] + t * mean[1:]
    fixed = {site: mode[:1].expand(steps, *mode.shape[1:]) for site, (mode, _) in moments.items()
             if site != name}
    like = x_from.expand(steps, *x_from.shape[1:])
    return pair.decode(like, {name: z, **fixed}), z


def _run_examples(run: Path, split: str, device: str) -> tuple[Program, Tensor, Tensor | None]:
    """The trained model of a run (as a Program of its model and guide) and its examples of `split`
    (as the run prepared them: held-out images binarized once, as evaluate reads them), with their
    labels where there are any."""
    if split not in SPLITS:
        raise InputError(f"unknown --data {split!r}: choose one of {', '.join(SPLITS)}")
    device = resolve_device(device)
    config, model = load_model(Path(run), device)
    data = prepare_data(config)
    check_data_shape(Path(run), data.shape)
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    return Program.of(model), x.to(device), None if y is None else y.to(device)


def encode_run(run: str | Path, out: str | Path, split: str = "test", scales: bool = True,
               device: str = "auto") -> Path:
    """encode() the `split` examples of a run directory into the .npz file `out` (written whole or not
    at all): "mean", "scale" (unless scales=False), "labels" where the data have them, and "epoch" and
    "step" of the model encoded."""
    out = Path(out)
    if out.suffix != ".npz":
        raise InputError(f"--out {out}: the latents are written as a .npz file; give a path ending in .npz")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    pair, x, y = _run_examples(Path(run), split, device)
    conditions = kind_of(pair).conditions(pair.owner, x, y)  # a CVAE's c: the moments of q(z|x, c)
    arrays = encode(pair, x, y, scales, c=conditions[0] if conditions else None)
    stamp = model_stamp(Path(run))
    arrays.update(epoch=np.array(stamp["epoch"]), step=np.array(stamp["step"]))
    handle, temp = tempfile.mkstemp(prefix=".encode-", suffix=".npz", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temp, out)
    finally:
        Path(temp).unlink(missing_ok=True)
    return out


def _check_index(flag: str, index: int, n: int, split: str) -> None:
    if not 0 <= index < n:
        raise InputError(f"{flag} {index} is out of range: the {split} set has {n} examples (0..{n - 1})")


def interpolate_run(run: str | Path, start: int, end: int, steps: int = 9, split: str = "test",
                    device: str = "auto") -> list[Path]:
    """interpolate() between examples `start` and `end` of a run's `split` set, written into the run
    (all or none): interpolate_<start>_<end>.png (the two examples at the ends of the decoded path) and
    .npz ("images" (steps, C, H, W), "z", "t")."""
    run = Path(run)
    if steps < 2:
        raise InputError(f"--steps must be at least 2 (the two ends), got {steps}")
    with run_lock(run):  # one writer at a time
        pair, x, _ = _run_examples(run, split, device)
        _check_index("--from", start, x.shape[0], split)
        _check_index("--to", end, x.shape[0], split)
        images, z = interpolate(pair, x[start:start + 1], x[end:end + 1], steps)
        name = f"interpolate_{start}_{end}"

        def write(staging: Path) -> list[Path]:
            arrays = {"images": images.cpu().numpy(), "z": z.cpu().numpy(),
                      "t": np.linspace(0.0, 1.0, steps)}
            np.savez(staging / f"{name}.npz", **arrays)
            tiles = torch.cat([x[start:start + 1], images, x[end:end + 1]]).clamp(0, 1).unsqueeze(0)
            columns = [f"x[{start}]", *[f"t={t:.2f}" for t in arrays["t"]], f"x[{end}]"]
            title = f"decoded along z_t = (1-t) E_q[z|x[{start}]] + t E_q[z|x[{end}]] ({split} set)"
            figure = save_tiles(tiles, staging / f"{name}.png", title, column_names=columns)
            return [figure, staging / f"{name}.npz"]

        return write_all_or_none(run, write)
