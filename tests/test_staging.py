"""diagnose, compare and sample write their files all or none: a failure while writing the last one
leaves the run directory exactly as it was."""

import shutil
from pathlib import Path

import pytest

from pyro_vae.cli import main
from pyro_vae.evaluation import compare_measures
from pyro_vae.evaluation.diagnostics import report as diagnose_report
from pyro_vae.figures import plots
from pyro_vae.staging import write_all_or_none
from pyro_vae.training import eval_record  # writes eval.json, for evaluate and at the end of training


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_all_or_none_moves_every_file_or_none(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def good(folder: Path) -> list[Path]:
        (folder / "a.txt").write_text("new")
        (folder / "b.txt").write_text("b")
        return [folder / "a.txt", folder / "b.txt"]

    def bad(folder: Path) -> list[Path]:
        (folder / "a.txt").write_text("newer")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_all_or_none(tmp_path, bad)
    assert _snapshot(tmp_path) == {"a.txt": b"old"}  # no staging folder left either
    assert write_all_or_none(tmp_path, good) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert _snapshot(tmp_path) == {"a.txt": b"new", "b.txt": b"b"}


def _fail(*args, **kwargs):
    raise OSError("the last figure could not be written")


@pytest.mark.parametrize("command, module, name", [
    (["compare", "--particles", "1", "--estimators", "mc", "--repeats", "2", "--batch-size", "8",
      "--eval-k", "10", "--quiet"], compare_measures, "plot_estimates"),
    (["diagnose", "--n-examples", "2", "--mcmc-examples", "1", "--eval-k", "20", "--svi-steps", "2",
      "--num-samples", "5", "--warmup", "5", "--chains", "1", "--quiet"], diagnose_report, "plot_posterior"),
    (["sample", "--n", "4"], plots, "plot_latent_map"),
    (["evaluate", "--eval-k", "5"], eval_record, "write_json"),
])
def test_a_command_failing_at_its_last_file_leaves_the_run_unchanged(command, module, name, digits_run,
                                                                      tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    for pattern in ("*.png", "eval*", "compare*", "diagnose*"):  # training drew sample's figures, and
        for result in run.glob(pattern):  # other tests evaluate the shared run in place
            result.unlink()
    before = _snapshot(run)
    monkeypatch.setattr(module, name, _fail)
    with pytest.raises(OSError, match="could not be written"):
        main([command[0], str(run), *command[1:]])
    assert _snapshot(run) == before
    monkeypatch.undo()
    assert main([command[0], str(run), *command[1:]]) == 0  # and without the failure it writes them all
    assert set(_snapshot(run)) > set(before)
