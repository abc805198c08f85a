"""The trainer in parts: a reporter added to the epoch report gets every epoch's row (what an experiment
tracker would do), early stopping's bookkeeping on its own, and a Trainer that holds its run directory
from __init__ (prepared there) to the end of run()."""

import importlib
import json
import os

import pytest

from pyro_vae import Config
from pyro_vae.early_stopping import EarlyStopping
from pyro_vae.epoch_report import Reporter
from pyro_vae.errors import InputError
from pyro_vae.run_lock import holder
from pyro_vae.train import Trainer, train

SMALL = {"train_size": 100, "test_size": 30, "hidden": [8], "z_dim": 2, "epochs": 2, "eval_k": 3}


class Recorder(Reporter):
    """A reporter that keeps what it is given."""

    def __init__(self):
        self.steps, self.rows, self.closed, self.runs, self.summaries = [], [], False, [], []

    def start(self, run):
        self.runs.append(run)

    def step(self, step, loss):
        self.steps.append(step)

    def epoch(self, row, view):
        self.rows.append(dict(row))

    def close(self):
        self.closed = True

    def finish(self, summary):
        self.summaries.append(dict(summary))


def test_a_reporter_added_to_the_epoch_report_gets_each_row_and_step(tmp_path):
    trainer = Trainer(Config(**SMALL), tmp_path / "run", progress=False)
    recorder = Recorder()
    trainer.report.add(recorder)
    trainer.run()
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recorder.rows == written and len(written) == 2
    assert recorder.steps == list(range(1, written[-1]["step"] + 1)) and recorder.closed


def test_a_reporter_given_to_train_is_told_the_start_and_the_summary_of_each_session(tmp_path):
    """train(..., reporters=[...]) (MLflow's way in): start once the run directory is ready (a resumed
    session: with the rows before it), finish with what summary.json holds, once it is written."""
    first, second = Recorder(), Recorder()
    train(Config(**SMALL), tmp_path / "run", progress=False, reporters=[first])
    train(Config(**{**SMALL, "epochs": 3}), tmp_path / "run", resume=True, progress=False, reporters=[second])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(r.out, r.resumed, len(r.metrics)) for r in first.runs] == [(tmp_path / "run", False, 0)]
    assert [(r.resumed, [m["epoch"] for m in r.metrics]) for r in second.runs] == [(True, [1, 2])]
    assert [r["epoch"] for r in second.rows] == [3] and second.summaries == [summary]
    assert first.summaries[0]["epochs"] == 2 and first.closed and second.closed


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
