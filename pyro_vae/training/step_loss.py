"""The loss a training step differentiates, the arguments of each step, and the step made from them.

loss(x) = -ELBO_w(x) / per: the kind's objective (--estimator; M2's --discrete) with KL weight w on every
latent site (kl_weight.py: --beta, --kl-anneal), summed over the examples of x and divided by `per`, the
examples in x (with W processes, those in the step's global batch divided by W): nats per example. The
labels of the batch (M2, the classifier) go to model and guide after x, and the kind's schedule of the
step (M2's temperature: the kind owns it, nothing is written into the model) as keyword arguments. With
--labelled-per-batch the batch's labelled and unlabelled examples are weighted apart, so that the loss
stays an unbiased estimate of the full-data objective per example (labelled_batches.py)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..data import Dataset
from ..inference.kl_weight import kl_weight, scale_latents
from ..inference.step import CUDAGraphStep, SVIStep
from ..models.kind import ModelKind
from .distributed import Ranks
from .labelled_batches import LabelledBatches
from .training_model import TrainingModel


class StepArguments(NamedTuple):
    """What a step passes to the loss after x: its KL weight, the examples it divides by, what model and
    guide take after x for this process's share of the batch (`inputs`: the labels where the kind is
    labelled, then the kind's condition, e.g. a conditional VAE's c; none for a plain VAE) and the kind's
    schedule."""

    weight: float
    per: float
    inputs: tuple[Tensor, ...]
    schedule: dict[str, float]


class StepLoss:
    """The loss of `model`'s training steps (call it: what SVIStep differentiates), and what step s (from 0
    over the whole run, `n_batches` steps an epoch) passes besides x (`arguments`): the labels are those
    of `data`'s training images where the kind is labelled, and the kind's condition made from the batch
    (ModelKind.conditions; with `data`'s labels unless the images are streamed). With `labelled` (the
    batches of --labelled-per-batch) the loss is LabelledBatches.loss, already per example."""

    def __init__(self, kind: ModelKind, config: Any, model: TrainingModel, data: Dataset, ranks: Ranks,
                 n_batches: int, streamed: bool = False, labelled: LabelledBatches | None = None):
        self.kind, self.config, self.model, self.ranks, self.labelled = kind, config, model, ranks, labelled
        self.labels = data.train_y if kind.labelled else None  # UNLABELLED where none (M2)
        self.condition_labels = None if streamed else data.train_y  # what a condition may be made from
        self.n_batches, self.total_steps = n_batches, config.epochs * n_batches  # the schedule's steps
        self.elbo = kind.objective(config)

    def __call__(self, x: Tensor, weight: float, per: float, *inputs: Tensor, **schedule: float) -> Tensor:
        """-ELBO with KL weight `weight` on every latent site, summed over x, divided by `per` (with
        --labelled-per-batch: its labelled and unlabelled parts weighted apart, labelled_batches.py)."""
        model, guide = self.model.program.model, self.model.program.guide
        if self.model.sites is not None:  # else nothing latent to weight
            model, guide = (scale_latents(fn, weight, self.model.sites.latent) for fn in (model, guide))

        def summed(x: Tensor, *inputs: Tensor) -> Tensor:
            return self.elbo.differentiable_loss(model, guide, x, *inputs, **schedule)

        return summed(x, *inputs) / per if self.labelled is None else self.labelled.loss(summed, x, inputs)

    def kl_weight(self, step: int) -> float:
        """The KL weight of step `step`."""
        return kl_weight(self.config.beta, self.config.kl_anneal, step, self.n_batches)

    def schedule(self, step: int) -> dict[str, float]:
        """The kind's keyword arguments of model and guide at step `step` (e.g. M2's temperature)."""
        return self.kind.schedule(self.config, step, self.total_steps)

    def arguments(self, idx: Tensor, x: Tensor, step: int) -> StepArguments:
        """What step `step` on global batch `idx` passes after x, this process's share of it."""
        share = self.ranks.shard(idx)
        labels = () if self.labels is None else (self.labels[share],)
        y = None if self.condition_labels is None else self.condition_labels[share]
        inputs = (*labels, *self.kind.conditions(self.model.pair, x, y))
        per = len(idx) / self.ranks.world_size
        return StepArguments(self.kl_weight(step), per, inputs, self.schedule(step))


def make_step(loss: StepLoss, optimizer: torch.optim.Optimizer, clip_grad: float | None, device: torch.device,
              cuda_graph: bool) -> SVIStep | CUDAGraphStep:
    """The training step (step.py) on `loss`: under DDP with several processes (the model's gradients
    averaged), captured as a CUDA graph if `cuda_graph`."""
    fn = loss.ranks.data_parallel(loss, loss.model.module, device)
    step = SVIStep(fn, optimizer, list(loss.model.params.values()), clip_grad, device)
    return CUDAGraphStep(step) if cuda_graph else step
