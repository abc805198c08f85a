"""The conditions a conditional VAE (cvae.py) is given, parsed from `quadrants:N` or `class`.

* `quadrants:N` (Sohn et al. 2015; Pyro's examples/cvae): N = 1, 2 or 3 quadrants of each image are
  given, the others are predicted. Given: 1 -> bottom-left; 2 -> the left half (top-left, bottom-left);
  3 -> all but bottom-right. The condition c is the image with its missing pixels set to MISSING (-1),
  and the likelihood scores the missing pixels only.
* `class`: c is the one-hot label (N, K), and the likelihood scores the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import InputError

MISSING = -1.0  # the value of a missing pixel in a quadrant condition (Pyro's example marks them so)
QUADRANTS_GIVEN = (1, 2, 3)


def given_pixels(height: int, width: int, given: int) -> Tensor:
    """Which pixels of an H x W image are given with `given` quadrants (bool, H x W): bottom-left for 1,
    the left half for 2, all but the bottom-right quadrant for 3 (rows from the top, cut at H // 2 and
    W // 2)."""
    top, left = torch.zeros(height, width, dtype=torch.bool), torch.zeros(height, width, dtype=torch.bool)
    top[: height // 2] = True
    left[:, : width // 2] = True
    bottom_left = left & ~top
    return {1: bottom_left, 2: left, 3: top | left}[given]


@dataclass(frozen=True)
class Quadrants:
    """c = x with the pixels of the 4 - `given` predicted quadrants set to MISSING."""

    given: int

    @property
    def name(self) -> str:
        return f"quadrants:{self.given}"

    def missing(self, x_shape: Sequence[int]) -> Tensor:
        """The predicted pixels, a bool mask of one example's shape (C, H, W)."""
        c, h, w = x_shape
        return (~given_pixels(h, w, self.given)).expand(c, h, w).clone()

    def condition(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """c: x (N, C, H, W) with the predicted pixels set to MISSING."""
        return x.masked_fill(self.missing(x.shape[-3:]).to(x.device), MISSING)

    def features(self, x_shape: Sequence[int]) -> int:
        """The length of the vector the networks read for c (the image, its gaps filled)."""
        return int(torch.Size(x_shape).numel())


@dataclass(frozen=True)
class ClassLabel:
    """c = the one-hot label, (N, n_classes)."""

    n_classes: int
    name = "class"

    def missing(self, x_shape: Sequence[int]) -> Tensor:
        """Every pixel is predicted: an all-True mask (C, H, W)."""
        return torch.ones(tuple(x_shape), dtype=torch.bool)

    def condition(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """c: one_hot(labels), float (N, n_classes)."""
        if labels is None:
            raise InputError("--condition class needs labels, and the data have none: use a labelled "
                             "dataset (digits, mnist, fashion-mnist, kmnist, or an .npz with y) or "
                             "--condition quadrants:N")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise InputError(f"class labels must lie in 0..{self.n_classes - 1}, got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return F.one_hot(labels.long(), self.n_classes).to(x.dtype)

    def features(self, x_shape: Sequence[int]) -> int:
        return self.n_classes


Condition = Quadrants | ClassLabel


def parse_condition(text: str, x_shape: Sequence[int], n_classes: int | None = None) -> Condition:
    """`quadrants:N` (N = 1, 2, 3; square images with an even side, four equal quadrants) or `class`
    (needs the number of classes, i.e. labelled data); an InputError says what else to give."""
    check_condition_name(text)
    if text == "class":
        if not n_classes:
            raise InputError("--condition class needs labels, and the data have none: use a labelled "
                             "dataset or --condition quadrants:N")
        return ClassLabel(int(n_classes))
    _, h, w = x_shape
    if h != w or h < 2 or h % 2:
        raise InputError(f"--condition {text} needs square images with an even side (four equal "
                         f"quadrants), got {h} x {w}: use --condition class, or resize the images "
                         "(--image-size)")
    return Quadrants(int(text.partition(":")[2]))


def check_condition_name(text: str) -> None:
    """An InputError unless `text` names a condition: quadrants:1, quadrants:2, quadrants:3 or class."""
    if text != "class" and text not in {f"quadrants:{n}" for n in QUADRANTS_GIVEN}:
        raise InputError(f"unknown condition {text!r}: choose quadrants:1, quadrants:2, quadrants:3 "
                         "(that many quadrants given, the rest predicted) or class")
