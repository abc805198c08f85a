"""Numerical faults in training: find where a NaN or infinity first appears, and say so."""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import torch
from torch import Tensor

from ..errors import TrainingError
from ..sites import sample_sites
from .program import Program


class NumericalFault(TrainingError):
    """The loss or a gradient became NaN or infinite; the message names where and what to do."""


def is_validation_error(err: ValueError) -> bool:
    """Whether `err` is Pyro/torch refusing non-finite distribution parameters or log-densities."""
    text = str(err)
    return "Expected parameter" in text or "Error while computing log_prob" in text


def _finite(t) -> bool:
    return not torch.is_tensor(t) or bool(torch.isfinite(t).all())


@torch.no_grad()
def _nonfinite_site(program: Program, x: Tensor, *conditions: Tensor) -> str | None:
    """The first sample site (guide, then model) whose parameters, value or log-density is
    not finite when the batch is run again, or None."""
    with pyro.validation_enabled(False):
        model_trace, guide_trace = program.traces(x, *conditions)
    for who, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in sample_sites(trace):
            fn = site["fn"]
            while hasattr(fn, "base_dist"):
                fn = fn.base_dist
            params = [getattr(fn, k, None) for k in getattr(fn, "arg_constraints", {})]
            if not all(_finite(p) for p in params):
                return f"the parameters of the {who}'s sample site {name!r}"
            if not _finite(site["value"]):
                return f"the value of the {who}'s sample site {name!r}"
            if not _finite(site["fn"].log_prob(site["value"])):
                return f"the log-density of the {who}'s sample site {name!r}"
    return None


def locate_nonfinite(program: Program, params: Mapping[str, Tensor], x: Tensor, loss: Tensor,
                     *conditions: Tensor) -> str:
    """A phrase naming where the non-finite loss or gradient first appeared: the first sample site of
    the program's traces on x (and a conditional pair's `conditions`), or the first of `params` (by name)
    with a non-finite gradient."""
    if not _finite(loss):
        site = _nonfinite_site(program, x, *conditions)
        return f"non-finite loss ({site or 'not reproduced on a second run of the batch'})"
    for name, p in params.items():
        if p.grad is not None and not _finite(p.grad):
            return f"non-finite gradient (first in parameter {name!r})"
    return "non-finite gradient norm"
