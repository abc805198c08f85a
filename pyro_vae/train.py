"""The SVI training loop as a small trainer with named parts: `setup`, `run_epoch`, `step`,
`checkpoint`, `finish`. `train()` runs them in that order; a reader follows it top to bottom.

Training uses Pyro's ELBO as a differentiable loss and a torch optimizer over the model's parameters
(not pyro.optim). The loss of a step is -ELBO summed over the batch divided by the batch size: nats
per example, like every number this package reports. The model is pyro-vae's own VAE, built from the
config, or a user's own model/guide pair (program.py states the contract), whose parameters are the
tensors its param sites use.

A run survives interruption: a checkpoint (parameters, optimizer, every random-number state, position
inside the epoch, metrics) is written atomically at the end of every epoch, every `checkpoint_every`
minutes, and when SIGINT/SIGTERM arrives (after the current step). Resuming from any of them gives,
on CPU, bit-identical parameters and metrics to an uninterrupted run.

With a validation set (--validation-size) each epoch's row also holds the validation ELBO; with
--early-stop PATIENCE the parameters of the epoch with the best validation ELBO are kept in best.pt
(written like checkpoint.pt), training stops once PATIENCE epochs in a row have not beaten it (the
count and the best epoch live in the checkpoint, so a resumed run continues them), and the final
evaluation and figures describe the model in best.pt.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, plots
from .board import Board
from .board import check_available as check_tensorboard
from .config import LABELLED_MODELS, Config
from .data import Dataset, UnreadableImage, batch_indices, binarize
from .device import resolve_device
from .discrete import make_discrete_estimator, temperature
from .errors import InputError, TrainingError
from .estimators import check_analytic_kl, make_estimator
from .evaluate import elbo_terms, evaluate, test_accuracy
from .exemplar import EAGER_PRIORS, leave_out, use_training_set
from .faults import NumericalFault, locate_nonfinite
from .kl_weight import kl_weight, scale_latents
from .m2 import UNLABELLED
from .model import VAE
from .nets import he_init
from .optim import make_optimizer
from .program import Program
from .rng import forked_rng, get_rng_state, set_rng_state
from .run_dir import (
    BEST,
    CHECKPOINT,
    CONFIG,
    METRICS,
    STALE,
    SUMMARY,
    build_from_config,
    check_data_shape,
    check_run_dir,
    config_record,
    describe_pair,
    empty_directory,
    load_checkpoint,
    load_parameters,
    pair_parameters,
    recorded_pair,
    remove_stale_temp_files,
    restore_parameters,
    retire_results,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from .run_lock import run_lock
from .step import CUDAGraphStep, SVIStep
from .train_data import n_classes, prepare_data, prepare_stream, stop_on_unreadable, streamed

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


def init_prior(vae: VAE, config: Config, data: Dataset) -> None:
    """With --prior-init data, start the VampPrior's pseudo-inputs at random training examples; with
    --prior-init authors, draw them from N(0.05, 0.01^2) as the authors' code does."""
    if config.prior_init == "data":
        vae.prior.init_from(data.train_x, torch.Generator().manual_seed(config.seed))
    elif config.prior_init == "authors":
        vae.prior.init_normal(torch.Generator().manual_seed(config.seed))


def init_weights(module: nn.Module, config: Config) -> None:
    """With --weight-init he, draw every linear layer's weights He-normal (nets.he_init)."""
    if config.weight_init == "he":
        he_init(module)


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
    reporters: Sequence[object] = (),
) -> RunResult:
    """Train as `config` says and write the run directory (see DESIGN.md). The model is pyro-vae's own
    VAE built from the config or, with `program`, a user's own model/guide pair (an object with .model
    and .guide, or a Program), trained in place: an nn.Module pair is moved to the config's device,
    another must live there already. With resume=True, `out` is an existing run whose checkpoint is
    continued up to config.epochs (a pair's run: pass the same pair again, or one built the same way).
    With tensorboard=True, TensorBoard event files go to RUN/tensorboard/ (board.py). Each of `reporters`
    (tracking.MLflowTracker, grid_ray's Tune reporter) is called with the trainer: .start(trainer) once the
    run directory is ready, .epoch(trainer, row) after each epoch's checkpoint and metrics.jsonl,
    .finish(trainer, summary) after summary.json (rank 0 only)."""
    return Trainer(config, out, resume, progress, overwrite, program, tensorboard, reporters).run()


class Trainer:
    """One training run. Its state (the position: epoch, steps, batch in the epoch; the metrics; the
    random state the epoch started from) lives in attributes, so each part reads what the parts
    before it set; `run` calls setup, then run_epoch per epoch (each calling step per batch and
    checkpoint when due), then finish."""

    def __init__(self, config: Config, out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, overwrite: bool = False, program: object | None = None,
                 tensorboard: bool = False, reporters: Sequence[object] = ()):
        self.config, self.resume, self.progress = config, resume, progress
        self.reporters = list(reporters)  # start / epoch / finish, on rank 0 (train's docstring)
        self.tensorboard, self.board, self.step_losses = tensorboard, None, []
        self.out, self.overwrite = Path(out) if out is not None else None, overwrite
        # the pair trained: the user's as given, or (None until setup) pyro-vae's VAE
        self.pair, self.own_vae = program, program is None
        self.epoch, self.steps, self.batch, self.metrics = 1, 0, 0, []
        self.stop = [0]  # the signal that asked to stop after the current step, or 0
        # early stopping: {"best_epoch", "best_validation_elbo", "epochs_since_best"}, None before epoch 1
        self.early: dict | None = None
        # wall time of the run's earlier sessions (a resumed run's checkpoint): in all, and in the epoch
        # the checkpoint stopped in; this session's clock starts at the end of setup
        self.seconds_before, self.epoch_seconds_before, self.epoch_started = 0.0, 0.0, 0.0
        self.lock = ExitStack()  # holds the run directory's lock (run_lock.py) from setup to the end
        self.fresh = False  # whether this run emptied (or made) its directory and wrote config.json
        self.reason: str | None = None  # why training ended (stop_reason), once it has

    def run(self) -> RunResult:
        """setup, every epoch left up to config.epochs, finish; the run directory locked throughout."""
        with self.lock:
            try:
                self.setup()
                with _stop_requests(self.stop), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # we stop on NaN
                    while (reason := self.stop_reason()) is None:
                        self.run_epoch()
                    self.reason = reason
            except BaseException as err:
                self._discard_unstarted(err)
                raise
            return self.finish()

    def _discard_unstarted(self, err: BaseException) -> None:
        """A new run stopped (Ctrl-C, bad input) before its first checkpoint: empty its directory, so
        nothing half-written is left (the lock removes the directory it made). A TrainingError's
        message points at the directory, which stays."""
        if self.fresh and not isinstance(err, TrainingError) and not (self.out / CHECKPOINT).exists():
            empty_directory(self.out)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the step in progress, as SIGINT/SIGTERM `signum` does: a checkpoint is written and
        Interrupted raised (the CLI exits 128 + signum). Safe to call from another thread or a step hook."""
        self.stop[0] = signum

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Processes and device, data, the model and its optimizer, and the training step; then the
        checkpoint to continue from (resume) or a fresh run directory."""
        config = self.config
        config.validate()
        if self.tensorboard:
            check_tensorboard()  # before anything is written
        self.ranks, self.device = distributed.start(resolve_device(config.device))
        self.progress = self.progress and self.ranks.is_main
        self._check_run()
        state = load_checkpoint(self.out / CHECKPOINT, self.device) if self.resume else None
        if state is not None:
            self._check_epochs(state)
            if (self.out / BEST).is_file():  # read at the end: refused now if it cannot be
                load_checkpoint(self.out / BEST, self.device)
        pyro.set_rng_seed(config.seed)
        self.stream, data = prepare_stream(config) if config.workers else (None, prepare_data(config))
        self.data = data.to(self.device)
        if state is not None:
            check_data_shape(self.out, self.data.shape)
        if config.model in LABELLED_MODELS and config.classes is None:
            config.classes = n_classes(self.data)  # recorded in config.json: the model is rebuilt from it
        self.labels = self.data.train_y if config.model in LABELLED_MODELS else None
        self._build_model()
        self.elbo = (make_discrete_estimator(config.discrete) if config.model == "m2"
                     else make_estimator(config.estimator, config.particles))
        self.kl_record = check_analytic_kl(config.estimator, self.program.model, self.program.guide,
                                           self.data.test_x)
        self.optimizer = make_optimizer(config.optimizer, self.params.values(), lr=config.lr, fused=True,
                                        capturable=self.cuda_graph)  # state on the device, as a graph needs
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.epoch_total = torch.zeros((), device=self.device)
        self.resumed_rng = None  # this process's random state at the checkpoint, set once its epoch starts
        if state is not None:
            self._continue_from(state)
        else:
            self._start_run_dir()
        if self.tensorboard and self.ranks.is_main:
            self.board = Board(self.out)
        if self.ranks.active:  # each process draws its own z; model and data order are the same in all
            pyro.set_rng_seed(config.seed + self.ranks.rank)
        self.n_train = len(self.stream) if self.stream else self.data.train_x.shape[0]
        self.n_batches = (math.ceil(self.n_train / config.batch_size)
                          - self.ranks.drops_last(self.n_train, config.batch_size))
        module = self.pair if self.own_vae else self.program.owner  # DDP averages its gradients
        self.svi_step = SVIStep(self.ranks.data_parallel(self._loss, module, self.device), self.optimizer,
                                list(self.params.values()), config.clip_grad, self.device)
        if self.cuda_graph:
            self.svi_step = CUDAGraphStep(self.svi_step)
        self.started = self.last_save = time.perf_counter()
        self.reporters = self.reporters if self.ranks.is_main else []
        for reporter in self.reporters:
            reporter.start(self)

    def _check_run(self) -> None:
        """Refuse what this run cannot do (more processes than examples in a batch, a CUDA graph off a
        single GPU, a pair with settings of pyro-vae's VAE) and find its directory: a new one, or the
        run to continue (a pair's run with the pair, the VAE's without)."""
        config, ranks, device = self.config, self.ranks, self.device
        if config.batch_size < ranks.world_size:
            raise InputError(f"--batch-size {config.batch_size} is the global batch, shared by "
                             f"{ranks.world_size} processes; make it at least the number of processes")
        if config.cuda_graph == "on" and (device.type != "cuda" or ranks.active):
            raise InputError("--cuda-graph on needs a CUDA GPU and a single process; "
                             f"this run has {device.type} and {ranks.world_size} process(es): leave it off")
        if not self.own_vae:
            config.check_for_pair()
        # auto: the graph where it is known to hold (our own VAE, one GPU, one process: measured equal to
        # eager and 10x faster, docs/scaling.md); a user's pair only when asked for
        if config.cuda_graph == "on" and config.model in LABELLED_MODELS:
            raise InputError(f"--cuda-graph on captures the VAE's step; --model {config.model} runs eagerly: "
                             "leave --cuda-graph at auto or off")
        self.cuda_graph = config.cuda_graph == "on" or (
            config.cuda_graph == "auto" and self.own_vae and device.type == "cuda" and not ranks.active
            and config.model not in LABELLED_MODELS and config.prior not in EAGER_PRIORS)
        if not self.resume:
            self.out = check_run_dir(self.out, self.overwrite)
            if ranks.is_main:  # made now if new, and removed again if start-up fails
                self.lock.enter_context(run_lock(self.out, create=True))
            return
        if self.out is None:
            raise InputError("resume=True continues a run: pass its directory as out")
        if ranks.is_main:
            self.lock.enter_context(run_lock(self.out))
        recorded = recorded_pair(self.out)
        if recorded is not None and self.own_vae:
            raise InputError(f"{self.out} trained your own model/guide pair ({recorded.get('name')}); to "
                             "continue it, pass the same pair again: train(config, out, resume=True, "
                             "program=pair)")
        if recorded is None and not self.own_vae:
            raise InputError(f"{self.out} trained pyro-vae's own VAE, not a pair of yours; continue it "
                             f"without program= (or with: pyro-vae train --resume {self.out})")

    def _check_epochs(self, state: dict) -> None:
        """Refuse a resume that would not continue the run: fewer epochs than it has trained (it would
        stop mid-way and overwrite its summary), or as many when it has finished them."""
        done, epochs = int(state["epoch"]) - 1, self.config.epochs
        fewer = epochs < done or (epochs == done and int(state["batch"]) > 0)
        if fewer or (epochs == done and (self.out / SUMMARY).is_file()):
            part = " and part of the next" if int(state["batch"]) else ""
            raise InputError(f"{self.out} has already trained {done} epoch(s){part}; --epochs {epochs} would "
                             f"train nothing; the run was left as it was (pass --epochs {done + 1} or more "
                             "to continue it)")

    def _build_model(self) -> None:
        """pyro-vae's VAE from the config, or the user's pair moved to the device; the pair as a
        Program with its sites (found by tracing), and the tensors the optimizer steps, by name."""
        x = self.data.test_x
        if self.own_vae:
            self.pair = build_from_config(self.config, self.data.shape).to(self.device)
            use_training_set(self.pair, self.data.train_x)  # the exemplar prior's exemplars (exemplar.py)
        self.program = Program.of(self.pair)
        owner = self.program.owner
        if not self.own_vae and self.ranks.active and not isinstance(owner, nn.Module):
            raise InputError("several processes (torchrun) average the gradients of an nn.Module's "
                             "parameters; make your model/guide pair an nn.Module, or train in one process")
        if isinstance(owner, nn.Module):
            owner.to(self.device)
        # the sites and parameters are found by tracing once, in eval mode (no batch statistics change),
        # without drawing from the run's random stream (a run replays exactly)
        self._train_mode(False)
        with forked_rng(self.device):
            self.sites = None if self.program.is_classifier else self.program.sites(x)
            params = dict(self.pair.named_parameters()) if self.own_vae else pair_parameters(self.program, x)
        self.params = {name: p for name, p in params.items() if p.requires_grad}

    def _continue_from(self, state: dict) -> None:
        """Restore parameters, optimizer, position, the epoch's random state and metrics."""
        if self.own_vae:
            load_parameters(self.pair, state["model"], self.out / CHECKPOINT)
        else:
            restore_parameters(self.params, state["model"], self.out / CHECKPOINT)
        for group in state["optimizer"]["param_groups"]:  # --lr and --cuda-graph may change on resume;
            group.update(lr=self.config.lr, fused=True,  # older runs used plain Adam
                         capturable=self.cuda_graph)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.steps, self.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        self.generator.set_state(state["epoch_generator"].cpu())
        if self.ranks.is_main:  # the epoch's loss so far (summed over processes) is counted once
            self.epoch_total = state["epoch_total"].to(self.device)
        self.metrics = list(state["metrics"])
        self.early = state.get("early_stop")
        # checkpoints before pyro-vae recorded the seconds: the sum of their whole epochs' seconds
        self.seconds_before = float(state.get("seconds", sum(m.get("seconds") or 0.0 for m in self.metrics)))
        self.epoch_seconds_before = float(state.get("epoch_seconds", 0.0))
        self.resumed_rng = self.ranks.rng_state(state)
        if self.ranks.is_main:
            remove_stale_temp_files(self.out)
            write_jsonl(self.out / METRICS, self.metrics)
            retired = retire_results(self.out)  # they describe the model before this resume
            if retired:
                warnings.warn(f"training continues: {len(retired)} result file(s) of the model at step "
                              f"{self.steps} moved to {self.out / STALE} (evaluate again when it ends)",
                              stacklevel=2)

    def _start_run_dir(self) -> None:
        """A fresh run: the VampPrior's pseudo-inputs (--prior-init data), the run directory and
        config.json."""
        if self.own_vae:
            init_weights(self.pair, self.config)
            init_prior(self.pair, self.config, self.data)
        self.ranks.barrier()  # every process has checked the run directory before rank 0 fills it
        if self.ranks.is_main:
            empty_directory(self.out)  # holds a run only with --overwrite; the lock made it if new
            self.out.mkdir(parents=True, exist_ok=True)
            self.fresh = True
            pair = None if self.own_vae else describe_pair(self.program, self.sites)
            write_json(self.out / CONFIG, config_record(self.config, self.data.shape, pair))

    # -- one epoch, one step -------------------------------------------------------------------------

    def run_epoch(self) -> None:
        """The steps of the current epoch from self.batch on (0, or where a checkpoint stopped), each
        followed by the checks and the checkpoints that are due; then end_epoch."""
        config, ranks = self.config, self.ranks
        started = self.epoch_started = time.perf_counter() - self.epoch_seconds_before  # a resumed epoch's
        self.epoch_seconds_before = 0.0  # seconds before the checkpoint count in it
        self._train_mode(True)
        self.epoch_state = self.generator.get_state()  # everything random in this epoch starts here
        self.x_epoch = binarize(self.data.train_x, self.generator) if config.binarize == "dynamic" \
            else self.data.train_x
        order = list(batch_indices(self.n_train, config.batch_size, self.generator, self.device))
        self.order = order[:self.n_batches]  # with several processes, a last batch too small to share goes
        if self.resumed_rng is not None:  # resuming: random states as they were at the checkpoint
            set_rng_state(self.resumed_rng, self.device)
            self.resumed_rng = None
        bar = tqdm(zip(self.order[self.batch:], self._batches(), strict=True), total=self.n_batches,
                   initial=self.batch, disable=not self.progress, desc=f"epoch {self.epoch}/{config.epochs}",
                   leave=False)
        for idx, x in bar:
            loss = self.step(idx, x)
            if self.progress and self.batch % POSTFIX_EVERY == 1:
                bar.set_postfix(loss=f"{loss.item():.2f}")
            if self.steps % FAULT_CHECK_EVERY == 0:
                self._check_fault()
            minutes = (time.perf_counter() - self.last_save) / 60
            due = bool(config.checkpoint_every) and minutes > config.checkpoint_every
            signum, due = ranks.agree(self.steps, self.stop[0], due)  # several processes: the same step
            if signum:
                self.checkpoint()
                raise Interrupted(signum, self.out, self.steps, self._resume_hint())
            if due:
                self.checkpoint()
                self.last_save = time.perf_counter()
        self.end_epoch(started)

    def step(self, idx: Tensor, x: Tensor) -> Tensor:
        """One SVI step on x, this process's share of the global batch `idx`; returns its loss (-ELBO
        per example, on the device)."""
        per = len(idx) / self.ranks.world_size
        if self.config.discrete == "relaxed":
            self.pair.temperature = self._temperature(self.steps)
        with leave_out(self.pair, self.ranks.shard(idx)):  # the exemplar prior skips each example's own
            loss = self.svi_step(x, self._kl_weight(self.steps), per, *self._labels(idx))
        self.epoch_total += loss * per
        self.steps, self.batch = self.steps + 1, self.batch + 1
        if self.board is not None:
            self.step_losses.append(loss.detach())  # written at the epoch's end: no host sync here
        return loss

    def end_epoch(self, started: float) -> None:
        """The epoch's row of metrics (train loss, test ELBO), then the checkpoint at the next epoch's
        start and metrics.jsonl."""
        self._check_fault()
        self._train_mode(False)
        row = {"epoch": self.epoch, "step": self.steps,
               "train_loss": float(self.ranks.sum(self.epoch_total)) / self.n_train}
        if not self.program.is_classifier:
            test = elbo_terms(self.program.model, self.program.guide, self.data.test_x)
            row["test_elbo"] = None if self.program.is_autoencoder else float(test["elbo"].mean())
            row["test_recon"] = float(test["recon"].mean())
        if self.labels is not None:
            row["test_accuracy"] = test_accuracy(self.pair, self.data)[0]
        if self.config.discrete == "relaxed":
            row["temperature"] = self._temperature(self.steps - 1)
        row["seconds"] = time.perf_counter() - started
        if self.config.beta != 1.0 or self.config.kl_anneal:
            row["kl_weight"] = self._kl_weight(self.steps - 1)  # that of the epoch's last step
        if self.data.val_x is not None and not self.program.is_classifier:
            row["validation_elbo"] = self.validation_elbo()
            if self.config.early_stop is not None:
                self._track_best(row["validation_elbo"])
                row["best_epoch"] = self.early["best_epoch"]
        self.metrics.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_total = torch.zeros((), device=self.device)
        self.epoch_state = self.generator.get_state()  # where the next epoch starts
        self.checkpoint()
        self.last_save = time.perf_counter()
        if self.ranks.is_main:
            write_jsonl(self.out / METRICS, self.metrics)
        if self.board is not None:
            self.board.steps(self.steps, self.step_losses)
            self.step_losses = []
            self.board.epoch(row, self.program, self.data.test_x, self.config.seed)
        if self.progress:
            tested = (f"test accuracy {row['test_accuracy']:.4f}" if self.program.is_classifier else
                      f"test reconstruction log p(x|z) {row['test_recon']:.2f}" if self.program.is_autoencoder
                      else f"test ELBO {row['test_elbo']:.2f}")
            tqdm.write(f"epoch {row['epoch']}: train loss {row['train_loss']:.2f}, {tested} nats "
                       f"({row['seconds']:.1f} s)")
        for reporter in self.reporters:
            reporter.epoch(self, row)

    def validation_elbo(self) -> float:
        """The ELBO per example on the validation set (one draw of z per example; unweighted KL); with
        several processes, their mean, so that all of them stop at the same epoch."""
        value = elbo_terms(self.program.model, self.program.guide, self.data.val_x)["elbo"].mean()
        return float(self.ranks.sum(value)) / self.ranks.world_size

    def _track_best(self, value: float) -> None:
        """Early stopping's bookkeeping at the end of an epoch whose validation ELBO is `value`: a new
        best resets the count and is written to best.pt; otherwise the count of epochs since grows (with
        --early-stop-rule authors it is set back to 0 while the epoch is inside the KL warm-up, epoch <
        --kl-anneal, as the authors' loop does)."""
        if self.early is None or value > self.early["best_validation_elbo"]:
            self.early = {"best_epoch": self.epoch, "best_validation_elbo": value, "epochs_since_best": 0}
            if self.ranks.is_main:
                save_checkpoint(self.out / BEST, {"model": self._parameters(), "epoch": self.epoch,
                                                  "step": self.steps, "validation_elbo": value})
        else:
            self.early["epochs_since_best"] += 1
            if self.config.early_stop_rule == "authors" and self.epoch < self.config.kl_anneal:
                self.early["epochs_since_best"] = 0  # the authors' count stays 0 while the warm-up lasts

    def stop_reason(self) -> str | None:
        """Why training ends before the next epoch: "epochs" (--epochs done), "early_stop" (--early-stop's
        patience ran out) or "time_budget" (--time-budget minutes of wall time, all sessions, spent); None
        while it goes on. Asked at epoch ends only, so the last epoch is always whole."""
        if self.epoch > self.config.epochs:
            return "epochs"
        if self.stopped_early():
            return "early_stop"
        budget = self.config.time_budget
        if budget is None:
            return None
        spent = int(self.elapsed() >= 60.0 * budget)
        # several processes stop at the same epoch end: as soon as one of their clocks is past the budget
        return "time_budget" if self.ranks.agree(0, spent)[0] else None

    def stopped_early(self) -> bool:
        """Whether --early-stop PATIENCE epochs in a row have not beaten the best validation ELBO (with
        --early-stop-rule authors, PATIENCE + 1: the authors' loop stops once its count exceeds PATIENCE)."""
        patience = self.config.early_stop
        if patience is not None and self.config.early_stop_rule == "authors":
            patience += 1  # the authors' code stops once the count exceeds the patience
        return patience is not None and self.early is not None and self.early["epochs_since_best"] >= patience

    def _parameters(self) -> dict[str, Tensor]:
        """The trained parameters as checkpoints hold them (a pair's by param-store name)."""
        return self.pair.state_dict() if self.own_vae else {n: p.detach() for n, p in self.params.items()}

    def _loss(self, x: Tensor, weight: float, per: float, *labels: Tensor) -> Tensor:
        """-ELBO with KL weight `weight` on every latent site, summed over the examples of x, divided by
        `per`: the examples in x, or with W processes, those in the step's global batch divided by W.
        `labels` (M2, the classifier) go to model and guide after x."""
        if self.sites is None:  # nothing latent to weight
            return self.elbo.differentiable_loss(self.program.model, self.program.guide, x, *labels) / per
        latent = self.sites.latent
        model, guide = (scale_latents(fn, weight, latent) for fn in (self.program.model, self.program.guide))
        return self.elbo.differentiable_loss(model, guide, x, *labels) / per

    def _labels(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The labels of this process's share of batch `idx` (UNLABELLED where none), as the one extra
        argument of model and guide; () for a model without labels."""
        return () if self.labels is None else (self.labels[self.ranks.shard(idx)],)

    def _temperature(self, step: int) -> float:
        """The Gumbel-softmax temperature of step `step` (--discrete relaxed)."""
        return temperature(self.config.temperature, self.config.temperature_final, step,
                           self.config.epochs * self.n_batches)

    def _kl_weight(self, step: int) -> float:
        """The KL weight of step `step` (counted from 0 over the whole run)."""
        return kl_weight(self.config.beta, self.config.kl_anneal, step, self.n_batches)

    def _batches(self):
        """This process's share of each batch of the epoch's order from self.batch on: rows of the
        training images on the device, or read by the stream's workers."""
        if self.stream is None:
            return (self.x_epoch[self.ranks.shard(idx)] for idx in self.order[self.batch:])
        key = (self.config.seed, self.epoch, self.ranks.rank) if self.config.binarize == "dynamic" else None
        batches = streamed(self.stream, self.order, self.batch, self.ranks, self.device, key)
        return stop_on_unreadable(batches, self._unreadable)

    def _train_mode(self, training: bool) -> None:
        """Dropout and the like on (training) or off, where the pair is an nn.Module."""
        module = self.pair if self.own_vae else self.program.owner
        if isinstance(module, nn.Module):
            module.train(training)

    # -- checkpoint, faults --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save everything needed to continue at (epoch, batch) exactly as if never stopped: the
        parameters (a pair's by param-store name), the optimizer, the position, the random state the
        epoch started from and every process's current one, the epoch's loss so far, the metrics."""
        self._check_fault()
        total, rng = self.ranks.sum(self.epoch_total), self.ranks.gather(get_rng_state(self.device))
        if not self.ranks.is_main:
            return
        save_checkpoint(self.out / CHECKPOINT, {
            "model": self._parameters(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
            "batch": self.batch, "step": self.steps, "epoch_generator": self.epoch_state,
            "epoch_total": total, "metrics": self.metrics, "rng": rng[0], "seconds": self.elapsed(),
            "epoch_seconds": time.perf_counter() - self.epoch_started if self.batch else 0.0,
            **({"rng_ranks": rng} if self.ranks.active else {}),
            **({"early_stop": dict(self.early)} if self.early is not None else {}),
        })

    def elapsed(self) -> float:
        """The run's wall time so far in seconds, summed over its sessions (a checkpoint carries the sum
        up to it): each session from the end of its setup to its last checkpoint (the last session: to
        summary.json), so epochs, their test ELBO, checkpoints and the final evaluation count; setup,
        figures, a session's time after its last checkpoint and the time between sessions do not."""
        return self.seconds_before + time.perf_counter() - self.started

    def _check_fault(self) -> None:
        """Raise NumericalFault naming the first step of this epoch that was not applied, if any."""
        skipped = self.svi_step.fault(self.ranks.max)
        if not skipped:
            return
        idx, bad_step = self.order[self.batch - skipped], self.steps - skipped
        x = self.x_epoch[self.ranks.shard(idx)] if self.stream is None else \
            next(streamed(self.stream, [idx], 0, self.ranks, self.device, None))  # read again, not binarized
        per = len(idx) / self.ranks.world_size
        # the model as that step saw it
        loss = self.svi_step.gradients(x, self._kl_weight(bad_step), per, *self._labels(idx))
        raise NumericalFault(
            f"{locate_nonfinite(self.program, self.params, x, loss)} at step {bad_step + 1} (epoch "
            f"{self.epoch}); this step was not applied and the last good checkpoint is in {self.out}. "
            f"Lower --lr (now {self.config.lr:g}) or clip gradients with --clip-grad (e.g. 10), then "
            f"continue with: {self._resume_hint()} --lr ..."
        )

    def _unreadable(self, err: UnreadableImage) -> None:
        """A streamed image cannot be read: checkpoint after the last step (one process; with several,
        the others wait in the next all-reduce, so the last checkpoint stands) and say which file."""
        if not self.ranks.active:
            self.checkpoint()
        saved = "the last checkpoint is in" if self.ranks.active else "a checkpoint was saved in"
        raise TrainingError(f"{err} at step {self.steps + 1} (epoch {self.epoch}); {saved} {self.out}; "
                            "replace the file with a readable image (or delete it) and continue with: "
                            f"{self._resume_hint()}") from None

    def _resume_hint(self) -> str:
        """How to continue this run."""
        if self.own_vae:
            return f"pyro-vae train --resume {self.out}"
        return f"train(config, {str(self.out)!r}, resume=True, program=<the same pair>) in Python"

    # -- finish --------------------------------------------------------------------------------------

    def _restore_best(self) -> dict:
        """With early stopping, load best.pt's parameters into the pair and say what they are (for
        summary.json: best_epoch, its validation ELBO, whether training stopped early); else {}."""
        if self.config.early_stop is None or not (self.out / BEST).is_file():
            return {}
        state = load_checkpoint(self.out / BEST, self.device)
        if self.own_vae:
            load_parameters(self.pair, state["model"], self.out / BEST)
        else:
            restore_parameters(self.params, state["model"], self.out / BEST)
        return {"best_epoch": int(state["epoch"]), "best_step": int(state["step"]),
                "best_validation_elbo": float(state["validation_elbo"]),
                "stopped_early": self.stopped_early()}

    def finish(self) -> RunResult:
        """Rank 0 evaluates the trained model (with early stopping: the best one, from best.pt, left in
        the pair) on the test set (ELBO, log p(x), ...) and writes summary.json and the figures; the
        other processes return once the last checkpoint is written."""
        self.ranks.barrier()
        if not self.ranks.is_main:
            return RunResult(self.out, self.metrics, {})
        self._train_mode(False)
        best = self._restore_best()
        final = {} if self.program.is_classifier else evaluate(self.pair, self.data.test_x,
                                                                k=self.config.eval_k, progress=self.progress)
        if self.labels is not None:
            final["test_accuracy"], final["test_accuracy_se"] = test_accuracy(self.pair, self.data)
            final["labels"] = int((self.labels != UNLABELLED).sum())
        summary = {
            **final,
            "epochs": self.metrics[-1]["epoch"] if self.metrics else 0,
            "steps": self.steps,
            "train_loss": self.metrics[-1]["train_loss"] if self.metrics else None,
            "train_seconds": self.elapsed(),
            "stop_reason": self.reason,
            "time_budget_minutes": self.config.time_budget,
            "device": str(self.device),
            "processes": self.ranks.world_size,
            "cuda_graph": self.cuda_graph,
            "n_train": self.n_train,
            **(self.kl_record or {}),
            **best,
        }
        if self.board is not None:
            self.board.close()
        if not self.program.is_classifier:
            plots.save_figures(self.pair, self.data, self.out, self.metrics, seed=self.config.seed)
        write_json(self.out / SUMMARY, summary)  # last: a run stopped before it resumes to write them all
        for reporter in self.reporters:
            reporter.finish(self, summary)
        return RunResult(self.out, self.metrics, summary)
