"""Data-parallel training on several processes with PyTorch DistributedDataParallel (DDP).

`torchrun --nproc_per_node=N -m pyro_vae train ...` starts N processes (add torchrun's --nnodes,
--node-rank and --rdzv-endpoint for several machines). Each reads its rank and the world size from
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins the process
group (NCCL on GPUs, gloo on CPUs) and takes its share of every global batch of --batch-size
examples. DDP averages gradients over the W processes; process r's loss is its examples' summed
-ELBO divided by (n / W), n the size of the global batch, so the average is the gradient of
-ELBO per example of the global batch, as one process computes it. Only rank 0 writes files.

Without torchrun's environment (or with WORLD_SIZE=1) everything here is the identity.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError

SYNC_EVERY = 20  # steps between the processes' agreement on stopping and checkpointing


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    def shard(self, idx: Tensor) -> Tensor:
        """This process's contiguous part of a global batch of indices (parts differ by at most 1)."""
        return idx.tensor_split(self.world_size)[self.rank] if self.active else idx

    def drops_last(self, n: int, batch_size: int) -> bool:
        """Whether an epoch of n examples ends with a global batch smaller than the number of
        processes (some would get no example): training leaves it out, with several processes."""
        return 0 < n % batch_size < self.world_size

    def sum(self, value: Tensor) -> Tensor:
        """sum_r value_r over the processes (a new tensor; `value` itself when alone)."""
        if not self.active:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def max(self, value: Tensor) -> Tensor:
        """max_r value_r over the processes (`value` itself when alone)."""
        if not self.active:
            return value
        top = value.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return top

    def agree(self, step: int, *flags: int) -> list[int]:
        """The largest value of each flag over the processes, every SYNC_EVERY steps (zeros in
        between, so that all processes act on the same step); the flags as given when alone."""
        if not self.active:
            return list(flags)
        if step % SYNC_EVERY:
            return [0] * len(flags)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        return [int(v) for v in self.max(torch.tensor(flags, device=device)).tolist()]

    def gather(self, obj: object) -> list[object] | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] when alone."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.active:
            dist.barrier()

    def data_parallel(self, loss_fn: Callable[..., Tensor], module: nn.Module,
                      device: torch.device) -> Callable[..., Tensor]:
        """loss_fn run under DDP, so that backward averages the gradients of `module`'s parameters
        over the processes; loss_fn itself when alone."""
        if not self.active:
            return loss_fn
        return nn.parallel.DistributedDataParallel(
            _Loss(loss_fn, module), device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (the prior's mean and scale) never change
        )

    def rng_state(self, state: dict) -> dict | None:
        """This process's random-number state from a checkpoint, or None where the checkpoint was
        written by a different number of processes (the process then draws from a fresh seed)."""
        per_rank = state.get("rng_ranks")
        if not self.active:
            return state["rng"] if per_rank is None else per_rank[0]
        return per_rank[self.rank] if per_rank is not None and len(per_rank) == self.world_size else None


class _Loss(nn.Module):
    """A loss function as a module whose forward is the loss: what DDP wraps."""

    def __init__(self, loss_fn: Callable[..., Tensor], module: nn.Module):
        super().__init__()
        self.loss_fn, self.module = loss_fn, module

    def forward(self, *args, **options) -> Tensor:
        return self.loss_fn(*args, **options)


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun's environment describes (if it describes more than one
    process) and return this process's Ranks and device: on CUDA, the GPU numbered LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


def _leave() -> None:
    """Leave the process group at exit (PyTorch warns about a group left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()
