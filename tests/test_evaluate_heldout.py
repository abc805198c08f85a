"""`pyro-vae evaluate RUN --heldout MODE --out COPY`: the run's model scored on another draw of the test
set, in a copy of the run; the run itself, and its evaluation, stay as they were."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae import evaluate_run, train
from pyro_vae.cli import main
from pyro_vae.errors import InputError
from pyro_vae.training import run_copy
from pyro_vae.training.eval_record import test_fingerprint as fingerprint
from pyro_vae.training.run_dir import read_config
from pyro_vae.training.train_data import prepare_data

from .conftest import QUICK
from .test_train_pair import _config as pair_config
from .test_train_pair import _pair as make_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import draw_shift  # noqa: E402

EVAL = ["--eval-k", "5", "--quiet"]


@pytest.fixture(scope="module")
def held_run(tmp_path_factory):
    """A 2-epoch digits run with a validation set and early stopping (so best.pt), evaluated in place."""
    out = tmp_path_factory.mktemp("runs") / "held"
    assert main(["train", "--epochs", "2", "--validation-size", "100", "--early-stop", "5",
                 "--out", str(out), *QUICK]) == 0
    assert main(["evaluate", str(out), *EVAL]) == 0
    return out


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_the_copy_is_scored_on_the_authors_draw_and_the_run_is_left_as_it_was(held_run, tmp_path):
    before = snapshot(held_run)
    copy = tmp_path / "copy"
    assert main(["evaluate", str(held_run), "--heldout", "authors", "--out", str(copy), *EVAL]) == 0
    assert snapshot(held_run) == before  # eval.json, eval_examples.pt, config.json: untouched
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (held_run, copy))
    assert theirs == {**ours, "heldout": "authors"} and ours["heldout"] == "seeded"
    assert (copy / "best.pt").read_bytes() == (held_run / "best.pt").read_bytes()
    for name in ("metrics.jsonl", "summary.json"):
        assert (copy / name).read_bytes() == (held_run / name).read_bytes()
    config = read_config(held_run)[0]
    drawn = {mode: fingerprint(prepare_data(dataclasses.replace(config, heldout=mode)).test_x)
             for mode in ("seeded", "authors")}
    assert drawn["seeded"] != drawn["authors"]  # two draws, or the checks below could not fail
    assert json.loads((held_run / "eval.json").read_text())["test_fingerprint"] == drawn["seeded"]
    assert json.loads((copy / "eval.json").read_text())["test_fingerprint"] == drawn["authors"]
    # the pair is what scripts/draw_shift.py compares: one model, settings equal but for heldout
    result = draw_shift.main([f"{held_run}:{copy}"])
    a = torch.load(held_run / "eval_examples.pt")["log_px"].double()
    b = torch.load(copy / "eval_examples.pt")["log_px"].double()
    assert result["pairs"][0]["shift"] == pytest.approx(float((b - a).mean()))


@pytest.mark.parametrize("flags, message", [
    (["--heldout", "authors"], "--heldout and --out go together"),
    (["--out", "{tmp}/c"], "--heldout and --out go together"),
    (["--heldout", "seeded", "--out", "{tmp}/c"], "already holds out its test set as 'seeded'"),
    (["--heldout", "authors", "--out", "{tmp}/full"], "already exists and is not an empty directory"),
])
def test_refusals_write_nothing(held_run, tmp_path, capsys, flags, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    before = snapshot(held_run)
    argv = ["evaluate", str(held_run), *[f.format(tmp=tmp_path) for f in flags], *EVAL]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert snapshot(held_run) == before


def test_the_authors_draw_needs_a_validation_set(digits_run, tmp_path, capsys):
    """The authors binarize the validation images before the test images: a run without a validation set
    has no such draw, and is refused before anything is copied."""
    copy = tmp_path / "c"
    assert main(["evaluate", str(digits_run), "--heldout", "authors", "--out", str(copy), *EVAL]) == 2
    assert "--validation-size" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_copy_interrupted_halfway_leaves_nothing(held_run, tmp_path, monkeypatch):
    calls = []

    def fail_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(run_copy.shutil, "copy2", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_copy.copy_run(held_run, tmp_path / "c", "authors")
    assert len(calls) == 2  # interrupted between the model file and metrics.jsonl
    assert [p.name for p in tmp_path.iterdir()] in ([], ["c"])
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # no file, no staging


def test_a_run_of_your_own_pair_is_copied_from_python_with_pair_true(tmp_path):
    """The command line cannot rebuild a user's pair, so copy_run refuses one unless asked from Python
    (pair=True); the copy then evaluates with the same pair, on the other draw."""
    run = tmp_path / "run"
    train(pair_config(validation_size=64), run, progress=False, program=make_pair())
    with pytest.raises(InputError, match="own model/guide pair"):
        run_copy.copy_run(run, tmp_path / "refused", "authors")
    assert not (tmp_path / "refused").exists()
    copy = run_copy.copy_run(run, tmp_path / "copy", "authors", pair=True)
    _, config, _ = evaluate_run(copy, eval_k=5, program=make_pair(seed=1))
    assert config.heldout == "authors"
    prints = [json.loads((d / "eval.json").read_text())["test_fingerprint"] for d in (run, copy)]
    assert prints[0] != prints[1]
    assert json.loads((copy / "config.json").read_text())["pair"] == json.loads(
        (run / "config.json").read_text())["pair"]


def test_a_run_without_a_model_file_is_refused(held_run, tmp_path, capsys):
    run = shutil.copytree(held_run, tmp_path / "run")
    for name in ("best.pt", "checkpoint.pt"):
        (run / name).unlink()
    assert main(["evaluate", str(run), "--heldout", "authors", "--out", str(tmp_path / "c"), *EVAL]) == 2
    assert "has no trained model yet" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
