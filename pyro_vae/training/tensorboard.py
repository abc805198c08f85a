"""TensorBoard event files for a run (`pyro-vae train --tensorboard`), in RUN/tensorboard/: the loss of
every step, and per epoch the test (and validation) ELBO, its reconstruction and KL terms, the KL
weight, the active units, and grids of samples and reconstructions as images.

tensorboard is an optional extra (`pip install -e ".[tensorboard]"`); asking for it without the
package is an input error. The per-step losses stay on the device during an epoch and are written
at its end, so logging adds no host sync to the step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from ..figures.plots import image_grid
from ..inference.scores import active_units
from ..rng import seeded

FOLDER = "tensorboard"
GRID = 8  # images per side of the sample grid; reconstructions: one row of GRID under their inputs


def _writer_class():
    try:  # tensorboard is an optional dependency: imported only when --tensorboard asks for it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]" '
                         "(or pip install tensorboard)") from None
    return SummaryWriter


def check_available() -> None:
    """Raise InputError, saying how to install it, if tensorboard cannot be imported."""
    _writer_class()


class Board:
    """The event writer of one run: `steps` after each epoch's steps, `epoch` with its metrics row."""

    def __init__(self, run: Path):
        self.writer = _writer_class()(log_dir=str(Path(run) / FOLDER))

    def steps(self, last_step: int, losses: list[Tensor]) -> None:
        """The training loss (-ELBO per example) of the steps last_step - len(losses) + 1 .. last_step."""
        if losses:
            first = last_step - len(losses) + 1
            for i, loss in enumerate(torch.stack(losses).tolist()):  # one copy to the host per epoch
                self.writer.add_scalar("train/loss", loss, first + i)

    @torch.no_grad()
    def epoch(self, row: dict, program, x: Tensor, seed: int, pictures: bool = True) -> None:
        """The epoch's row of metrics.jsonl (test ELBO, its terms, KL weight, validation ELBO, test and
        validation accuracy where present), and with `pictures` (a model with a latent: its kind's
        `latent`) the active units on x and sample and reconstruction grids, at the row's step."""
        step = row["step"]
        for key, tag in (("test_elbo", "test/elbo"), ("test_recon", "test/recon"),
                         ("validation_elbo", "validation/elbo"), ("test_accuracy", "test/accuracy"),
                         ("validation_accuracy", "validation/accuracy"),
                         ("temperature", "train/temperature")):
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        if not pictures:
            self.writer.flush()
            return
        if row.get("test_elbo") is not None:
            self.writer.add_scalar("test/kl", row["test_recon"] - row["test_elbo"], step)
        self.writer.add_scalar("train/kl_weight", row.get("kl_weight", 1.0), step)  # recorded when not 1
        self.writer.add_scalar("test/active_units", active_units(program, x), step)
        if x.dim() == 4 and x.shape[1] in (1, 3):
            rows = x[torch.arange(GRID, device=x.device) % x.shape[0]]
            with seeded(seed, x.device):
                samples = program.sample(rows[torch.arange(GRID * GRID, device=x.device) % GRID])
            self.writer.add_image("samples", image_grid(samples.cpu(), GRID, GRID), step, dataformats="HWC")
            recon = torch.cat([rows, program.reconstruct(rows)]).cpu()
            self.writer.add_image("reconstructions", image_grid(recon, 2, GRID), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
