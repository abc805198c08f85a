"""A training run's directory as the trainer holds it: locked from start to end (run_lock.py); a new run
checked, emptied and given its config.json; a resumed run's checkpoint read and the rules of resuming
(the same kind of model, more epochs to train); checkpoint.pt and best.pt written atomically; summary.json
written last. What the files hold is run_dir.py's contract; this is the trainer's side of it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, TrainingError
from .run_dir import (
    BEST,
    CHECKPOINT,
    CONFIG,
    METRICS,
    STALE,
    SUMMARY,
    check_run_dir,
    empty_directory,
    load_checkpoint,
    recorded_pair,
    remove_stale_temp_files,
    retire_results,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from .run_lock import run_lock


def start_position(state: dict | None, device: torch.device,
                   main: bool) -> tuple[int, int, int, list[dict], Tensor]:
    """Where training starts, checkpoint `state`'s position or a new run's (None): the next epoch and
    batch, the steps taken, the metrics so far and the epoch's loss so far (a sum over the processes,
    counted once: by the `main` process)."""
    total = torch.zeros((), device=device)
    if state is None:
        return 1, 0, 0, [], total
    if main:
        total = state["epoch_total"].to(device)
    return int(state["epoch"]), int(state["batch"]), int(state["step"]), list(state["metrics"]), total


class TrainingDirectory:
    """The directory one training run writes (`out`: a new one, or with resume=True the run to continue),
    locked by the main process from `open` to `close` (use it as a context manager). Only the main
    process (`main`) writes."""

    def __init__(self, out: str | Path | None, resume: bool, overwrite: bool, main: bool, own_model: bool):
        self.resume, self.overwrite, self.main, self.own_model = resume, overwrite, main, own_model
        self.out = Path(out) if out is not None else None
        self.lock = ExitStack()  # holds the run directory's lock from open to close
        self.fresh = False  # whether this run emptied (or made) its directory and wrote config.json

    def __enter__(self) -> TrainingDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (a new run's directory that the lock made and nothing filled goes with it)."""
        self.lock.close()

    @contextmanager
    def starting(self) -> Iterator[None]:
        """The run's preparation: if it fails, nothing half-written is left (discard_unstarted) and the
        directory is released."""
        try:
            yield
        except BaseException as err:
            self.discard_unstarted(err)
            self.close()
            raise

    def open(self) -> Path:
        """Find the directory and lock it: a new one (refused if it holds something, unless a run with
        overwrite), or the run to continue (a pair's run with a pair, pyro-vae's own without)."""
        if not self.resume:
            self.out = check_run_dir(self.out, self.overwrite)
            if self.main:  # made now if new, and removed again if start-up fails
                self.lock.enter_context(run_lock(self.out, create=True))
            return self.out
        if self.out is None:
            raise InputError("resume=True continues a run: pass its directory as out")
        if self.main:
            self.lock.enter_context(run_lock(self.out))
        recorded = recorded_pair(self.out)
        if recorded is not None and self.own_model:
            raise InputError(f"{self.out} trained your own model/guide pair ({recorded.get('name')}); to "
                             "continue it, pass the same pair again: train(config, out, resume=True, "
                             "program=pair)")
        if recorded is None and not self.own_model:
            raise InputError(f"{self.out} trained pyro-vae's own VAE, not a pair of yours; continue it "
                             f"without program= (or with: pyro-vae train --resume {self.out})")
        return self.out

    def resumed_state(self, device, epochs: int) -> dict | None:
        """The checkpoint to continue from (None for a new run), refused if it would not continue the run:
        fewer epochs than it has trained (it would stop mid-way and overwrite its summary), or as many
        when it has finished them; best.pt, if there is one, must be readable too (it is read at the end)."""
        if not self.resume:
            return None
        state = load_checkpoint(self.out / CHECKPOINT, device)
        done = int(state["epoch"]) - 1
        fewer = epochs < done or (epochs == done and int(state["batch"]) > 0)
        if fewer or (epochs == done and (self.out / SUMMARY).is_file()):
            part = " and part of the next" if int(state["batch"]) else ""
            raise InputError(f"{self.out} has already trained {done} epoch(s){part}; --epochs {epochs} would "
                             f"train nothing; the run was left as it was (pass --epochs {done + 1} or more "
                             "to continue it)")
        if (self.out / BEST).is_file():
            load_checkpoint(self.out / BEST, device)
        return state

    def start(self, record: dict) -> None:
        """A fresh run: the directory emptied (it holds a run only with overwrite; the lock made it if new)
        and config.json (`record`) written."""
        if not self.main:
            return
        empty_directory(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fresh = True
        write_json(self.out / CONFIG, record)

    def continue_run(self, metrics: list[dict], step: int) -> None:
        """A resumed run: temp files of a killed writer removed, metrics.jsonl as the checkpoint has it,
        and the result files of the model before this resume moved to RUN/stale/."""
        if not self.main:
            return
        remove_stale_temp_files(self.out)
        write_jsonl(self.out / METRICS, metrics)
        retired = retire_results(self.out)  # they describe the model before this resume
        if retired:
            warnings.warn(f"training continues: {len(retired)} result file(s) of the model at step "
                          f"{step} moved to {self.out / STALE} (evaluate again when it ends)", stacklevel=3)

    def save(self, state: dict) -> None:
        """checkpoint.pt (main process only)."""
        if self.main:
            save_checkpoint(self.out / CHECKPOINT, state)

    def save_best(self, state: dict) -> None:
        """best.pt (main process only): the parameters of the epoch with the best validation ELBO."""
        if self.main:
            save_checkpoint(self.out / BEST, state)

    def best(self, device) -> dict | None:
        """best.pt's state, or None where there is none."""
        return load_checkpoint(self.out / BEST, device) if (self.out / BEST).is_file() else None

    def write_summary(self, summary: dict) -> None:
        """summary.json, written last: a run stopped before it is resumed to write everything."""
        write_json(self.out / SUMMARY, summary)

    def discard_unstarted(self, err: BaseException) -> None:
        """A new run stopped (Ctrl-C, bad input) before its first checkpoint: empty its directory, so
        nothing half-written is left (the lock removes the directory it made). A TrainingError's
        message points at the directory, which stays."""
        if self.fresh and not isinstance(err, TrainingError) and not (self.out / CHECKPOINT).exists():
            empty_directory(self.out)

    def resume_hint(self) -> str:
        """How to continue this run."""
        if self.own_model:
            return f"pyro-vae train --resume {self.out}"
        return f"train(config, {str(self.out)!r}, resume=True, program=<the same pair>) in Python"
