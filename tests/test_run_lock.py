"""One writer per run directory (run_lock.py): a second writer is refused in one line naming the holder's
pid, with the run left as it was; a holder killed with SIGKILL never blocks a resume; report, a reader,
is never blocked. And start-up ends cleanly: Ctrl-C or SIGTERM before training begins ends in one line
(130, 143) and leaves no run directory behind."""

import fcntl
import importlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae.cli import main
from pyro_vae.errors import InputError
from pyro_vae.figures import plots
from pyro_vae.training.run_lock import holder, run_lock

# the module (pyro_vae.train is the function)
train_module = importlib.import_module("pyro_vae.training.train")
step_loss = importlib.import_module("pyro_vae.training.step_loss")
grid_module = importlib.import_module("pyro_vae.sweeps.grid")
HAS_PROC_LOCKS = Path("/proc/locks").is_file()
SMALL = ["--train-size", "100", "--test-size", "20", "--hidden", "16", "--z-dim", "2", "--eval-k", "2",
         "--quiet"]


def hold_lock(run: Path) -> subprocess.Popen:
    """A process that holds the write lock on `run` (as a training run would) until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pyro_vae.training.run_lock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(3600)\n", str(run)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def _snapshot(run: Path) -> dict:
    return {p.relative_to(run): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(run.rglob("*"))}


def _kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture
def evaluated_run(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert main(["evaluate", str(run), "--eval-k", "2", "--quiet"]) == 0
    return run


def test_a_second_writer_is_refused_the_reader_is_not_and_a_killed_holder_blocks_nothing(
        evaluated_run, tmp_path, capsys):
    run = evaluated_run
    before = _snapshot(run)
    proc = hold_lock(run)
    try:
        if HAS_PROC_LOCKS:
            assert holder(run) == proc.pid
        for argv in (["train", "--resume", str(run), "--epochs", "4", "--quiet"],
                     ["evaluate", str(run), "--eval-k", "2", "--quiet"],
                     ["sample", str(run), "--n", "4"],
                     ["train", "--epochs", "1", "--out", str(run), "--overwrite", *SMALL]):  # would empty it
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert err.startswith(f"pyro-vae: error: {run} is being written by "), err
            if HAS_PROC_LOCKS:
                assert f"by process {proc.pid} " in err
        assert _snapshot(run) == before, "a refused writer changed the run"
        assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0  # a reader: not blocked
        assert (tmp_path / "report" / "report.md").is_file()
    finally:
        _kill_9(proc)
    with pytest.warns(UserWarning, match="moved to"):  # the evaluation describes the model of epoch 3
        assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 0
    assert '"epoch": 4' in (run / "metrics.jsonl").read_text().splitlines()[-1]


def test_a_new_run_is_locked_from_the_start(tmp_path, capsys):
    """Two `train --out X` at once: the second finds X locked (an empty directory is a valid --out)."""
    out = tmp_path / "run"
    out.mkdir()
    proc = hold_lock(out)
    try:
        assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 2
        assert "is being written by" in capsys.readouterr().err
        assert not any(out.iterdir())
    finally:
        _kill_9(proc)


def test_a_grid_worker_holds_its_run_while_it_trains_and_evaluates(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    for result in ("eval.json", "eval_examples.pt"):  # other tests evaluate the shared run in place
        (run / result).unlink(missing_ok=True)
    settings = train_module.Config.from_dict({"train_size": 400, "test_size": 120, "eval_k": 2,
                                              "epochs": 3}).to_dict()
    proc = hold_lock(run)
    try:
        with pytest.raises(InputError, match="is being written by"):
            grid_module._job(str(run), settings, "trained", False, None, "grid")
    finally:
        _kill_9(proc)
    assert not (run / "eval.json").exists()
    assert grid_module._job(str(run), settings, "trained", False, None, "grid").startswith("evaluated")


def test_the_lock_is_reentrant_and_released_on_exit_and_on_errors(tmp_path):
    def free() -> bool:
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with run_lock(tmp_path):
        with run_lock(tmp_path):  # the same process again (a grid worker's train inside its lock)
            assert not free()
        assert not free()  # still held by the outer block
    assert free()
    with pytest.raises(KeyboardInterrupt), run_lock(tmp_path):
        raise KeyboardInterrupt
    assert free()


def test_a_lock_that_made_the_directory_removes_it_when_nothing_was_written(tmp_path):
    with pytest.raises(InputError), run_lock(tmp_path / "new", create=True):
        assert (tmp_path / "new").is_dir()
        raise InputError("start-up failed")
    assert not (tmp_path / "new").exists()
    with run_lock(tmp_path / "kept", create=True):
        (tmp_path / "kept" / "config.json").write_text("{}")
    assert (tmp_path / "kept" / "config.json").is_file()


def test_ctrl_c_after_the_run_directory_is_made_leaves_no_directory(tmp_path, capsys, monkeypatch):
    """Ctrl-C late in start-up, once config.json is written but before training begins: one line, exit
    130, and no half-written run directory (it used to keep config.json without a checkpoint)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_loss, "SVIStep", interrupted)  # where the trainer makes its step
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 130
    assert capsys.readouterr().err == "pyro-vae: interrupted\n"
    assert not out.exists()


def test_ctrl_c_while_the_run_writes_its_figures_leaves_it_unfinished_and_resumable(tmp_path, capsys,
                                                                                    monkeypatch):
    """summary.json is written last: a run stopped while it evaluates or draws its figures has none, so
    `--resume` finishes it (it used to keep summary.json, refuse the resume and miss figures)."""
    out = tmp_path / "run"
    real_save = plots.save_figures

    def draw_one_then_stop(vae, data, run, *args, **kwargs):
        real_save(vae, data, run, *args, **kwargs)
        (run / "curves.png").unlink()  # as if stopped before the last figure
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_figures", draw_one_then_stop)
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 130
    assert capsys.readouterr().err == "pyro-vae: interrupted\n"
    assert not (out / "summary.json").exists() and (out / "checkpoint.pt").is_file()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file() and (out / "curves.png").is_file()


# a `pyro-vae` console script whose start-up is interrupted deterministically: MODE import raises
# KeyboardInterrupt where the package first imports torch (what Ctrl-C in those seconds does); MODE
# sigterm sends the process SIGTERM while the data load.
LAUNCHER = """import builtins, os, signal, sys
mode = sys.argv.pop(1)
if mode == "import":
    real_import = builtins.__import__

    def interrupting(name, *args, **kwargs):
        if name == "torch":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    builtins.__import__ = interrupting
from pyro_vae.cli import main
if mode == "sigterm":
    import importlib
    train = importlib.import_module("pyro_vae.training.train")
    load = train.prepare_data
    train.prepare_data = lambda *args: (os.kill(os.getpid(), signal.SIGTERM), load(*args))[1]
sys.exit(main())
"""


@pytest.mark.parametrize("mode, code, line", [("import", 130, "pyro-vae: interrupted"),
                                              ("sigterm", 143, "pyro-vae: stopped by SIGTERM")])
def test_the_command_stopped_during_start_up_ends_in_one_line(tmp_path, mode, code, line):
    launcher = tmp_path / "pyro-vae"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(launcher), mode, "train", "--epochs", "1", "--out", str(out),
                           *SMALL], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (code, line + "\n")
    assert not out.exists()


def test_ctrl_c_while_importing_the_library_outside_the_command_is_left_to_python(tmp_path):
    script = LAUNCHER.replace("from pyro_vae.cli import main", "import pyro_vae").replace(
        "sys.exit(main())", "")
    (tmp_path / "user_script.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "user_script.py"), "import"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.rstrip().endswith("KeyboardInterrupt")
