"""Where each epoch's row of metrics goes: the epoch report and its reporters.

The trainer builds the row (train loss, then what the model's kind measures on the test set, ...) and
hands it to the `EpochReport`, which passes it to each reporter in turn: `MetricsFile` (RUN/metrics.jsonl,
every row so far), `TensorBoardReport` (--tensorboard: training/tensorboard.py) and `ProgressLine` (the line
under the
progress bar). Another destination is one more reporter: a `Reporter` overriding what it needs of
`start`, `step`, `epoch`, `close` and `finish`, added with `EpochReport.add` or passed to
train(..., reporters=[...]); nothing else in the trainer changes. MLflow is one (tracking.MLflowTracker),
Ray Tune another (grid_ray.TuneReporter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..inference.program import Program
from ..models.kind import ModelKind
from .run_dir import METRICS, write_jsonl
from .tensorboard import Board


@dataclass(frozen=True)
class EpochView:
    """What a reporter may look at besides the row: the run's rows so far, the model and its kind, the
    test images and the run's seed."""

    metrics: list[dict]
    program: Program
    kind: ModelKind
    x: Tensor
    seed: int


@dataclass(frozen=True)
class RunView:
    """What a reporter is told when the run starts: its directory (made and locked, config.json written),
    its settings (a Config), the device, whether it continues a checkpoint, and the rows of the epochs
    before this session (a resumed run's; else none)."""

    out: Path
    config: Any
    device: torch.device
    resumed: bool
    metrics: list[dict]


class Reporter:
    """A destination of the epoch report; each method does nothing unless overridden. The trainer calls
    them in this order: start, then step and epoch as it trains, close once training has ended, finish
    once the run's files (figures, summary.json last) are written."""

    def start(self, run: RunView) -> None:
        """The run is ready to train (the end of the trainer's preparation; an InputError raised here ends
        the run before its first step, a new run's directory left empty)."""

    def step(self, step: int, loss: Tensor) -> None:
        """The loss of training step `step` (on the device: do not wait for it here)."""

    def epoch(self, row: dict, view: EpochView) -> None:
        """The row of an epoch that has just ended (its checkpoint written)."""

    def close(self) -> None:
        """Training has ended (the final evaluation is done)."""

    def finish(self, summary: dict) -> None:
        """summary.json, the run's last file, has been written with `summary`."""


class MetricsFile(Reporter):
    """RUN/metrics.jsonl, rewritten atomically with every row so far after each epoch."""

    def __init__(self, out: Path):
        self.path = Path(out) / METRICS

    def epoch(self, row: dict, view: EpochView) -> None:
        write_jsonl(self.path, view.metrics)


class TensorBoardReport(Reporter):
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
        # a conditional model's active units and pictures need its condition: the scalars only
        self.board.epoch(row, view.program, view.x, view.seed,
                         pictures=view.kind.latent and not view.kind.conditional)

    def close(self) -> None:
        self.board.close()


class ProgressLine(Reporter):
    """The line printed above the progress bar after each epoch: train loss, the kind's test measure."""

    def epoch(self, row: dict, view: EpochView) -> None:
        loss, tested, seconds = row["train_loss"], view.kind.epoch_line(row), row["seconds"]
        tqdm.write(f"epoch {row['epoch']}: train loss {loss:.2f}, {tested} ({seconds:.1f} s)")


class EpochReport:
    """The reporters of one run, called in the order they were added."""

    def __init__(self, reporters: list[Reporter] | None = None):
        self.reporters: list[Reporter] = list(reporters or [])

    @classmethod
    def of_run(cls, out: Path, tensorboard: bool, progress: bool,
               reporters: Sequence[Reporter] = ()) -> EpochReport:
        """A training run's report: metrics.jsonl, TensorBoard if asked for, the progress line if shown,
        then the caller's `reporters` (e.g. MLflow)."""
        return cls([MetricsFile(out), *([TensorBoardReport(out)] if tensorboard else []),
                    *([ProgressLine()] if progress else []), *reporters])

    def add(self, reporter: Reporter) -> None:
        """One more destination (e.g. an experiment tracker)."""
        self.reporters.append(reporter)

    def start(self, run: RunView) -> None:
        for reporter in self.reporters:
            reporter.start(run)

    def step(self, step: int, loss: Tensor) -> None:
        for reporter in self.reporters:
            reporter.step(step, loss)

    def epoch(self, row: dict, view: EpochView) -> None:
        for reporter in self.reporters:
            reporter.epoch(row, view)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()

    def finish(self, summary: dict) -> None:
        for reporter in self.reporters:
            reporter.finish(summary)
