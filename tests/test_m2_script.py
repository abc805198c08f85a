"""scripts/m2_fashion_mnist.py: the table's cells are the mean and standard error over seeds of the runs'
summaries, a finished run is not trained again, and an interrupted one is resumed."""

import json
import statistics
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import m2_fashion_mnist as script  # noqa: E402


def _write_summary(out: Path, row: str, labels: int, seed: int, accuracy: float, elbo: float | None) -> None:
    run = script.run_dir(out, row, labels, seed)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "test_accuracy": accuracy, "test_elbo": elbo, "epochs": 3, "train_seconds": 10.0 + seed,
        "device": "cpu"}))


def test_cells_are_mean_and_standard_error_over_seeds(tmp_path):
    accuracies = {0: 0.61, 1: 0.67, 2: 0.58}
    for seed, a in accuracies.items():
        _write_summary(tmp_path, "enum", 100, seed, a, -250.0 - seed)
        _write_summary(tmp_path, "classifier", 100, seed, a - 0.1, None)
    table = script.summarize(tmp_path, ["enum", "classifier"], [100, 1000], [0, 1, 2])
    cell = table["100/enum"]
    values = list(accuracies.values())
    assert cell["seeds"] == 3
    assert abs(cell["accuracy"] - statistics.fmean(values)) < 1e-12
    assert abs(cell["accuracy_se"] - statistics.stdev(values) / 3 ** 0.5) < 1e-12
    assert abs(cell["test_elbo"] - (-251.0)) < 1e-12
    assert table["100/classifier"]["test_elbo"] is None
    assert "1000/enum" not in table  # no run: no cell
    text = script.markdown(table, [100, 1000], ["enum", "classifier"])
    assert f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) / 3 ** 0.5:.3f}" in text


def _args(out: Path, protocol: str = "quick", **settings) -> script.argparse.Namespace:
    """The script's arguments with `protocol`'s settings, a tiny network, and `settings` over them."""
    return script.argparse.Namespace(**{
        **script.PROTOCOLS[protocol], "out": out, "dataset": "digits", "data_dir": "data", "hidden": [8],
        "z_dim": 2, "batch_size": 64, "lr": 1e-3, "eval_k": 2, "train_size": None, "test_size": None,
        **settings})


def test_finished_runs_are_kept_and_interrupted_ones_resumed(tmp_path, monkeypatch):
    args = _args(tmp_path, epochs=1, classifier_epochs=2, aux_loss=5.0)
    _write_summary(tmp_path, "enum", 20, 0, 0.5, -40.0)
    calls = []
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **_: calls.append(cmd) or
                        script.subprocess.CompletedProcess(cmd, 0))
    script.train_one(args, "enum", 20, 0)
    assert calls == []  # summary.json: finished
    interrupted = script.run_dir(tmp_path, "score", 20, 0)
    interrupted.mkdir()
    (interrupted / "checkpoint.pt").write_bytes(b"")
    script.train_one(args, "score", 20, 0)
    assert calls[-1][3:5] == ["train", "--resume"] and calls[-1][5] == str(interrupted)
    script.train_one(args, "enum + aux", 20, 1)
    fresh = calls[-1]
    assert fresh[fresh.index("--aux-loss") + 1] == "5.0" and fresh[fresh.index("--seed") + 1] == "1"


def test_the_paired_difference_from_the_classifier_is_by_seed_and_by_example(tmp_path, monkeypatch):
    """Each seed's M2 run against the classifier of the same seed on the same test examples: the mean of
    the per-seed differences of correct answers, its standard error over the seeds."""
    import torch

    answers = {("enum", 0): [1, 1, 0, 0], ("classifier", 0): [1, 0, 0, 0],
               ("enum", 1): [1, 1, 1, 0], ("classifier", 1): [0, 0, 1, 0]}
    for (row, seed) in answers:
        _write_summary(tmp_path, row, 100, seed, 0.5, None)
    by_dir = {script.run_dir(tmp_path, row, 100, seed): torch.tensor(v, dtype=torch.float64)
              for (row, seed), v in answers.items()}
    monkeypatch.setattr(script, "correct", lambda run: by_dir[run])
    table = script.summarize(tmp_path, ["enum", "classifier"], [100], [0, 1])
    script.paired_with_classifier(tmp_path, table, ["enum", "classifier"], [100], [0, 1])
    per_seed = [0.25, 0.5]  # (2 - 1) / 4 and (3 - 1) / 4
    assert table["100/enum"]["vs_classifier"] == statistics.fmean(per_seed)
    assert abs(table["100/enum"]["vs_classifier_se"] - statistics.stdev(per_seed) / 2 ** 0.5) < 1e-12
    assert "vs_classifier" not in table["100/classifier"]
    assert "+0.375 ± 0.125 vs classifier" in script.markdown(table, [100], ["enum", "classifier"])


def test_every_rows_command_is_one_the_config_accepts(tmp_path):
    """The classifier has no latent: its command carries no --z-dim or --eval-k (pyro-vae refuses them)."""
    from pyro_vae.cli import build_parser, resolve_config

    args = _args(tmp_path, epochs=1, classifier_epochs=2, aux_loss=5.0)
    for row in script.ROWS:
        config = resolve_config(build_parser().parse_args(script.command(args, row, 20, 0)[3:]))
        assert config.model == ("classifier" if row == "classifier" else "m2")
        assert (config.z_dim, config.eval_k) == ((20, 100) if row == "classifier" else (2, 2))



def test_the_fair_protocol_puts_labels_in_every_m2_batch_and_stops_each_run_on_validation_accuracy(tmp_path):
    """--protocol fair: every M2 row trains with labelled examples in every batch and early stopping on the
    held-out labelled images, enum + aux with Kingma's alpha (0.1, scaled by N / N_labelled); the
    classifier on the same validation set, to its own early stop; pyro-vae accepts every command."""
    from pyro_vae.cli import build_parser, resolve_config

    args = _args(tmp_path, "fair")
    for row in script.ROWS:
        config = resolve_config(build_parser().parse_args(script.command(args, row, 100, 0)[3:]))
        classifier = row == "classifier"
        assert (config.validation_size, config.early_stop) == (10000, 100 if classifier else 20)
        assert config.epochs == (2000 if classifier else 100)
        assert config.labelled_per_batch == (None if classifier else 10)
    def config_of(args):
        return resolve_config(build_parser().parse_args(script.command(args, "enum + aux", 100, 0)[3:]))

    aux, quick = config_of(args), config_of(_args(tmp_path))
    assert (aux.aux_loss, aux.aux_loss_scale) == (0.1, "data")
    assert (quick.aux_loss, quick.aux_loss_scale, quick.labelled_per_batch, quick.early_stop) == (
        50.0, "fixed", None, None)


def test_the_fair_protocol_runs_n_100_and_1000_three_seeds_each_row_and_a_flag_overrides_it(tmp_path,
                                                                                           monkeypatch):
    """main(--protocol fair) starts 2 label counts x 5 rows x 3 seeds runs into runs/...-fair (here OUT),
    with --patience given on the command line in place of the protocol's."""
    calls = []
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **_: calls.append(cmd) or
                        script.subprocess.CompletedProcess(cmd, 1))
    script.main(["--protocol", "fair", "--dataset", "digits", "--out", str(tmp_path), "--patience", "7",
                 "--jobs", "1"])
    assert len(calls) == 2 * 5 * 3
    labels = sorted({int(cmd[cmd.index("--labels") + 1]) for cmd in calls})
    assert labels == [100, 1000]
    m2 = [cmd for cmd in calls if "m2" in cmd]
    assert all(cmd[cmd.index("--early-stop") + 1] == "7" for cmd in m2) and len(m2) == 24


def test_cells_give_the_range_of_epochs_and_best_epochs_over_the_seeds(tmp_path):
    for seed, (epochs, best) in enumerate([(41, 21), (100, 88), (41, 21)]):
        run = script.run_dir(tmp_path, "enum", 100, seed)
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "test_accuracy": 0.7, "test_elbo": -250.0, "epochs": epochs, "best_epoch": best,
            "train_seconds": 10.0, "device": "cpu"}))
    cell = script.summarize(tmp_path, ["enum"], [100], [0, 1, 2])["100/enum"]
    assert (cell["epochs"], cell["best_epochs"]) == ("41-100", "21-88")
    assert "3 seeds, 41-100 ep, best 21-88" in script.markdown({"100/enum": cell}, [100], ["enum"])
    one = script.summarize(tmp_path, ["enum"], [100], [1])["100/enum"]
    assert "(1 seed, 100 ep, best 88" in script.markdown({"100/enum": one}, [100], ["enum"])
