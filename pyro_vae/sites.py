"""The layout of every trace the estimators read: the data plate is the only plate of a program
(program.py's contract), so Pyro's ELBOs get MAX_PLATE_NESTING = 1 and put particle plates and
enumerated values to the left of it; and which sites of a trace are sample sites."""

from __future__ import annotations

from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

MAX_PLATE_NESTING = 1  # the data plate; particle plates and enumeration go to the left of it


def is_sample_site(site: dict) -> bool:
    """Whether a trace node (or a messenger's message) is a sample site: observed or latent, not a
    param site and not a plate's subsample site."""
    return site["type"] == "sample" and not site_is_subsample(site)


def sample_sites(trace: Trace) -> list[tuple[str, dict]]:
    """(name, site) of the trace's sample sites (is_sample_site), in the order they were run."""
    return [(name, site) for name, site in trace.nodes.items() if is_sample_site(site)]
