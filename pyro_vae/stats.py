"""The standard error of a mean over examples (or draws), the one way every number here is reported
with its uncertainty."""

from __future__ import annotations

import math

from torch import Tensor


def mean_se(values: Tensor) -> tuple[float, float]:
    """The mean of `values` (flattened) and its standard error sd / sqrt(n), with the sample standard
    deviation sd (divisor n - 1), both computed in the values' dtype. With one value (or none) there is
    no spread to estimate: the standard error is NaN, never 0 or None (and the mean of no values is NaN)."""
    values = values.flatten()
    n = values.numel()
    mean = float(values.mean()) if n else math.nan
    return mean, float(values.std() / math.sqrt(n)) if n > 1 else math.nan
