"""Per-example evaluation files, which model each result file describes, and `pyro-vae report`: the
paired difference of runs on the same test examples, and the runs it refuses."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.report import paired_difference

NO_LATENT = ["--train-size", "200", "--test-size", "40", "--hidden", "32", "--quiet"]
TINY = [*NO_LATENT, "--eval-k", "5", "--z-dim", "4"]


def _train(out, *flags, settings=TINY):
    assert main(["train", "--out", str(out), *settings, *flags]) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two evaluated 1-epoch runs (normal and learned prior) on the same 40 test examples."""
    root = tmp_path_factory.mktemp("report")
    runs = [_train(root / prior, "--epochs", "1", "--prior", prior) for prior in ("normal", "learned")]
    for run in runs:
        assert main(["evaluate", str(run), "--k", "20", "--quiet"]) == 0
    return runs


def test_evaluate_saves_the_per_example_values_behind_eval_json(two_runs):
    run = two_runs[0]
    result = json.loads((run / "eval.json").read_text())
    values = torch.load(run / result["examples_file"], weights_only=True)
    for key, name in (("log_px", "log_px"), ("elbo", "test_elbo"), ("kl", "kl")):
        assert values[key].shape == (40,)
        assert math.isclose(float(values[key].mean()), result[name], rel_tol=1e-6)
        assert math.isclose(float(values[key].std() / math.sqrt(40)), result[f"{name}_se"], rel_tol=1e-6)
    assert torch.allclose(values["elbo"], values["recon"] - values["kl"])


def test_eval_json_records_the_checkpoint_epoch_and_step_it_describes(two_runs):
    run = two_runs[0]
    stamp = json.loads((run / "eval.json").read_text())["model_checkpoint"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert stamp == {"checkpoint": "checkpoint.pt", "epoch": 1, "step": int(state["step"])}


def test_compare_records_the_model_it_measured(two_runs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(two_runs[0]), "--out", str(out), "--estimators", "mc", "--repeats", "3",
                 "--batch-size", "8", "--k-ref", "5", "--quiet"]) == 0
    assert json.loads((out / "compare.json").read_text())["model_checkpoint"]["epoch"] == 1


def test_paired_standard_error_is_that_of_the_per_example_difference(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    a, b = (torch.load(r / "eval_examples.pt", weights_only=True)["log_px"].numpy() for r in two_runs)
    d = b - a
    assert rows[0]["diff_log_px"] is None
    assert math.isclose(rows[1]["diff_log_px"], d.mean(), rel_tol=1e-9)
    assert math.isclose(rows[1]["diff_log_px_se"], d.std(ddof=1) / math.sqrt(len(d)), rel_tol=1e-9)
    assert math.isclose(rows[1]["diff_log_px"], rows[1]["log_px"] - rows[0]["log_px"], abs_tol=1e-4)
    # the pairing removes the examples' own spread: smaller than the unpaired s.e. of the difference
    assert rows[1]["diff_log_px_se"] < math.hypot(rows[0]["log_px_se"], rows[1]["log_px_se"])
    out = capsys.readouterr().out
    assert "learned" in out and "report_curves.png" in out
    csv_lines = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("run,log_px")
    assert rows[0]["epochs"] == 1 and rows[0]["device"] == "cpu" and rows[0]["best_epoch"] is None


def test_a_run_not_finished_reports_the_evaluated_best_epoch_and_the_epochs_wall_time(tmp_path):
    """A run stopped before early stopping (no summary.json yet): the best epoch is that of the best.pt
    its evaluation scored, the wall time the sum of its epochs' seconds; no early stopping, none."""
    from pyro_vae.report import EvaluatedRun, best_epoch, train_seconds

    metrics = [{"epoch": e, "seconds": 2.5 * e} for e in (1, 2, 3)]
    scored = {"checkpoint": "best.pt", "epoch": 2, "step": 20}
    running = EvaluatedRun("r", tmp_path, {"model_checkpoint": scored}, {}, {}, metrics)
    assert best_epoch(running) == 2 and train_seconds(running) == 15.0
    last = EvaluatedRun("r", tmp_path, {"model_checkpoint": {**scored, "checkpoint": "checkpoint.pt"}}, {},
                        {}, metrics)
    assert best_epoch(last) is None
    finished = EvaluatedRun("r", tmp_path, {"model_checkpoint": scored}, {},
                            {"best_epoch": 3, "train_seconds": 9.0}, metrics)
    assert best_epoch(finished) == 3 and train_seconds(finished) == 9.0
    assert train_seconds(EvaluatedRun("r", tmp_path, {}, {})) is None


def test_paired_difference_of_one_example_has_no_standard_error():
    mean, se = paired_difference(torch.tensor([1.0]), torch.tensor([3.0]))
    assert mean == 2.0 and math.isnan(se)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    mean, se = paired_difference(torch.as_tensor(a), torch.as_tensor(b))
    assert math.isclose(se, np.std(b - a, ddof=1) / math.sqrt(50), rel_tol=1e-12)


def test_report_refuses_a_run_that_was_not_evaluated(two_runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(two_runs[1], bare)
    (bare / "eval.json").unlink()
    assert main(["report", str(two_runs[0]), str(bare), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "bare" in err and "not been evaluated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_report_refuses_runs_evaluated_on_different_test_sets(two_runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    assert main(["evaluate", str(other), "--k", "5", "--test-size", "30", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(two_runs[0]), str(other), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "other" in err and "test" in err
    record = json.loads((other / "eval.json").read_text())
    record.update(n_examples=40, test_fingerprint="0" * 16)  # same count, other examples
    (other / "eval.json").write_text(json.dumps(record))
    assert main(["report", str(two_runs[0]), str(other), "--out", str(tmp_path / "rep")]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_resume_moves_the_older_models_results_aside_and_report_refuses_a_stale_evaluation(tmp_path, capsys):
    run = _train(tmp_path / "run", "--epochs", "1")
    assert main(["evaluate", str(run), "--k", "5", "--quiet"]) == 0
    kept = tmp_path / "kept_eval.json"
    shutil.copy(run / "eval.json", kept)
    shutil.copy(run / "eval_examples.pt", tmp_path / "kept_examples.pt")
    with pytest.warns(UserWarning, match="stale"):
        assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert not (run / "eval.json").exists()
    assert (run / "stale" / "eval.json").is_file() and (run / "stale" / "eval_examples.pt").is_file()
    shutil.copy(kept, run / "eval.json")  # an evaluation of epoch 1 put back beside the epoch-2 model
    shutil.copy(tmp_path / "kept_examples.pt", run / "eval_examples.pt")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert "evaluate" in capsys.readouterr().err


def test_resume_with_fewer_epochs_is_refused_and_leaves_the_run_as_it_was(tmp_path, capsys):
    run = _train(tmp_path / "run", "--epochs", "2")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for epochs in ("1", "2"):
        assert main(["train", "--resume", str(run), "--epochs", epochs, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "already trained 2 epoch(s)" in err and "--epochs 3" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_report_pairs_the_accuracy_of_m2_and_the_classifier_on_the_same_test_examples(tmp_path):
    """An M2 run and the classifier baseline: accuracy ± s.e. per run, and the classifier's paired
    difference of correctness from M2, whose s.e. is that of the per-example difference (computed here
    from eval_examples.pt); the classifier has no log p(x): its bound cells are empty."""
    m2 = _train(tmp_path / "m2", "--epochs", "1", "--model", "m2", "--labels", "20")
    clf = _train(tmp_path / "clf", "--epochs", "5", "--model", "classifier", "--labels", "20",
                 settings=NO_LATENT)
    for run in (m2, clf):
        assert main(["evaluate", str(run), "--k", "5", "--quiet"]) == 0
    assert main(["report", str(m2), str(clf), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    a, b = (torch.load(run / "eval_examples.pt", weights_only=True)["correct"] for run in (m2, clf))
    d = (b - a).numpy()
    assert rows[0]["accuracy"] == pytest.approx(float(a.mean()))
    assert rows[1]["diff_correct"] == pytest.approx(d.mean())
    assert rows[1]["diff_correct_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    assert rows[1]["log_px"] is None and rows[1]["diff_log_px"] is None
    assert "Δ accuracy vs m2" in (tmp_path / "rep" / "report.md").read_text()
