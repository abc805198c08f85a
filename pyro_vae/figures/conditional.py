"""Figures of a conditional VAE (models/cvae.py): quadrant completions, the given quadrants beside the
truth, the baseline's single prediction and several completions sampled from the CVAE (their diversity
is what the baseline cannot show); and, for a class condition, a grid of samples per class. The pictures
themselves are made in models/cvae.py (the CVAE's kind draws them at the end of a run); here they are
drawn from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..errors import InputError
from ..models.conditions import Quadrants
from ..models.cvae import CVAE, class_sample_images, completion_images
from ..models.nn_baseline import BaselineNet, rgb
from .plots import save_tiles

__all__ = ["class_sample_images", "completion_images", "plot_class_samples", "plot_completions"]


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


def plot_class_samples(cvae: CVAE, path: Path, class_names: Sequence[str] | None = None,
                       n_per_class: int = 10, seed: int = 0) -> Path:
    """A grid of samples per class, one row per class, named by class_names (data.CLASS_NAMES) where
    given, else by the label."""
    tiles = rgb(class_sample_images(cvae, n_per_class, seed))
    names = list(class_names) if class_names else [str(k) for k in range(tiles.shape[0])]
    return save_tiles(tiles, path, "samples per class: z ~ p(z | class), mean of p(x | z, class)",
                       row_names=names)
