"""Per-example evaluation files, which model each result file describes, and `pyro-vae report`: the
paired difference of runs on the same test examples, and the runs it refuses."""

import json
import math
import shutil
import statistics

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.evaluation.report import CURVES, load_checkpoint_values, paired_difference
from pyro_vae.training.eval_record import compact_values

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
        assert main(["evaluate", str(run), "--eval-k", "20", "--quiet"]) == 0
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
                 "--batch-size", "8", "--eval-k", "5", "--quiet"]) == 0
    assert json.loads((out / "compare.json").read_text())["model_checkpoint"]["epoch"] == 1


def test_per_example_values_are_stored_as_float32_where_exact_and_read_back_as_float64(two_runs, tmp_path):
    """eval_examples.pt keeps a value in float32 only where float32 holds it exactly (an evaluation's
    values are float32 numbers: half the bytes), else in float64; the report reads both as float64."""
    trained = torch.load(two_runs[0] / "eval_examples.pt", weights_only=True)
    assert trained and all(value.dtype == torch.float32 for value in trained.values())
    exact = torch.tensor([-230.125, -228.3], dtype=torch.float32).double()
    inexact = torch.tensor([-230.1, 0.1], dtype=torch.float64)  # not float32 numbers
    stored = compact_values({"log_px": exact, "elbo": inexact})
    assert (stored["log_px"].dtype, stored["elbo"].dtype) == (torch.float32, torch.float64)
    torch.save(stored, tmp_path / "examples.pt")
    back = load_checkpoint_values(tmp_path / "examples.pt")
    assert all(value.dtype == torch.float64 for value in back.values())
    assert torch.equal(back["log_px"], exact) and torch.equal(back["elbo"], inexact)


def test_paired_standard_error_is_that_of_the_per_example_difference(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    a, b = (load_checkpoint_values(r / "eval_examples.pt")["log_px"].numpy() for r in two_runs)
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
    from pyro_vae.evaluation.report import EvaluatedRun, best_epoch, train_seconds

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
    assert "--unevaluated" in err
    assert not (tmp_path / "rep").exists()


def test_report_unevaluated_lists_a_run_still_training_with_its_curves_and_best_bound_so_far(
        two_runs, tmp_path, capsys):
    """--unevaluated: a run without eval.json and summary.json (a long run stopped mid-training) is a row
    with its epochs and best epoch so far, no log p(x) and no paired difference, a note with the
    validation ELBO at that epoch, and its curves in the figure; the evaluated runs pair as without it."""
    bare = tmp_path / "bare"
    shutil.copytree(two_runs[1], bare)
    for name in ("eval.json", "eval_examples.pt", "summary.json"):
        (bare / name).unlink(missing_ok=True)
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 300.0 - e, "seconds": 1.0,
             "validation_elbo": v, "test_elbo": v - 2, "best_epoch": b}
            for e, v, b in ((1, -290.0, 1), (2, -280.5, 2), (3, -281.0, 2))]
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rep"
    assert main(["report", str(two_runs[0]), str(two_runs[1]), str(bare), "--out", str(out),
                 "--unevaluated"]) == 0
    capsys.readouterr()
    table = json.loads((out / "report.json").read_text())["runs"]
    assert table[2]["run"] == "bare" and table[2]["epochs"] == 3 and table[2]["best_epoch"] == 2
    assert all(table[2][k] is None for k in ("log_px", "test_elbo", "diff_log_px", "diff_elbo"))
    assert table[1]["diff_log_px"] is not None
    note = (out / "report.md").read_text().split("Runs not evaluated")[1]
    assert "bare: not evaluated, 3 epochs" in note and "validation ELBO -280.50 at its best epoch 2" in note
    assert main(["report", str(two_runs[0]), str(bare), "--out", str(tmp_path / "rep2"), "--x", "seconds",
                 "--unevaluated"]) == 0
    assert (tmp_path / "rep2" / CURVES).is_file()
    seed = tmp_path / "seed1"  # bare's twin with another seed, evaluated: one group, one of 2 runs evaluated
    shutil.copytree(two_runs[1], seed)
    config = json.loads((seed / "config.json").read_text())
    (seed / "config.json").write_text(json.dumps({**config, "seed": config["seed"] + 1}))
    assert main(["report", str(two_runs[0]), str(seed), str(bare), "--out", str(tmp_path / "rep3"),
                 "--unevaluated"]) == 0
    group = json.loads((tmp_path / "rep3" / "report.json").read_text())["groups"][1]
    assert group["runs"] == ["seed1", "bare"] and group["n_evaluated"] == 1
    assert group["log_px"] == pytest.approx(table[1]["log_px"])  # the mean over the evaluated run alone
    assert "(1 of 2 runs evaluated)" in (tmp_path / "rep3" / "report.md").read_text()


def test_report_unevaluated_still_needs_an_evaluated_first_run(two_runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(two_runs[1], bare)
    (bare / "eval.json").unlink()
    assert main(["report", str(bare), str(two_runs[0]), "--out", str(tmp_path / "rep"), "--unevaluated"]) == 2
    err = capsys.readouterr().err
    assert "bare" in err and "reference" in err and len(err.strip().splitlines()) == 1


def test_report_refuses_runs_evaluated_on_different_test_sets(two_runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    assert main(["evaluate", str(other), "--eval-k", "5", "--test-size", "30", "--quiet"]) == 0
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
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    kept = tmp_path / "kept_eval.json"
    shutil.copy(run / "eval.json", kept)
    shutil.copy(run / "eval_examples.pt", tmp_path / "kept_examples.pt")
    with pytest.warns(UserWarning, match="stale"):
        assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    stamps = [json.loads(path.read_text())["model_checkpoint"] for path in (kept, run / "eval.json")]
    assert [stamp["epoch"] for stamp in stamps] == [1, 2]  # the end of training evaluated the new model
    assert (run / "stale" / "eval.json").is_file() and (run / "stale" / "eval_examples.pt").is_file()
    shutil.copy(kept, run / "eval.json")  # an evaluation of epoch 1 put back beside the epoch-2 model
    shutil.copy(tmp_path / "kept_examples.pt", run / "eval_examples.pt")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert "evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--epochs", "2"],
                                   ["--epochs", "30", "--early-stop", "1", "--validation-size", "50"]])
def test_the_end_of_training_writes_the_evaluation_that_evaluate_would_write(tmp_path, flags):
    """Training ends with what `pyro-vae evaluate RUN --eval-k K` writes (same seed, same model file:
    best.pt with early stopping), so report pairs a finished run without a second evaluation: the
    per-example values are equal, and summary.json's means are eval.json's."""
    run = _train(tmp_path / "run", *flags)
    trained = json.loads((run / "eval.json").read_text())
    examples = torch.load(run / "eval_examples.pt", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    assert {key: summary[key] for key in ("log_px", "test_elbo", "kl")} == \
        {key: trained[key] for key in ("log_px", "test_elbo", "kl")}
    assert trained["k"] == 5 and trained["model_checkpoint"]["checkpoint"] == \
        ("best.pt" if "--early-stop" in flags else "checkpoint.pt")
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    again = torch.load(run / "eval_examples.pt", weights_only=True)
    assert examples.keys() == again.keys() and all(torch.equal(examples[k], again[k]) for k in examples)
    assert json.loads((run / "eval.json").read_text()) == trained


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
        assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    assert main(["report", str(m2), str(clf), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    a, b = (torch.load(run / "eval_examples.pt", weights_only=True)["correct"] for run in (m2, clf))
    d = (b - a).numpy()
    assert rows[0]["accuracy"] == pytest.approx(float(a.mean()))
    assert rows[1]["diff_correct"] == pytest.approx(d.mean())
    assert rows[1]["diff_correct_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    assert rows[1]["log_px"] is None and rows[1]["diff_log_px"] is None
    assert "Δ accuracy vs m2" in (tmp_path / "rep" / "report.md").read_text()


# --- runs grouped by seed, and the figure against wall-clock seconds (`report --x seconds`) ---------------

N_FAKE = 30  # test examples of the hand-made runs


def _fake_run(root, name: str, seed: int, seconds: list[float], log_px: float, estimator: str = "mc",
              particles: int = 1):
    """An evaluated run directory written by hand: config.json (the settings that matter here),
    metrics.jsonl (epochs taking `seconds`, a validation ELBO rising by one nat per epoch), eval.json and
    eval_examples.pt (per-example log p(x) with mean `log_px`), on the same N_FAKE test examples."""
    run = root / name
    run.mkdir()
    config = {"dataset": "digits", "hidden": [32, 32], "estimator": estimator, "particles": particles,
              "seed": seed, "validation_size": 50}
    (run / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 120.0 - e, "test_elbo": -121.0 + e,
             "validation_elbo": -120.0 + e + log_px / 100, "seconds": s} for e, s in enumerate(seconds, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spread = torch.linspace(-1.0, 1.0, N_FAKE, dtype=torch.float64)
    values = {"log_px": log_px + spread, "elbo": log_px - 2.0 + spread}
    torch.save(values, run / "eval_examples.pt")
    (run / "eval.json").write_text(json.dumps({
        "log_px": log_px, "log_px_se": float(values["log_px"].std() / math.sqrt(N_FAKE)),
        "test_elbo": log_px - 2, "test_elbo_se": 0.1, "n_examples": N_FAKE, "test_fingerprint": "f" * 16,
        "k": 10}))
    return run


@pytest.fixture
def seeded_runs(tmp_path):
    """Two estimators × two seeds (hand-made, known seconds and log p(x)), mc first."""
    return [_fake_run(tmp_path, "mc-s1", 1, [2.0, 2.0, 2.0], -100.0),
            _fake_run(tmp_path, "analytic-s1", 1, [1.0, 1.0, 1.0, 1.0], -99.0, "analytic"),
            _fake_run(tmp_path, "mc-s2", 2, [3.0, 3.0], -101.0),
            _fake_run(tmp_path, "analytic-s2", 2, [1.5, 1.5, 1.5], -98.5, "analytic")]


def _captured(monkeypatch, name: str) -> list:
    """Record the arguments of pyro_vae.evaluation.report's figure function `name` (the figure is still
    written)."""
    import pyro_vae.evaluation.report

    calls, real = [], getattr(pyro_vae.evaluation.report, name)
    monkeypatch.setattr(
        pyro_vae.evaluation.report, name, lambda data, path: (calls.append(data), real(data, path))[1]
    )
    return calls


def test_report_groups_runs_that_differ_only_in_their_seed_and_pairs_groups_by_seed(seeded_runs, tmp_path):
    from pyro_vae.evaluation.report import report

    result = report(seeded_runs, tmp_path / "rep")
    mc, analytic = result.groups
    assert (mc["group"], analytic["group"]) == ("estimator mc", "estimator analytic")
    assert mc["runs"] == ["mc-s1", "mc-s2"] and analytic["runs"] == ["analytic-s1", "analytic-s2"]
    assert analytic["seeds"] == [1, 2]
    assert mc["log_px"] == pytest.approx(-100.5)
    assert mc["log_px_se"] == pytest.approx(statistics.stdev([-100.0, -101.0]) / math.sqrt(2))  # = 0.5
    d = [-99.0 - -100.0, -98.5 - -101.0]  # per seed, analytic minus mc
    assert analytic["diff_log_px"] == pytest.approx(statistics.mean(d))
    assert analytic["diff_log_px_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(2))
    assert analytic["n_paired"] == 2 and mc["diff_log_px"] is None and mc["n_paired"] is None
    assert mc["train_seconds"] == pytest.approx(6.0)
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())["groups"]
    assert saved == result.groups
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("| estimator analytic | analytic-s1, analytic-s2 | 1, 2 | -98.75 ± 0.25 | 1.750 ± 0.750 | 2 |"
            in md)


def test_report_groups_give_accuracy_over_seeds_and_paired_by_seed(seeded_runs, tmp_path):
    """Runs with a test accuracy (M2, the classifier): each group's accuracy as mean ± s.e. over its seeds,
    and its difference from the first group paired by seed, in report.json and report.md."""
    from pyro_vae.evaluation.report import report

    accuracy = {"mc-s1": 0.70, "analytic-s1": 0.52, "mc-s2": 0.66, "analytic-s2": 0.51}
    for run in seeded_runs:
        record = json.loads((run / "eval.json").read_text())
        (run / "eval.json").write_text(json.dumps({**record, "test_accuracy": accuracy[run.name]}))
    mc, analytic = report(seeded_runs, tmp_path / "rep").groups
    assert mc["accuracy"] == pytest.approx(0.68) and mc["accuracy_se"] == pytest.approx(0.02)
    d = [0.52 - 0.70, 0.51 - 0.66]  # per seed, analytic minus mc
    assert analytic["diff_accuracy"] == pytest.approx(statistics.mean(d))
    assert analytic["diff_accuracy_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(2))
    assert mc["diff_accuracy"] is None and analytic["n_paired"] == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 0.5150 ± 0.0050 | -0.1650 ± 0.0150 | 2 |" in md


def test_group_labels_name_what_differs_and_fall_back_to_the_run_names(seeded_runs, tmp_path):
    from pyro_vae.evaluation.report import names_label, read_run, seed_groups

    runs = [read_run(r) for r in seeded_runs]
    configs = [json.loads((r / "config.json").read_text()) for r in seeded_runs]
    iwae = {**configs[0], "estimator": "iwae", "particles": 5}
    labels = [g.label for g in seed_groups(runs[:3], [configs[0], configs[1], iwae])]
    assert labels == ["estimator mc, particles 1", "estimator analytic, particles 1",
                      "estimator iwae, particles 5"]
    same = seed_groups([runs[0], runs[2]], [configs[0], configs[2]])  # one group: nothing differs
    assert [(g.label, g.seeds) for g in same] == [("mc-s{1,2}", [1, 2])]
    assert names_label(["runs/mc-s0", "runs/mc-s10", "runs/mc-s2"]) == "runs/mc-s{0,10,2}"
    assert names_label(["mc-s1", "analytic-s1"]) == "mc-s1 + analytic-s1"  # not one stem
    assert names_label(["mc", "mc-s1"]) == "mc + mc-s1"  # one has no number
    other = {**configs[1], "dataset": "mnist", "hidden": [300, 300], "validation_size": 10}
    many = seed_groups(runs[:2], [configs[0], other])  # four settings differ: the runs' names
    assert [g.label for g in many] == ["mc-s1", "analytic-s1"]
    assert [g.label for g in seed_groups(runs[:2], [configs[0], {**configs[0], "hidden": [300, 300]}])] == [
        "hidden 32-32", "hidden 300-300"]


def test_runs_differing_only_in_where_they_ran_or_in_a_setting_added_later_are_one_group(seeded_runs):
    """A run resumed on another machine (data_dir, threads, checkpoint interval, closing eval_k) or written
    before a setting existed (the key missing: ADDED_SETTINGS' value) is the same training as its peers."""
    from pyro_vae.config import ADDED_SETTINGS
    from pyro_vae.evaluation.report import read_run, seed_groups

    runs = [read_run(r) for r in seeded_runs[:3]]
    base = json.loads((seeded_runs[0] / "config.json").read_text())
    moved = {**base, "data_dir": "/elsewhere", "threads": 4, "checkpoint_every": 5.0, "eval_k": 1000,
             "device": "cuda"}
    older = {k: v for k, v in base.items() if k not in ADDED_SETTINGS}
    groups = seed_groups(runs, [base, moved, {**older, "seed": 7}])
    assert len(groups) == 1 and groups[0].seeds == [base["seed"], base["seed"], 7]
    changed = {**older, "weight_init": "he"}  # an added setting away from its old value: another group
    labels = [g.label for g in seed_groups(runs[:2], [base, changed])]
    assert labels == ["weight_init default", "weight_init he"]


def test_report_x_seconds_draws_each_group_against_its_runs_cumulative_seconds(seeded_runs, tmp_path,
                                                                              monkeypatch, capsys):
    from pyro_vae.figures.plots import seconds_curves_figure

    calls = _captured(monkeypatch, "plot_seconds_curves")
    assert main(["report", *map(str, seeded_runs), "--x", "seconds", "--out", str(tmp_path / "rep")]) == 0
    assert "estimator analytic" in capsys.readouterr().out
    (groups,) = calls
    assert list(groups) == ["estimator mc", "estimator analytic"]
    assert [run.log_px for run in groups["estimator analytic"]] == [-99.0, -98.5]
    ax = seconds_curves_figure(groups).axes[0]
    labels = [line.get_label() for line in ax.lines] + [c.get_label() for c in ax.containers]
    group = [label for label in labels if "estimator mc" in label and not label.startswith("_seed")]
    assert len(group) == 2  # the mean curve and the log p(x) bar; each seed's own are drawn faintly
    assert sum(label.startswith("_seed") and "estimator mc" in label for label in labels) == 4
    (mc,) = [line for line in ax.lines if line.get_label().startswith("estimator mc: validation ELBO, mean")]
    # mc-s1's epochs end at 2, 4, 6 s, mc-s2's at 3, 6 s: the common grid is 3, 4, 6 s
    assert list(mc.get_xdata()) == [3.0, 4.0, 6.0]
    # their validation ELBOs, -120 + epoch - 0.01 * (100 + log p(x)), lie on the lines of t below
    s1, s2 = (lambda t: -121.0 + t / 2), (lambda t: -121.01 + t / 3)
    assert list(mc.get_ydata()) == pytest.approx([(s1(t) + s2(t)) / 2 for t in (3.0, 4.0, 6.0)], abs=1e-9)
    assert (tmp_path / "rep" / "report_curves.png").stat().st_size > 0


def test_report_x_epochs_is_the_default_and_draws_todays_figure(seeded_runs, tmp_path, monkeypatch):
    epochs = _captured(monkeypatch, "plot_run_curves")
    seconds = _captured(monkeypatch, "plot_seconds_curves")
    assert main(["report", *map(str, seeded_runs), "--out", str(tmp_path / "a")]) == 0
    assert main(["report", *map(str, seeded_runs), "--x", "epochs", "--out", str(tmp_path / "b")]) == 0
    expected = {r.name: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
                for r in seeded_runs}
    assert epochs == [expected, expected] and seconds == []
    assert (tmp_path / "a" / CURVES).read_bytes() == (tmp_path / "b" / CURVES).read_bytes()


def test_report_x_seconds_refuses_a_run_without_seconds_and_writes_nothing(seeded_runs, tmp_path, capsys):
    rows = (seeded_runs[2] / "metrics.jsonl").read_text().splitlines()
    bare = json.loads(rows[1])
    del bare["seconds"]
    (seeded_runs[2] / "metrics.jsonl").write_text("\n".join([rows[0], json.dumps(bare)]) + "\n")
    assert main(["report", *map(str, seeded_runs), "--x", "seconds", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "mc-s2" in err and "no seconds" in err and "epoch 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
    assert main(["report", *map(str, seeded_runs), "--out", str(tmp_path / "rep")]) == 0  # epochs need none
