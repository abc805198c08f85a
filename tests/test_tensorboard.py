"""`pyro-vae train --tensorboard`: the event files hold what the run measured (read back with
tensorboard's own reader), and asking without the package is an input error saying how to install it."""

import json
import sys

import pytest

from pyro_vae.cli import main

BASE = ["--train-size", "200", "--test-size", "40", "--hidden", "16", "--batch-size", "50", "--quiet"]
TINY = [*BASE, "--z-dim", "3", "--eval-k", "5"]  # the latent's settings: a classifier refuses them


def test_the_events_hold_every_step_loss_and_each_epochs_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = ["--epochs", "2", "--tensorboard", "--kl-anneal", "2"]
    assert main(["train", "--out", str(out), *flags, *TINY]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # 200 / 50 x 2 epochs
    for tag, key in (("test/elbo", "test_elbo"), ("test/recon", "test_recon"),
                     ("train/kl_weight", "kl_weight")):
        values = events.Scalars(tag)
        assert [e.step for e in values] == [r["step"] for r in rows]
        assert [e.value for e in values] == pytest.approx([r[key] for r in rows], rel=1e-6)
    kl = [e.value for e in events.Scalars("test/kl")]
    assert kl == pytest.approx([r["test_recon"] - r["test_elbo"] for r in rows], rel=1e-5)
    assert all(0 <= e.value <= 3 for e in events.Scalars("test/active_units"))
    # the mean training loss of each epoch is the mean of its steps' losses
    losses = [e.value for e in events.Scalars("train/loss")]
    assert sum(losses[:4]) / 4 == pytest.approx(rows[0]["train_loss"], rel=1e-5)
    for tag in ("samples", "reconstructions"):
        assert [e.step for e in events.Images(tag)] == [r["step"] for r in rows]


def test_tensorboard_without_the_package_is_an_input_error_saying_how_to_install(tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--tensorboard", *TINY]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[tensorboard]"' in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("model", [["--model", "m2", "--discrete", "relaxed", "--temperature-final", "0.5",
                                    "--z-dim", "3", "--eval-k", "5"],
                                   ["--model", "classifier"]], ids=["m2-relaxed", "classifier"])
def test_labelled_models_log_their_accuracy(model, tmp_path):
    """M2 and the classifier write the test accuracy of each epoch (M2 relaxed also its temperature);
    the classifier, which generates nothing, no images."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--tensorboard", "--labels", "20", *model,
                 *BASE]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [e.value for e in events.Scalars("test/accuracy")]
    assert accuracy == pytest.approx([r["test_accuracy"] for r in rows])
    tags = events.Tags()
    if "m2" in model:
        assert [e.value for e in events.Scalars("train/temperature")] == pytest.approx(
            [r["temperature"] for r in rows])
        assert "samples" in tags["images"]
    else:
        assert tags["images"] == []
