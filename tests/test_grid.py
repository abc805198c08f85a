"""`pyro-vae grid FILE`: every combination trained, evaluated and reported; a half-finished grid is
finished (finished runs skipped, interrupted ones resumed); a bad grid file refused before training."""

import json

import pytest
import yaml

from pyro_vae.cli import main
from pyro_vae.sweeps.grid import read_grid, run_name

BASE = {"train_size": 200, "test_size": 40, "hidden": [32], "z_dim": 4, "eval_k": 5, "epochs": 2}


def _grid(tmp_path, base=None, sweep=None, **other):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": base if base is not None else BASE,
                                    "sweep": sweep if sweep is not None else {"prior": ["normal", "learned"]},
                                    **other}))
    return path


def test_each_combination_is_a_run_named_by_what_varies(tmp_path):
    runs = read_grid(_grid(tmp_path, sweep={"prior": ["normal", "vamp"], "seed": [0, 1, 2]}))
    assert [r.name for r in runs][:2] == ["prior-normal_seed-0", "prior-normal_seed-1"]
    assert len(runs) == 6 and len({r.name for r in runs}) == 6
    assert all(r.settings["z_dim"] == 4 and r.settings["prior"] == r.varied["prior"] for r in runs)
    assert run_name({"hidden": [64, 32]}) == "hidden-64-32"


def test_a_half_finished_grid_is_finished_and_a_finished_one_skipped(tmp_path, capsys):
    grid, out = _grid(tmp_path), tmp_path / "out"
    # interrupted: one run has 1 of its 2 epochs, not evaluated; the other was never started
    partial = out / "prior-learned"
    assert main(["train", "--out", str(partial), "--prior", "learned", "--train-size", "200", "--test-size",
                 "40", "--hidden", "32", "--z-dim", "4", "--eval-k", "5", "--epochs", "1", "--quiet"]) == 0
    first_epoch = json.loads((partial / "metrics.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert main(["grid", str(grid), "--out", str(out), "--jobs", "2"]) == 0
    said = capsys.readouterr().out
    assert "prior-normal: trained" in said and "prior-learned: resumed" in said
    for name in ("prior-normal", "prior-learned"):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        evaluation = json.loads((out / name / "eval.json").read_text())
        assert evaluation["model_checkpoint"]["epoch"] == 2
        assert evaluation["k"] == BASE["eval_k"]  # no --eval-k: the grid file's eval_k evaluates each run
    rows = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == first_epoch  # continued, not started over
    report = json.loads((out / "report" / "report.json").read_text())["runs"]
    assert [r["run"] for r in report] == ["prior-normal", "prior-learned"]
    names = ("prior-normal", "prior-learned")
    checkpoints = {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in names}
    assert main(["grid", str(grid), "--out", str(out), "--eval-k", "5"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert checkpoints == {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in checkpoints}


@pytest.mark.parametrize("content, named", [
    ({"base": BASE, "sweep": {"prior": ["normal"]}, "epochs": 3}, "unknown key(s) epochs"),
    ({"base": BASE, "sweep": {"prior": []}}, "sweep prior must be a non-empty list"),
    ({"base": BASE, "sweep": {"prior": "normal"}}, "sweep prior must be a non-empty list"),
    ({"base": BASE, "sweep": {"priors": ["normal", "vamp"]}}, "combination priors-normal"),
    ({"base": {**BASE, "beta": 0.5}, "sweep": {"estimator": ["mc", "iwae"]}}, "combination estimator-iwae"),
])
def test_a_bad_grid_file_is_refused_before_anything_trains(tmp_path, capsys, content, named):
    path, out = tmp_path / "grid.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(content))
    assert main(["grid", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_run_directory_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--out", str(out / "prior-normal"), "--train-size", "200", "--test-size", "40",
                 "--hidden", "16", "--z-dim", "4", "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["grid", str(_grid(tmp_path)), "--out", str(out)]) == 2
    assert "other settings (hidden)" in capsys.readouterr().err
    assert not (out / "prior-learned").exists()
