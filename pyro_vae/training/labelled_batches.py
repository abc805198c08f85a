"""Batches with labelled examples in every one (--labelled-per-batch M, M2), and the loss that keeps
them an unbiased estimate of the full-data objective.

With N_l labelled and N_u unlabelled training examples (N = N_l + N_u), -l_i the bound of labelled
example i (L(x, y), plus alpha log q(y|x)) and -u_j that of unlabelled example j (U(x)), training
minimizes the full-data objective per example

    F = (1/N) [ sum_{i labelled} l_i + sum_{j unlabelled} u_j ].

Drawn uniformly from the whole training set, a batch of B holds B N_l / N labelled examples on average
(0.2 for 100 labels in 50,000 and B = 100: most batches have none). Here every batch holds M labelled
examples, the next M of a stream of reshuffled passes over the labelled subset (each position of the
stream is uniform over the subset), and b = B - M unlabelled ones, the next b of a permutation of the
unlabelled examples (a uniform sample of size b; an epoch is one pass over them, its last batch may
hold fewer). The batch's loss

    F_hat = (1/N) [ (N_l / M) sum_{i in batch, labelled} l_i + (N_u / b) sum_{j in batch, unlabelled} u_j ]

has E[F_hat] = F (linearity of expectation; each drawn example is uniform over its group), whatever M:
M changes the variance, not the objective. Kingma et al.'s code is the case M = N_l / K, b = N_u / K
with K batches an epoch (each label once per epoch); Pyro's examples/vae/ss_vae_M2.py instead steps on a
whole batch of labelled examples every ~N / N_l batches, unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError
from ..inference.discrete import UNLABELLED


class LabelledBatches:
    """The batches of an epoch for training `labels` (UNLABELLED where none; on the device the batches are
    drawn on): M = `per_batch` labelled examples first, then up to `batch_size` - M unlabelled ones (M <
    batch_size: the kind's check, m2.check_labelled_per_batch).
    `n_batches` an epoch (one pass over the unlabelled examples), `examples_per_epoch` their examples."""

    def __init__(self, labels: Tensor, batch_size: int, per_batch: int):
        labelled = labels != UNLABELLED
        self.labelled, self.unlabelled = labelled.nonzero().squeeze(-1), (~labelled).nonzero().squeeze(-1)
        self.per_batch, self.room = per_batch, batch_size - per_batch
        self.n_labelled, self.n_unlabelled = len(self.labelled), len(self.unlabelled)
        if self.n_labelled == 0 or self.n_unlabelled == 0:
            none = "labelled" if self.n_labelled == 0 else "unlabelled"
            raise InputError(f"--labelled-per-batch {per_batch} mixes labelled and unlabelled examples in "
                             f"every batch, and the {len(labels)} training examples hold no {none} one; "
                             "change --labels, or drop --labelled-per-batch")
        self.n = self.n_labelled + self.n_unlabelled
        self.n_batches = math.ceil(self.n_unlabelled / self.room)
        self.examples_per_epoch = self.n_batches * per_batch + self.n_unlabelled

    def epoch(self, generator: torch.Generator) -> list[Tensor]:
        """An epoch's batches of indices, drawn from `generator`: each M labelled (from as many reshuffled
        passes over the labelled subset as the epoch needs), then its share of a permutation of the
        unlabelled."""
        device = self.labelled.device
        unlabelled = self.unlabelled[torch.randperm(self.n_unlabelled, generator=generator, device=device)]
        need = self.n_batches * self.per_batch
        passes = [self.labelled[torch.randperm(self.n_labelled, generator=generator, device=device)]
                  for _ in range(math.ceil(need / self.n_labelled))]
        labelled = torch.cat(passes)[:need].split(self.per_batch)
        return [torch.cat([a, b]) for a, b in zip(labelled, unlabelled.split(self.room), strict=True)]

    def weights(self, size: int) -> tuple[float, float]:
        """The weights of the summed labelled and unlabelled losses of a batch of `size` examples (M
        labelled first): ((N_l / M) / N, (N_u / b) / N), b = size - M."""
        return (self.n_labelled / self.per_batch / self.n,
                self.n_unlabelled / (size - self.per_batch) / self.n)

    def loss(self, summed: Callable[..., Tensor], x: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
        """F_hat of the batch x (M labelled examples first) with `inputs` (labels, ...) beside it:
        `summed(x, *inputs)` is the loss summed over the examples it is given, called once for the
        labelled part and once for the unlabelled (one scalar scale each, as enumeration wants)."""
        m = self.per_batch
        w_labelled, w_unlabelled = self.weights(x.shape[0])
        return (w_labelled * summed(x[:m], *(t[:m] for t in inputs))
                + w_unlabelled * summed(x[m:], *(t[m:] for t in inputs)))
