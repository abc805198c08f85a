"""The SVI training loop. `Trainer(...)` prepares a run from its parts: where it computes (run_setup.py:
device, processes, CUDA graph), its directory locked and, resuming, its checkpoint (checkpoints.py), the
data and its batches (train_data.py), the model its kind builds and the optimizer (training_model.py), the
loss of each step (step_loss.py); `run()` trains epoch by epoch (`run_epoch`, each `step`, `end_epoch`)
and ends with `finish` (final.py: the final evaluation and figures); a reader follows it top to bottom.
What differs between kinds of model is asked of the run's kind (models/kind.py), early stopping is
early_stopping.py, and each epoch's row goes to the epoch report (epoch_report.py: metrics.jsonl,
TensorBoard, the progress line, and any reporter added to it, e.g. MLflow: tracking.py). A run draws
from random generators of its own, seeded with --seed (rng.RunRandomState): the caller's are left as
they were.

Training uses Pyro's ELBO as a differentiable loss and a torch optimizer over the model's parameters
(not pyro.optim). The loss of a step is -ELBO summed over the batch divided by the batch size: nats
per example, like every number this package reports. The model is pyro-vae's own VAE, built from the
config, or a user's own model/guide pair (program.py states the contract), whose parameters are the
tensors its param sites use.

A run survives interruption: a checkpoint (parameters, optimizer, every random-number state, position
inside the epoch, metrics) is written atomically at the end of every epoch, every `checkpoint_every`
minutes, and when SIGINT/SIGTERM arrives (after the current step). Resuming from any of them gives,
on CPU, bit-identical parameters and metrics to an uninterrupted run.

With a validation set (--validation-size) each epoch's row also holds the validation ELBO (and, for M2 and
the classifier, the validation accuracy); with --early-stop PATIENCE the parameters of the epoch with the
best value of the measure the kind watches (ModelKind.early_stop_metric: the validation ELBO; the accuracy
for M2 and the classifier) are kept in best.pt
(written like checkpoint.pt), training stops once PATIENCE epochs in a row have not beaten it (the
count and the best epoch live in the checkpoint, so a resumed run continues them), and the final
evaluation and figures describe the model in best.pt.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Config
from ..data import Dataset, UnreadableImage
from ..errors import TrainingError
from ..inference.estimators import check_analytic_kl
from ..inference.faults import NumericalFault, locate_nonfinite
from ..models.exemplar import leave_out
from ..models.kind import PAIR, ModelKind, model_kind
from ..models.vae import init_prior
from ..rng import RunRandomState, get_rng_state, set_rng_state, set_seed
from .checkpoints import TrainingDirectory, start_position
from .early_stopping import EarlyStopping
from .epoch_report import EpochReport, EpochView, Reporter, RunView
from .final import evaluate_trained, restore_best, save_figures
from .run_clock import RunClock
from .run_dir import CHECKPOINT, check_data_shape, config_record
from .run_setup import check_settings, start_processes, use_cuda_graph
from .step_loss import StepLoss, make_step
from .train_data import TrainingBatches, prepare_data, prepare_stream
from .training_model import TrainingModel, restore_optimizer

__all__ = ["Interrupted", "RunResult", "Trainer", "init_prior", "prepare_data", "train"]

POSTFIX_EVERY = 10  # steps between progress-bar loss updates
FAULT_CHECK_EVERY = 100  # steps between checks for a non-finite step (each waits for the device)


class Interrupted(TrainingError):
    """SIGINT or SIGTERM arrived; a checkpoint was written after the step in progress."""

    def __init__(self, signum: int, out: Path, step: int, resume: str):
        self.signum, self.out, self.step = signum, out, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                         f"saved; resume with: {resume}")


@dataclass
class RunResult:
    """Where a run was written and what it measured."""

    out: Path
    metrics: list[dict]
    summary: dict
    kind: ModelKind = PAIR  # the model's kind: what its summary holds (ModelKind.result_line)


@contextmanager
def _stop_requests(requested: list[int]):
    """Turn SIGINT/SIGTERM into a request to stop after the current step, recorded in `requested` (a
    one-item list holding the signal number, or 0); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(
    config: Config, out: str | Path | None = None, resume: bool = False, progress: bool = True,
    overwrite: bool = False, program: object | None = None, tensorboard: bool = False,
    reporters: Sequence[Reporter] = (),
) -> RunResult:
    """Train as `config` says and write the run directory (see DESIGN.md). The model is pyro-vae's own
    VAE built from the config or, with `program`, a user's own model/guide pair (an object with .model
    and .guide, or a Program), trained in place: an nn.Module pair is moved to the config's device,
    another must live there already. With resume=True, `out` is an existing run whose checkpoint is
    continued up to config.epochs (a pair's run: pass the same pair again, or one built the same way).
    With tensorboard=True, TensorBoard event files go to RUN/tensorboard/ (training/tensorboard.py).
    `reporters`
    (epoch_report.Reporter: tracking.MLflowTracker, grid_ray's Tune reporter) join the epoch report (the
    main process only): told when the run starts, of each epoch's row, and of summary.json."""
    return Trainer(config, out, resume, progress, overwrite, program, tensorboard, reporters).run()


class Trainer:
    """One training run. Everything it holds is made in __init__, which prepares the run in the order
    below (a failure leaves nothing half-written and releases the run directory); `run` trains and
    finishes. As it trains only the loop's position changes (epoch, batch in it and steps; the epoch's
    loss so far, its random state at the start, images and order; the metrics): with the model and the
    optimizer, what a checkpoint holds. It draws from random generators of its own (rng.RunRandomState):
    the caller's are as they were after __init__ and after run."""

    def __init__(self, config: Config, out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, overwrite: bool = False, program: object | None = None,
                 tensorboard: bool = False, reporters: Sequence[Reporter] = ()):
        # what differs between kinds of model: pyro-vae's own kind that config.model names, or a pair's
        self.kind: ModelKind = model_kind(config.model) if program is None else PAIR
        config = check_settings(config, self.kind, program is not None, tensorboard)
        self.ranks, self.device = start_processes(config)
        self.progress = progress and self.ranks.is_main
        self.cuda_graph = use_cuda_graph(config, self.kind, self.ranks, self.device)
        self.dir = TrainingDirectory(out, resume, overwrite, self.ranks.is_main, program is None)
        self.rng = RunRandomState(config.seed, self.device)  # seeded as the first block starts
        self.stop = [0]  # the signal that asked to stop after the current step, or 0
        self.reason: str | None = None  # why training ended (stop_reason), once it has
        with self.dir.starting(), self.rng:
            self.dir.open()
            state = self.dir.resumed_state(self.device, config.epochs)  # None: a new run
            stream, self.data = self._load_data(config, state)
            # a copy with what the kind reads off the data (e.g. the number of classes): recorded in
            # config.json, the model is rebuilt from it; the caller's Config is left as it was
            self.config = config = dataclasses.replace(config, **self.kind.derive(config, self.data))
            self.model = TrainingModel.build(self.kind, config, self.data, self.device, self.ranks.world_size,
                                             program)
            self.batches = TrainingBatches(self.data, stream, config, self.ranks, self.device)
            self.loss = StepLoss(self.kind, config, self.model, self.data, self.ranks, self.batches.n_batches,
                                 streamed=stream is not None, labelled=self.batches.labelled)
            self.kl_record = check_analytic_kl(config.estimator, self.model.program.model,
                                               self.model.program.guide, self.data.test_x,
                                               *self.kind.test_conditions(self.model.pair, self.data))
            self.optimizer = self.model.optimizer(config, self.cuda_graph)
            self.generator = torch.Generator(self.device).manual_seed(config.seed)
            self.epoch, self.batch, self.steps, self.metrics, self.epoch_total = \
                start_position(state, self.device, self.ranks.is_main)  # the loop's position
            self.early = EarlyStopping.of_run(config, state, self.kind.early_stop_metric)
            self.resumed_rng = None if state is None else self.ranks.rng_state(state)  # set at epoch start
            start_seconds = self._continue_or_start(state)
            self.report = EpochReport.of_run(self.out, tensorboard, self.progress, reporters) \
                if self.ranks.is_main else EpochReport()  # where each epoch's row goes
            if self.ranks.active:  # each process draws its own z; model and data order are the same in all
                set_seed(config.seed + self.ranks.rank, self.device)
            self.svi_step = make_step(self.loss, self.optimizer, config.clip_grad, self.device,
                                      self.cuda_graph)
            # the epoch in progress: its random state at the start, its images and its order of batches
            self.epoch_state, self.x_epoch, self.order = self.generator.get_state(), self.data.train_x, []
            self.clock = RunClock.resumed(state, start_seconds)  # this session's clocks start here
            self.report.start(RunView(self.out, config, self.device, state is not None, list(self.metrics)))

    @property
    def out(self) -> Path:
        """The run directory."""
        return self.dir.out

    def run(self) -> RunResult:
        """Every epoch left up to config.epochs, then finish; the run directory locked throughout."""
        with self.dir, self.rng:
            try:
                with _stop_requests(self.stop), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # we stop on NaN
                    while (reason := self.stop_reason()) is None:
                        self.run_epoch()
                    self.reason = reason
            except BaseException as err:
                self.dir.discard_unstarted(err)
                raise
            return self.finish()

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the step in progress, as SIGINT/SIGTERM `signum` does: a checkpoint is written and
        Interrupted raised (the CLI exits 128 + signum). Safe to call from another thread or a step hook."""
        self.stop[0] = signum

    # -- preparing the run ---------------------------------------------------------------------------

    def _load_data(self, config: Config, state: dict | None) -> tuple[object | None, Dataset]:
        """With --workers, the stream of training images read from disk, else None; the data on the
        device (a resumed run's must have the shape it was trained on)."""
        stream, data = prepare_stream(config) if config.workers else (None, prepare_data(config, self.kind))
        data = data.to(self.device)
        if state is not None:
            check_data_shape(self.out, data.shape)
        return stream, data

    def _continue_or_start(self, state: dict | None) -> float:
        """A resumed run: the checkpoint's parameters, optimizer and epoch's random state, and its
        metrics.jsonl. A new run: what the kind sets from the training data (the VampPrior's
        pseudo-inputs with --prior-init data, the CVAE's baseline trained first), the run directory and
        config.json. Returns the seconds the kind's start took (0 for a resumed run): they count in the
        run's train_seconds (run_clock.py)."""
        if state is not None:
            self.model.load(state, self.out / CHECKPOINT)
            restore_optimizer(self.optimizer, state, self.config.lr, self.cuda_graph)
            self.generator.set_state(state["epoch_generator"].cpu())
            self.dir.continue_run(self.metrics, self.steps)
            return 0.0
        started = time.perf_counter()
        if self.model.own:
            self.kind.start(self.model.pair, self.config, self.data)
        seconds = time.perf_counter() - started
        self.ranks.barrier()  # every process has checked the run directory before rank 0 fills it
        self.dir.start(config_record(self.config, self.data.shape, self.model.record()))
        return seconds

    # -- one epoch, one step -------------------------------------------------------------------------

    def run_epoch(self) -> None:
        """The steps of the current epoch from self.batch on (0, or where a checkpoint stopped), each
        followed by the checks and the checkpoints that are due; then end_epoch."""
        self._start_epoch()
        batches = self.batches.batches(self.x_epoch, self.order, self.batch, self.epoch, self._unreadable)
        bar = tqdm(zip(self.order[self.batch:], batches, strict=True), total=self.batches.n_batches,
                   initial=self.batch, disable=not self.progress, leave=False,
                   desc=f"epoch {self.epoch}/{self.config.epochs}")
        for idx, x in bar:
            loss = self.step(idx, x)
            if self.progress and self.batch % POSTFIX_EVERY == 1:
                bar.set_postfix(loss=f"{loss.item():.2f}")
            if self.steps % FAULT_CHECK_EVERY == 0:
                self._check_fault()
            due = self.clock.save_due(self.config.checkpoint_every)
            signum, due = self.ranks.agree(self.steps, self.stop[0], due)  # several processes: the same step
            if signum or due:
                self.checkpoint()
            if signum:
                raise Interrupted(signum, self.out, self.steps, self.dir.resume_hint())
        self.end_epoch()

    def _start_epoch(self) -> None:
        """Everything random in the epoch starts from the generator's state now: its images and order of
        batches; then a resumed run's random states are set as they were at its checkpoint."""
        self.clock.start_epoch()
        self.model.train_mode(True)
        self.epoch_state = self.generator.get_state()
        self.x_epoch, self.order = self.batches.epoch(self.generator)
        if self.resumed_rng is not None:
            set_rng_state(self.resumed_rng, self.device)
            self.resumed_rng = None

    def step(self, idx: Tensor, x: Tensor) -> Tensor:
        """One SVI step on x, this process's share of the global batch `idx`; returns its loss (-ELBO
        per example, on the device)."""
        args = self.loss.arguments(idx, x, self.steps)
        with leave_out(self.model.pair, self.ranks.shard(idx)):  # the exemplar prior skips each one's own
            loss = self.svi_step(x, args.weight, args.per, *args.inputs, **args.schedule)
        self.epoch_total += loss * args.per
        self.steps, self.batch = self.steps + 1, self.batch + 1
        self.report.step(self.steps, loss)
        return loss

    def end_epoch(self) -> None:
        """The epoch's row of metrics, the checkpoint at the next epoch's start, then the epoch report."""
        self._check_fault()
        self.model.train_mode(False)
        row = self._row()
        self.metrics.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_total = torch.zeros((), device=self.device)
        self.epoch_state = self.generator.get_state()  # where the next epoch starts
        self.checkpoint()
        self.report.epoch(row, EpochView(self.metrics, self.model.program, self.kind, self.data.test_x,
                                         self.config.seed))

    def _row(self) -> dict:
        """The epoch's row: train loss, what the kind measures on the test set, the schedule and KL weight
        (where not 1 throughout) of its last step, its seconds; with a validation set, the kind's
        validation measures (the ELBO; M2 and the classifier add the accuracy), of which early stopping
        counts the one it watches (best.pt keeps the best epoch's parameters and validation measures)."""
        last, config = self.steps - 1, self.config
        row = {"epoch": self.epoch, "step": self.steps,
               "train_loss": float(self.ranks.sum(self.epoch_total)) / self.batches.examples_per_epoch,
               **self.kind.test_metrics(self.model.program, self.data), **self.loss.schedule(last),
               "seconds": self.clock.epoch_seconds()}
        if config.beta != 1.0 or config.kl_anneal:
            row["kl_weight"] = self.loss.kl_weight(last)
        if self.data.val_x is not None:
            validation = self.validation_metrics()
            row.update(validation)
            if config.early_stop is not None and validation:
                if self.early.update(self.epoch, row[self.early.metric]):
                    self.dir.save_best({"model": self.model.state(), "epoch": self.epoch, "step": self.steps,
                                        **validation})
                row["best_epoch"] = self.early.best_epoch
        return row

    def validation_metrics(self) -> dict[str, float]:
        """The kind's measures of the validation set (the ELBO per example, one draw of z per example,
        unweighted KL; the accuracy of a labelled kind); with several processes, their means, so that all
        of them stop at the same epoch."""
        values = self.kind.validation_metrics(self.model.program, self.data)
        return {name: float(self.ranks.sum(v)) / self.ranks.world_size for name, v in values.items()}

    def stop_reason(self) -> str | None:
        """Why training ends before the next epoch: "epochs" (--epochs done), "early_stop" (--early-stop's
        patience ran out) or "time_budget" (--time-budget minutes of wall time, all sessions, spent); None
        while it goes on. Asked at epoch ends only, so the last epoch is always whole."""
        if self.epoch > self.config.epochs:
            return "epochs"
        if self.early.stopped():
            return "early_stop"
        budget = self.config.time_budget
        if budget is None:
            return None
        spent = int(self.elapsed() >= 60.0 * budget)
        # several processes stop at the same epoch end: as soon as one of their clocks is past the budget
        return "time_budget" if self.ranks.agree(0, spent)[0] else None

    def elapsed(self) -> float:
        """The run's wall time so far in seconds, summed over its sessions (run_clock.py)."""
        return self.clock.elapsed()

    # -- checkpoint, faults --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save everything needed to continue at (epoch, batch) exactly as if never stopped: the
        parameters (a pair's by param-store name), the optimizer, the position, the random state the
        epoch started from and every process's current one, the epoch's loss so far, the metrics,
        early stopping's count, the seconds."""
        self._check_fault()
        total, rng = self.ranks.sum(self.epoch_total), self.ranks.gather(get_rng_state(self.device))
        if self.ranks.is_main:
            self.dir.save({
                "model": self.model.state(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.steps, "epoch_generator": self.epoch_state,
                "epoch_total": total, "metrics": self.metrics, "rng": rng[0], "seconds": self.elapsed(),
                "epoch_seconds": self.clock.epoch_seconds() if self.batch else 0.0,
                **({"rng_ranks": rng} if self.ranks.active else {}),
                **self.early.record(),
            })
        self.clock.saved()

    def _check_fault(self) -> None:
        """Raise NumericalFault naming the first step of this epoch that was not applied, if any."""
        skipped = self.svi_step.fault(self.ranks.max)
        if not skipped:
            return
        idx, bad_step = self.order[self.batch - skipped], self.steps - skipped
        x = self.batches.again(self.x_epoch, idx)
        args = self.loss.arguments(idx, x, bad_step)
        with leave_out(self.model.pair, self.ranks.shard(idx)):  # the model as that step saw it
            loss = self.svi_step.gradients(x, args.weight, args.per, *args.inputs, **args.schedule)
        where = locate_nonfinite(self.model.program, self.model.params, x, loss, *args.inputs)
        raise NumericalFault(
            f"{where} at step {bad_step + 1} "
            f"(epoch {self.epoch}); this step was not applied and the last good checkpoint is in {self.out}. "
            f"Lower --lr (now {self.config.lr:g}) or clip gradients with --clip-grad (e.g. 10), then "
            f"continue with: {self.dir.resume_hint()} --lr ..."
        )

    def _unreadable(self, err: UnreadableImage) -> None:
        """A streamed image cannot be read: checkpoint after the last step (one process; with several,
        the others wait in the next all-reduce, so the last checkpoint stands) and say which file."""
        if not self.ranks.active:
            self.checkpoint()
        saved = "the last checkpoint is in" if self.ranks.active else "a checkpoint was saved in"
        raise TrainingError(f"{err} at step {self.steps + 1} (epoch {self.epoch}); {saved} {self.out}; "
                            "replace the file with a readable image (or delete it) and continue with: "
                            f"{self.dir.resume_hint()}") from None

    # -- finish --------------------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Rank 0 evaluates the trained model (with early stopping: the best one, from best.pt, left in
        the pair) on the test set as its kind says and writes the figures and summary.json, last; the
        other processes return once the last checkpoint is written."""
        self.ranks.barrier()
        if not self.ranks.is_main:
            return RunResult(self.out, self.metrics, {}, self.kind)
        best = {} if self.config.early_stop is None else \
            restore_best(self.dir, self.model, self.device, self.early.stopped())
        final = evaluate_trained(self.kind, self.model, self.data, self.config.eval_k, self.progress,
                                 self.out)
        summary = {**final, **self._record(), **best}
        self.report.close()
        save_figures(self.kind, self.model, self.data, self.out, self.metrics, self.config.seed)
        self.dir.write_summary(summary)  # last: a run stopped before it resumes to write them all
        self.report.finish(summary)  # e.g. MLflow logs summary.json and the figures
        return RunResult(self.out, self.metrics, summary, self.kind)

    def _record(self) -> dict:
        """What summary.json says of the training: epochs, steps, the last train loss, the seconds (all
        sessions), why it stopped, where it ran, and the analytic-KL sites (--estimator analytic)."""
        last = self.metrics[-1] if self.metrics else {}
        return {"epochs": last.get("epoch", 0), "steps": self.steps, "train_loss": last.get("train_loss"),
                "train_seconds": self.elapsed(), "stop_reason": self.reason,
                "time_budget_minutes": self.config.time_budget, "device": str(self.device),
                "processes": self.ranks.world_size, "cuda_graph": self.cuda_graph,
                "n_train": self.batches.n_train, **(self.kl_record or {})}
