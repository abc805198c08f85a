"""The standard error of a mean over examples (or draws, or seeds), the one way every number here is
reported with its uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def mean_se(values: Tensor | np.ndarray | Sequence[float],
            dim: int | None = None) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """The mean of `values` and its standard error sd / sqrt(n), with the sample standard deviation sd
    (divisor n - 1), computed in the values' dtype (float64 for numbers given as a list or array): over
    all values as two floats (dim None), or along `dim` as two tensors. With one value (or none) there
    is no spread to estimate: the standard error is NaN, never 0 or None (the mean of no values is NaN)."""
    if not torch.is_tensor(values):
        values = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if dim is None:
        values = values.flatten()
        n = values.numel()
        mean = float(values.mean()) if n else math.nan
        return mean, float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    n = values.shape[dim]
    mean = values.mean(dim)
    return mean, values.std(dim) / math.sqrt(n) if n > 1 else torch.full_like(mean, math.nan)
