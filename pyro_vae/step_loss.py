"""The loss a training step differentiates, the arguments of each step, and the step made from them.

loss(x) = -ELBO_w(x) / per: the kind's objective (--estimator; M2's --discrete) with KL weight w on every
latent site (kl_weight.py: --beta, --kl-anneal), summed over the examples of x and divided by `per`, the
examples in x (with W processes, those in the step's global batch divided by W): nats per example. The
labels of the batch (M2, the classifier) go to model and guide after x, and the kind's schedule of the
step (M2's temperature: the kind owns it, nothing is written into the model) as keyword arguments."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .data import Dataset
from .distributed import Ranks
from .kl_weight import kl_weight, scale_latents
from .models.kind import ModelKind
from .step import CUDAGraphStep, SVIStep
from .training_model import TrainingModel


class StepArguments(NamedTuple):
    """What a step passes to the loss after x: its KL weight, the examples it divides by, the labels of
    this process's share of the batch (none for a model without labels) and the kind's schedule."""

    weight: float
    per: float
    labels: tuple[Tensor, ...]
    schedule: dict[str, float]


class StepLoss:
    """The loss of `model`'s training steps (call it: what SVIStep differentiates), and what step s (from 0
    over the whole run, `n_batches` steps an epoch) passes besides x (`arguments`): the labels are those
    of `data`'s training images where the kind is labelled."""

    def __init__(self, kind: ModelKind, config: Any, model: TrainingModel, data: Dataset, ranks: Ranks,
                 n_batches: int):
        self.kind, self.config, self.model, self.ranks = kind, config, model, ranks
        self.labels = data.train_y if kind.labelled else None  # UNLABELLED where none (M2)
        self.n_batches, self.total_steps = n_batches, config.epochs * n_batches  # the schedule's steps
        self.elbo = kind.objective(config)

    def __call__(self, x: Tensor, weight: float, per: float, *labels: Tensor, **schedule: float) -> Tensor:
        """-ELBO with KL weight `weight` on every latent site, summed over x, divided by `per`."""
        model, guide = self.model.program.model, self.model.program.guide
        if self.model.sites is not None:  # else nothing latent to weight
            model, guide = (scale_latents(fn, weight, self.model.sites.latent) for fn in (model, guide))
        return self.elbo.differentiable_loss(model, guide, x, *labels, **schedule) / per

    def kl_weight(self, step: int) -> float:
        """The KL weight of step `step`."""
        return kl_weight(self.config.beta, self.config.kl_anneal, step, self.n_batches)

    def schedule(self, step: int) -> dict[str, float]:
        """The kind's keyword arguments of model and guide at step `step` (e.g. M2's temperature)."""
        return self.kind.schedule(self.config, step, self.total_steps)

    def arguments(self, idx: Tensor, step: int) -> StepArguments:
        """What step `step` on global batch `idx` passes after this process's share of it."""
        labels = () if self.labels is None else (self.labels[self.ranks.shard(idx)],)
        per = len(idx) / self.ranks.world_size
        return StepArguments(self.kl_weight(step), per, labels, self.schedule(step))


def make_step(loss: StepLoss, optimizer: torch.optim.Optimizer, clip_grad: float | None, device: torch.device,
              cuda_graph: bool) -> SVIStep | CUDAGraphStep:
    """The training step (step.py) on `loss`: under DDP with several processes (the model's gradients
    averaged), captured as a CUDA graph if `cuda_graph`."""
    fn = loss.ranks.data_parallel(loss, loss.model.module, device)
    step = SVIStep(fn, optimizer, list(loss.model.params.values()), clip_grad, device)
    return CUDAGraphStep(step) if cuda_graph else step
