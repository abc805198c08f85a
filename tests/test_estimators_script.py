"""scripts/estimators_at_convergence.py: every (estimator, seed) run of the protocol VAE is trained under
the mode's stopping rule and evaluated; the table's paired column against mc is the mean over seeds of the
per-example differences in the runs' eval_examples.pt; a second call trains and evaluates nothing again,
an unfinished run is resumed, a finished run's record without checkpoints counts as done, and an
evaluation with another k is redone."""

import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pyro_vae.evaluation.report import load_checkpoint_values

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import estimators_at_convergence as script  # noqa: E402

SPECS, SEEDS, MINUTES = ["mc", "analytic"], [0, 1], 0.02
TINY = ["--dataset", "digits", "--train-size", "200", "--validation-size", "50", "--test-size", "40",
        "--epochs", "3", "--hidden", "16", "--z-dim", "3"]


def _study(out: Path, eval_k: int = 5) -> list[str]:
    return ["--mode", "budget", "--minutes", str(MINUTES), "--specs", *SPECS, "--seeds", *map(str, SEEDS),
            "--eval-k", str(eval_k), "--jobs", "2", "--out", str(out), *TINY]


def _examples(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_values(run / "eval_examples.pt")


def test_the_study_trains_evaluates_tabulates_and_continues(tmp_path, monkeypatch):
    out = tmp_path / "study"
    table = script.main(_study(out))
    runs = {(spec, s): script.run_dir(out, spec, s) for spec in SPECS for s in SEEDS}
    for (spec, seed), run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["stop_reason"] in ("time_budget", "epochs")
        assert summary["time_budget_minutes"] == MINUTES
        config = json.loads((run / "config.json").read_text())
        assert (config["estimator"], config["seed"]) == (spec, seed)
        preset = (config["encoder"], config["early_stop"], config["kl_anneal"])
        assert preset == ("gated-mlp", 50, 100)
        assert json.loads((run / "eval.json").read_text())["k"] == 5
    text = (out / "estimators.md").read_text()
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:4]] == SPECS
    assert not text.splitlines()[4].startswith("|")  # one row per spec, no more
    assert "S = 5;" in text and "40 test images" in text
    assert "KL warm-up over 100 epochs: mc, analytic." in text
    for key, values in (("diff_log_px", "log_px"), ("diff_elbo", "elbo")):
        per_seed = [float((_examples(runs["analytic", s])[values] - _examples(runs["mc", s])[values]).mean())
                    for s in SEEDS]
        cell = table["analytic"][key]
        assert cell["mean"] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
        assert cell["se_seeds"] == pytest.approx(statistics.stdev(per_seed) / 2 ** 0.5, abs=1e-12)
        assert f"{statistics.fmean(per_seed):+.3f} ± {statistics.stdev(per_seed) / 2 ** 0.5:.3f}" in text
    assert json.loads((out / "estimators.json").read_text())["specs"]["analytic"]["diff_log_px"]["mean"] == \
        table["analytic"]["diff_log_px"]["mean"]
    assert "diff_log_px" not in table["mc"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert [Path(p).name for p in report["paths"]] == [runs[key].name for key in runs]  # mc's first

    for name in ("best.pt", "checkpoint.pt"):  # mc-s0 as its record under docs/runs/ keeps it: no checkpoints
        (runs["mc", 0] / name).unlink(missing_ok=True)
    assert [p.name for p in runs["mc", 0].glob("*.pt")] == ["eval_examples.pt"]
    assert script.finished(runs["mc", 0], 5)
    assert not script.finished(runs["mc", 0], 6)
    metrics = {key: (run / "metrics.jsonl").read_bytes() for key, run in runs.items()}
    calls = []
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **_: calls.append(cmd) or
                        script.subprocess.CompletedProcess(cmd, 0))
    again = script.main(_study(out))
    assert calls == []  # every run finished and evaluated with k = 5: nothing trained or evaluated again
    assert {key: (run / "metrics.jsonl").read_bytes() for key, run in runs.items()} == metrics
    assert again["analytic"]["diff_log_px"] == table["analytic"]["diff_log_px"]
    script.main(_study(out, eval_k=6))
    assert sorted(cmd[cmd.index("evaluate") + 1] for cmd in calls) == sorted(str(r) for r in runs.values())
    assert all(cmd[-3:] == ["--eval-k", "6", "--quiet"] for cmd in calls)
    waiting = (out / "estimators.md").read_text().splitlines()[-1]  # (the mock evaluated nothing)
    assert waiting.startswith("Not finished or not evaluated yet")
    assert all(r.name in waiting for r in runs.values())


def test_each_runs_command_is_the_preset_with_its_estimator_and_an_unfinished_run_resumes(tmp_path):
    from pyro_vae.cli import build_parser, resolve_config

    args = script.parse_args(["--mode", "budget", "--minutes", "60", "--out", str(tmp_path)])
    config = resolve_config(build_parser().parse_args(script.command(args, "iwae-dreg", 50, 1)[3:]))
    assert (config.estimator, config.particles, config.seed, config.time_budget) == ("iwae-dreg", 50, 1, 60.0)
    assert (config.encoder, config.hidden, config.z_dim, config.prior) == \
        ("gated-mlp", [300, 300], 40, "normal")
    assert (config.dataset, config.early_stop, config.validation_size, config.threads) == \
        ("fashion-mnist", 50, 10_000, 1)
    assert config.kl_anneal == 0  # an importance-weighted bound has no KL term to warm up (config refuses it)
    for more, warm_up in (([], 100), (["--kl-anneal", "0"], 0)):  # the preset's warm-up, or the one asked for
        args_mc = script.parse_args(["--mode", "budget", "--minutes", "60", "--out", str(tmp_path), *more])
        mc = resolve_config(build_parser().parse_args(script.command(args_mc, "mc", 1, 0)[3:]))
        assert mc.kl_anneal == warm_up
    run = script.run_dir(tmp_path, "iwae-dreg:50", 1)
    assert run.name == "iwae-dreg-50-s1"
    run.mkdir()
    (run / "config.json").write_text("{}")  # stopped before its first checkpoint: started again
    assert script.command(args, "iwae-dreg", 50, 1)[-1] == "--overwrite"
    (run / "checkpoint.pt").write_bytes(b"")
    assert script.command(args, "iwae-dreg", 50, 1)[3:] == [
        "train", "--resume", str(run), "--time-budget", "60.0", "--threads", "1", "--quiet"]
    converge = script.parse_args(["--mode", "converge", "--out", str(tmp_path)])
    assert "--time-budget" not in script.command(converge, "iwae-dreg", 50, 1)


def test_a_device_reaches_every_train_resume_and_evaluate_call(tmp_path, monkeypatch):
    """--device (the GPU rows) is each run's setting, also where an unfinished run resumes; without it the
    commands carry none, so pyro-vae's default decides."""
    from pyro_vae.cli import build_parser, resolve_config

    gpu = script.parse_args(["--mode", "converge", "--specs", "iwae:50", "--out", str(tmp_path),
                             "--device", "cuda"])
    assert resolve_config(build_parser().parse_args(script.command(gpu, "iwae", 50, 0)[3:])).device == "cuda"
    default = script.parse_args(["--mode", "converge", "--out", str(tmp_path)])
    assert "--device" not in script.command(default, "iwae", 50, 0)
    run = script.run_dir(tmp_path, "iwae:50", 0)
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert script.command(gpu, "iwae", 50, 0)[3:] == ["train", "--resume", str(run), "--device", "cuda",
                                                       "--threads", "1", "--quiet"]
    (run / "summary.json").write_text("{}")
    calls = []
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **_: calls.append(cmd) or
                        script.subprocess.CompletedProcess(cmd, 0))
    script.train_one(gpu, "iwae", 50, 0)  # finished, not evaluated: evaluated on the device asked for
    assert [cmd[3:] for cmd in calls] == [
        ["evaluate", str(run), "--eval-k", "5000", "--device", "cuda", "--quiet"]]


def test_the_modes_defaults_and_bad_settings():
    budget = script.parse_args(["--mode", "budget", "--minutes", "60"])
    assert budget.specs == ["mc", "analytic", "iwae:5", "iwae:50", "stl", "iwae-dreg:5", "iwae-dreg:50"]
    assert (budget.seeds, budget.eval_k, str(budget.out)) == ([0, 1], 5000, "runs/estimators-budget-60min")
    converge = script.parse_args(["--mode", "converge"])
    assert (converge.specs, converge.seeds, str(converge.out)) == (["mc", "analytic"], [0, 1, 2],
                                                                   "runs/estimators-converge")
    for bad in (["--mode", "budget"], ["--mode", "converge", "--minutes", "5"],
                ["--mode", "budget", "--minutes", "0"], ["--mode", "converge", "--specs", "iwae:x"],
                ["--mode", "converge", "--specs", "nope"]):
        with pytest.raises(SystemExit) as stop:
            script.parse_args(bad)
        assert stop.value.code == 2


def test_the_equal_epochs_column_averages_the_validation_difference_past_the_warm_up():
    """Per seed, the mean of (spec - mc) validation ELBO over the epochs past the warm-up both reached
    (an early-stopped run's later epochs and the warm-up's are left out); then mean and s.e. over seeds."""
    def run(values: dict[int, float]) -> SimpleNamespace:
        return SimpleNamespace(metrics=[{"epoch": e, "validation_elbo": v} for e, v in values.items()]
                               + [{"epoch": 99, "validation_elbo": None}])

    base = {0: run({1: -300.0, 2: -250.0, 3: -240.0, 4: -239.0}), 1: run({1: -301.0, 2: -251.0, 3: -241.0})}
    spec = {0: run({1: -200.0, 2: -249.0, 3: -239.5}),  # stopped early: epoch 4 is mc's alone
            1: run({1: -200.0, 2: -250.0, 3: -239.0, 4: -238.0}), 2: run({2: -1.0})}  # seed 2: mc has none
    cell = script.equal_epochs(spec, base, after=1)
    per_seed = [statistics.fmean([1.0, 0.5]), statistics.fmean([1.0, 2.0])]
    assert cell["seeds"] == [0, 1] and cell["after_epoch"] == 1
    assert [cell["per_seed"][s]["epochs"] for s in ("0", "1")] == [2, 2]
    assert cell["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert cell["se_seeds"] == pytest.approx(statistics.stdev(per_seed) / 2 ** 0.5)
    assert script.equal_epochs(spec, base, after=3) is None  # no epoch past 3 that both reached
