"""Where each epoch's row of metrics goes: the epoch report and its reporters.

The trainer builds the row (train loss, then what the model's kind measures on the test set, ...) and
hands it to the `EpochReport`, which passes it to each reporter in turn: `MetricsFile` (RUN/metrics.jsonl,
every row so far), `TensorBoardReport` (--tensorboard: board.py) and `ProgressLine` (the line under the
progress bar). Another destination (MLflow, say) is one more reporter: an object with `step`, `epoch` and
`close` (see `Reporter`), added with `EpochReport.add`; nothing else in the trainer changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import Tensor
from tqdm.auto import tqdm

from .board import Board
from .models.kind import ModelKind
from .program import Program
from .run_dir import METRICS, write_jsonl


@dataclass(frozen=True)
class EpochView:
    """What a reporter may look at besides the row: the run's rows so far, the model and its kind, the
    test images and the run's seed."""

    metrics: list[dict]
    program: Program
    kind: ModelKind
    x: Tensor
    seed: int


class Reporter(Protocol):
    """A destination of the epoch report."""

    def step(self, step: int, loss: Tensor) -> None:
        """The loss of training step `step` (on the device: do not wait for it here)."""

    def epoch(self, row: dict, view: EpochView) -> None:
        """The row of an epoch that has just ended."""

    def close(self) -> None:
        """The run has ended."""


class MetricsFile:
    """RUN/metrics.jsonl, rewritten atomically with every row so far after each epoch."""

    def __init__(self, out: Path):
        self.path = Path(out) / METRICS

    def step(self, step: int, loss: Tensor) -> None:
        pass

    def epoch(self, row: dict, view: EpochView) -> None:
        write_jsonl(self.path, view.metrics)

    def close(self) -> None:
        pass


class TensorBoardReport:
    """--tensorboard: the loss of every step (kept on the device, written at the epoch's end: no host
    sync in the step) and the row, with pictures where the kind has a latent (board.Board)."""

    def __init__(self, out: Path):
        self.board, self.losses, self.last_step = Board(out), [], 0

    def step(self, step: int, loss: Tensor) -> None:
        self.losses.append(loss.detach())
        self.last_step = step

    def epoch(self, row: dict, view: EpochView) -> None:
        self.board.steps(row["step"], self.losses)
        self.losses = []
        self.board.epoch(row, view.program, view.x, view.seed, pictures=view.kind.latent)

    def close(self) -> None:
        self.board.close()


class ProgressLine:
    """The line printed above the progress bar after each epoch: train loss, the kind's test measure."""

    def step(self, step: int, loss: Tensor) -> None:
        pass

    def epoch(self, row: dict, view: EpochView) -> None:
        loss, tested, seconds = row["train_loss"], view.kind.epoch_line(row), row["seconds"]
        tqdm.write(f"epoch {row['epoch']}: train loss {loss:.2f}, {tested} ({seconds:.1f} s)")

    def close(self) -> None:
        pass


class EpochReport:
    """The reporters of one run, called in the order they were added."""

    def __init__(self, reporters: list[Reporter] | None = None):
        self.reporters: list[Reporter] = list(reporters or [])

    def add(self, reporter: Reporter) -> None:
        """One more destination (e.g. an experiment tracker)."""
        self.reporters.append(reporter)

    def step(self, step: int, loss: Tensor) -> None:
        for reporter in self.reporters:
            reporter.step(step, loss)

    def epoch(self, row: dict, view: EpochView) -> None:
        for reporter in self.reporters:
            reporter.epoch(row, view)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
