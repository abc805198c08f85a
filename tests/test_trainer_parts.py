"""The trainer in parts: a reporter added to the epoch report gets every epoch's row (what an experiment
tracker would do), early stopping's bookkeeping on its own, and a Trainer that holds its run directory
from __init__ (prepared there) to the end of run()."""

import importlib
import json
import os

import pytest

from pyro_vae import Config
from pyro_vae.early_stopping import EarlyStopping
from pyro_vae.errors import InputError
from pyro_vae.run_lock import holder
from pyro_vae.train import Trainer

SMALL = {"train_size": 100, "test_size": 30, "hidden": [8], "z_dim": 2, "epochs": 2, "eval_k": 3}


class Recorder:
    """A reporter that keeps what it is given."""

    def __init__(self):
        self.steps, self.rows, self.closed = [], [], False

    def step(self, step, loss):
        self.steps.append(step)

    def epoch(self, row, view):
        self.rows.append(dict(row))

    def close(self):
        self.closed = True


def test_a_reporter_added_to_the_epoch_report_gets_each_row_and_step(tmp_path):
    trainer = Trainer(Config(**SMALL), tmp_path / "run", progress=False)
    recorder = Recorder()
    trainer.report.add(recorder)
    trainer.run()
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recorder.rows == written and len(written) == 2
    assert recorder.steps == list(range(1, written[-1]["step"] + 1)) and recorder.closed


def test_early_stopping_counts_epochs_since_the_best_and_stops_after_patience():
    early = EarlyStopping(2)
    assert early.record() == {} and not early.stopped()
    assert early.update(1, -30.0) and early.best_epoch == 1
    assert not early.update(2, -31.0) and not early.stopped()
    assert early.update(3, -29.0) and early.best_epoch == 3  # a new best resets the count
    assert not early.update(4, -29.5) and not early.update(5, -29.1) and early.stopped()
    resumed = EarlyStopping(2, early.record()["early_stop"])
    assert resumed.stopped() and resumed.best_epoch == 3 and not EarlyStopping(None, resumed.state).stopped()


def test_the_trainer_holds_its_run_directory_from_init_and_a_failed_start_releases_it(tmp_path, monkeypatch):
    """Prepared in __init__: the directory is locked until run() ends; a start that fails (here: the model
    cannot be built) leaves no directory and no lock behind."""
    trainer = Trainer(Config(**SMALL), tmp_path / "run", progress=False)
    assert holder(tmp_path / "run") == os.getpid() and (tmp_path / "run" / "config.json").is_file()
    trainer.run()
    assert holder(tmp_path / "run") is None  # released

    def unbuildable(config, x_shape):
        raise InputError("no model today")

    monkeypatch.setattr(importlib.import_module("pyro_vae.train"), "build_from_config", unbuildable)
    with pytest.raises(InputError, match="no model today"):
        Trainer(Config(**SMALL), tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()
