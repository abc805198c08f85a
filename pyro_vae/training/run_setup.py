"""What a training run checks and decides before anything is written: its settings, the device and the
processes taking part (torchrun: distributed.py), and whether the step is captured as a CUDA graph."""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from ..device import resolve_device
from ..errors import InputError
from ..models.exemplar import EAGER_PRIORS
from ..models.kind import ModelKind, check_config
from . import distributed
from .distributed import Ranks
from .tensorboard import check_available as check_tensorboard


def check_settings(config: Config, kind: ModelKind, pair: bool, tensorboard: bool) -> Config:
    """The config the run uses (check_config: the binarization settled, a copy), after refusing the
    settings the run cannot take: the config's own checks and those of the kind config.model names,
    with a user's `pair` its kind's too (a pair brings its own networks), and with `tensorboard` a
    missing TensorBoard."""
    config = check_config(config)
    if pair:
        kind.check(config)
    if tensorboard:
        check_tensorboard()
    return config


def start_processes(config: Any) -> tuple[Ranks, torch.device]:
    """This process's place among the training processes and its device (--device; with torchrun, the
    GPU numbered LOCAL_RANK); refused where the global batch has fewer examples than processes."""
    ranks, device = distributed.start(resolve_device(config.device))
    if config.batch_size < ranks.world_size:
        raise InputError(f"--batch-size {config.batch_size} is the global batch, shared by "
                         f"{ranks.world_size} processes; make it at least the number of processes")
    return ranks, device


def use_cuda_graph(config: Any, kind: ModelKind, ranks: Ranks, device: torch.device) -> bool:
    """Whether the step is captured as a CUDA graph (--cuda-graph auto: where the kind knows it holds, one
    GPU, one process: measured equal to eager and 10x faster for the VAE, docs/scaling.md; a user's pair
    only when asked for); --cuda-graph on is refused off a single GPU and for a kind that runs eagerly."""
    if config.cuda_graph == "on" and (device.type != "cuda" or ranks.active):
        raise InputError("--cuda-graph on needs a CUDA GPU and a single process; "
                         f"this run has {device.type} and {ranks.world_size} process(es): leave it off")
    if config.cuda_graph == "on" and kind.eager:
        raise InputError(f"--cuda-graph on captures the VAE's step; --model {kind.name} runs "
                         "eagerly: leave --cuda-graph at auto or off")
    return config.cuda_graph == "on" or (
        config.cuda_graph == "auto" and kind.auto_cuda_graph and device.type == "cuda"
        and not ranks.active and config.prior not in EAGER_PRIORS)
