"""Figures of a conditional VAE (models/cvae.py): quadrant completions, the given quadrants beside the
truth, the baseline's single prediction and several completions sampled from the CVAE (their diversity
is what the baseline cannot show); and, for a class condition, a grid of samples per class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .models.conditions import MISSING, Quadrants
from .models.cvae import CVAE
from .models.nn_baseline import BaselineNet
from .plots import save_tiles
from .rng import seeded

MISSING_COLOUR = (0.25, 0.45, 0.85)  # the pixels to predict, in the "given" column


def _rgb(images: Tensor) -> Tensor:
    """(..., C, H, W) images with 1 or 3 channels as 3-channel ones."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:]) if images.shape[-3] == 1 else images


def _given_picture(c: Tensor) -> Tensor:
    """The condition as a picture: given pixels grey, missing ones in MISSING_COLOUR (N, 3, H, W)."""
    missing = (c == MISSING).any(-3, keepdim=True)
    colour = torch.tensor(MISSING_COLOUR, device=c.device).view(3, 1, 1)
    return torch.where(missing, colour, _rgb(c.clamp(0, 1)))


@torch.no_grad()
def completion_images(cvae: CVAE, x: Tensor, c: Tensor, baseline: BaselineNet | None = None,
                      n_samples: int = 6, seed: int = 0) -> tuple[Tensor, list[str]]:
    """One row per example: the given quadrants, the truth x, the baseline's prediction (if given),
    then n_samples completions z ~ p(z | c), x = mean of p(x | z, c) at the missing pixels (the given
    ones kept); as (rows, columns, 3, H, W) pictures and the columns' names. Seeded."""
    with seeded(seed, x.device):
        samples = [cvae.complete(c) for _ in range(n_samples)]
    columns = [_given_picture(c), _rgb(x)]
    names = ["given", "truth"]
    if baseline is not None:
        columns.append(_rgb(baseline.predict(c)))
        names.append("baseline")
    columns += [_rgb(s) for s in samples]
    names += [f"CVAE {i + 1}" for i in range(n_samples)]
    return torch.stack(columns, dim=1), names


def plot_completions(cvae: CVAE, x: Tensor, c: Tensor, path: Path, baseline: BaselineNet | None = None,
                     n_examples: int = 8, n_samples: int = 6, seed: int = 0) -> Path:
    """The first n_examples of (x, c): given quadrants (blue: to predict), truth, the baseline's
    prediction and n_samples completions sampled from the CVAE, one row each."""
    if not isinstance(cvae.condition, Quadrants):
        raise InputError(f"completions need a quadrant condition; this CVAE has --condition "
                         f"{cvae.condition.name}: draw its samples per class (plot_class_samples)")
    tiles, names = completion_images(cvae, x[:n_examples], c[:n_examples], baseline, n_samples, seed)
    given = cvae.condition.given
    title = (f"{given} quadrant(s) given (blue: predicted): the baseline's prediction and "
             f"{n_samples} CVAE completions")
    return save_tiles(tiles, path, title, names)


@torch.no_grad()
def class_sample_images(cvae: CVAE, n_per_class: int = 10, seed: int = 0) -> Tensor:
    """For a class-conditional CVAE: (n_classes, n_per_class, C, H, W), row k the mean of p(x | z, k)
    for z ~ p(z | k). Seeded."""
    n_classes = cvae.condition.n_classes
    labels = torch.arange(n_classes, device=cvae.missing.device).repeat_interleave(n_per_class)
    c = cvae.condition.condition(torch.zeros(1), labels)
    with seeded(seed, c.device):
        images = cvae.complete(c)
    return images.unflatten(0, (n_classes, n_per_class))


def plot_class_samples(cvae: CVAE, path: Path, class_names: Sequence[str] | None = None,
                       n_per_class: int = 10, seed: int = 0) -> Path:
    """A grid of samples per class, one row per class, named by class_names (data.CLASS_NAMES) where
    given, else by the label."""
    tiles = _rgb(class_sample_images(cvae, n_per_class, seed))
    names = list(class_names) if class_names else [str(k) for k in range(tiles.shape[0])]
    return save_tiles(tiles, path, "samples per class: z ~ p(z | class), mean of p(x | z, class)",
                       row_names=names)
