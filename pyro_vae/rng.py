"""Every random-number state a run uses (torch CPU and CUDA, NumPy, Python) as plain tensors and
numbers, so a checkpoint that holds them still loads with torch.load(weights_only=True); and the
caller's random state kept while the library draws and seeds (forked_rng, seeded; across several
calls, as a training run's own generators: RunRandomState)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import torch


def get_rng_state(device: torch.device) -> dict:
    """The current states of torch (and CUDA on a CUDA device), NumPy and Python's random."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what get_rng_state returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextmanager
def forked_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run the body on the caller's random generators (torch CPU, CUDA on a CUDA `device`, NumPy,
    Python's random) and give them back as they were: whatever the body draws or seeds, the caller's
    next draw is the one it would have made without the call."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """forked_rng with every generator seeded with `seed` inside (pyro.set_rng_seed): draws that
    repeat from the seed, and the caller's generators as they were afterwards."""
    with forked_rng(device):
        pyro.set_rng_seed(seed)
        yield


def set_seed(seed: int, device: torch.device) -> None:
    """Seed the generators get_rng_state holds (torch CPU, CUDA on a CUDA `device`, NumPy, Python's
    random) with `seed`, as pyro.set_rng_seed does, leaving other GPUs' generators alone."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class RunRandomState:
    """Random generators of a run's own, lent the global ones (those get_rng_state holds) only inside
    `with state:` blocks: each block starts where the last one left off (the first from set_seed(seed)),
    and on leaving it, also on an error, the caller's generators are as they were: a run draws and seeds
    as if it owned them and changes no global state. Blocks do not nest."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.state: dict | None = None  # the run's generators between blocks (None: not yet seeded)
        self.caller: dict | None = None  # the caller's generators while a block runs

    def __enter__(self) -> RunRandomState:
        self.caller = get_rng_state(self.device)
        if self.state is None:
            set_seed(self.seed, self.device)
        else:
            set_rng_state(self.state, self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.state = get_rng_state(self.device)
        set_rng_state(self.caller, self.device)
        self.caller = None
