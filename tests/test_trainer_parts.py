"""The trainer in parts: a reporter added to the epoch report gets every epoch's row (what an experiment
tracker would do), early stopping's bookkeeping on its own, and a Trainer that holds its run directory
from __init__ (prepared there) to the end of run(); every attribute is made in __init__; the caller's
Config and global random generators are as they were after a run, which draws from generators of its
own."""

import copy
import importlib
import json
import os
import random

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import Config
from pyro_vae.errors import InputError
from pyro_vae.rng import RunRandomState
from pyro_vae.training.early_stopping import EarlyStopping
from pyro_vae.training.epoch_report import Reporter
from pyro_vae.training.run_lock import holder
from pyro_vae.training.train import Trainer, train

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

    monkeypatch.setattr(
        importlib.import_module("pyro_vae.training.training_model"), "build_from_config", unbuildable
    )
    with pytest.raises(InputError, match="no model today"):
        Trainer(Config(**SMALL), tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()


def _rows(run) -> list[dict]:
    """metrics.jsonl without the wall-clock seconds."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _global_draws() -> tuple:
    """The next draws of every global generator a run could touch: torch, NumPy, Python's random."""
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), random.random()


def test_training_leaves_the_callers_random_generators_as_they_were(tmp_path):
    """train() used to reseed the global generators with config.seed (pyro.set_rng_seed); now the caller's
    next draws, after a new run and after a resumed one, are those it would have made without the call,
    and the run's metrics are the same whatever the caller's generators held."""
    pyro.set_rng_seed(123)
    expected = _global_draws()
    pyro.set_rng_seed(123)
    train(Config(**SMALL), tmp_path / "run", progress=False)
    assert _global_draws() == expected
    pyro.set_rng_seed(123)
    train(Config(**{**SMALL, "epochs": 3}), tmp_path / "run", resume=True, progress=False)
    assert _global_draws() == expected
    pyro.set_rng_seed(7)  # another caller's state: the run draws the same
    train(Config(**{**SMALL, "epochs": 3}), tmp_path / "other", progress=False)
    assert _rows(tmp_path / "other") == _rows(tmp_path / "run")


def test_a_trainer_draws_from_its_own_generators_between_init_and_run(tmp_path):
    """What the caller draws between Trainer(...) and run() neither changes the run nor is changed by it."""
    train(Config(**SMALL), tmp_path / "plain", progress=False)
    pyro.set_rng_seed(5)
    expected = _global_draws()
    pyro.set_rng_seed(5)
    trainer = Trainer(Config(**SMALL), tmp_path / "run", progress=False)
    assert _global_draws() == expected
    trainer.run()
    assert _rows(tmp_path / "run") == _rows(tmp_path / "plain")


def test_a_runs_random_state_continues_across_blocks_and_gives_the_callers_back_on_error():
    own = RunRandomState(3, torch.device("cpu"))
    with own:
        first = torch.rand(2)
    with own:
        second = torch.rand(2)
    pyro.set_rng_seed(3)
    assert torch.equal(torch.cat([first, second]), torch.rand(4))  # one stream, seeded with 3
    pyro.set_rng_seed(11)
    expected = _global_draws()
    pyro.set_rng_seed(11)
    with pytest.raises(RuntimeError), own:
        np.random.seed(0)
        raise RuntimeError
    assert _global_draws() == expected


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resumed"])
def test_every_attribute_of_the_trainer_is_made_in_init(tmp_path, resume):
    """run() changes the values of the loop's position, never the set of attributes (here with a validation
    set and early stopping, whose best.pt and count are written as it trains)."""
    settings = {**SMALL, "validation_size": 20, "early_stop": 5}
    if resume:
        train(Config(**settings), tmp_path / "run", progress=False)
        settings["epochs"] = 3
    trainer = Trainer(Config(**settings), tmp_path / "run", resume=resume, progress=False)
    made = set(vars(trainer))
    trainer.run()
    assert set(vars(trainer)) == made and trainer.reason == "epochs"


def test_an_annealed_m2_leaves_the_callers_config_and_the_models_temperature_as_they_were(tmp_path):
    """--discrete relaxed with --temperature-final: the temperature each row records falls, while the
    caller's Config (also across a resume) and the model's own temperature stay as they were: the kind's
    schedule passes it to model and guide, nothing writes it."""
    config = Config(model="m2", labels=20, discrete="relaxed", temperature=2.0, temperature_final=0.5,
                    **{**SMALL, "epochs": 1})
    kept = copy.deepcopy(config)
    train(config, tmp_path / "run", progress=False)
    assert config == kept
    more = Config.from_dict({**config.to_dict(), "epochs": 2})
    kept = copy.deepcopy(more)
    trainer = Trainer(more, tmp_path / "run", resume=True, progress=False)
    trainer.run()
    assert more == kept and more.classes is None
    rows = _rows(tmp_path / "run")
    assert rows[0]["temperature"] > rows[1]["temperature"] == pytest.approx(0.5)
    assert trainer.model.pair.temperature == 2.0
