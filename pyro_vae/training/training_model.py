"""What a training run steps: pyro-vae's own model, built by the run's kind from the config, or a user's
own model/guide pair moved to the device; the pair as a Program, its latent sites and the tensors the
optimizer steps, found once by tracing; the optimizer over them; and what a checkpoint holds of the
model (its parameters, a pair's by param-store name) and of the optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Dataset
from ..errors import InputError
from ..inference.program import Program, Sites
from ..models.exemplar import use_training_set
from ..models.kind import ModelKind
from ..optim import make_optimizer
from ..rng import forked_rng
from .run_dir import build_from_config, describe_pair, load_parameters, pair_parameters, restore_parameters


@dataclass(frozen=True)
class TrainingModel:
    """The model of a run: `pair` (the kind's nn.Module, or the user's pair), as a `program`, its latent
    `sites` (None for a kind without a latent), the tensors trained (`params`, by name) and whether it
    is pyro-vae's own (`own`)."""

    pair: object
    program: Program
    sites: Sites | None
    params: dict[str, Tensor]
    own: bool

    @classmethod
    def build(cls, kind: ModelKind, config: Any, data: Dataset, device: torch.device, processes: int,
              pair: object | None = None) -> TrainingModel:
        """The model `kind` builds from `config` (pair None), or the user's `pair` moved to the device (an
        nn.Module's; several processes need one). An exemplar prior gets the training images as its
        exemplars (exemplar.py; a resumed run's checkpoint then loads over them), and the kind prepares its
        own model from the training data (ModelKind.prepare, e.g. M2's auxiliary weight). Sites and parameters
        are found by tracing once, in eval mode (no batch statistics change), without drawing from the
        run's random stream (a run replays exactly)."""
        own = pair is None
        pair = build_from_config(config, data.shape).to(device) if own else pair
        use_training_set(pair, data.train_x)
        if own:
            kind.prepare(pair, config, data)
        program = Program.of(pair)
        if not own and processes > 1 and not isinstance(program.owner, nn.Module):
            raise InputError("several processes (torchrun) average the gradients of an nn.Module's "
                             "parameters; make your model/guide pair an nn.Module, or train in one process")
        if isinstance(program.owner, nn.Module):
            program.owner.to(device)
        module = pair if own else program.owner
        if isinstance(module, nn.Module):
            module.train(False)
        with forked_rng(device):
            sites = program.sites(data.test_x, *kind.test_conditions(pair, data)) if kind.latent else None
            params = dict(pair.named_parameters()) if own else pair_parameters(program, data.test_x)
        return cls(pair, program, sites, {name: p for name, p in params.items() if p.requires_grad}, own)

    @property
    def module(self) -> object:
        """What holds the parameters: the model (pyro-vae's own) or the pair's owner; DDP averages its
        gradients, train_mode switches it."""
        return self.pair if self.own else self.program.owner

    def train_mode(self, training: bool) -> None:
        """Dropout and the like on (training) or off, where the model is an nn.Module."""
        if isinstance(self.module, nn.Module):
            self.module.train(training)

    def record(self) -> dict | None:
        """A user's pair as config.json records it (run_dir.describe_pair); None for pyro-vae's own."""
        return None if self.own else describe_pair(self.program, self.sites)

    def state(self) -> dict[str, Tensor]:
        """The trained parameters as checkpoints hold them (a pair's by param-store name)."""
        return self.pair.state_dict() if self.own else {n: p.detach() for n, p in self.params.items()}

    def load(self, state: dict, path: Path) -> None:
        """Load a checkpoint's (or best.pt's) parameters `state["model"]`, read from `path`."""
        if self.own:
            load_parameters(self.pair, state["model"], path)
        else:
            restore_parameters(self.params, state["model"], path)

    def optimizer(self, config: Any, capturable: bool) -> torch.optim.Optimizer:
        """--optimizer over the parameters, fused; with a CUDA graph its state on the device
        (`capturable`)."""
        return make_optimizer(config.optimizer, self.params.values(), lr=config.lr, fused=True,
                              capturable=capturable)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, lr: float, capturable: bool) -> None:
    """Load a checkpoint's optimizer state; --lr and --cuda-graph may change on resume (and older runs
    used plain Adam), so its groups take this session's lr, fused and capturable."""
    for group in state["optimizer"]["param_groups"]:
        group.update(lr=lr, fused=True, capturable=capturable)
    optimizer.load_state_dict(state["optimizer"])
