"""The published protocol's machinery: GatedDense networks, a seeded validation split with validation
and test binarized once, early stopping on the validation ELBO with best.pt, and resume continuing the
patience count."""

import importlib
import json

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.data import Dataset
from pyro_vae.models.nets import GatedDense
from pyro_vae.models.vae import build_vae
from pyro_vae.training import run_dir
from pyro_vae.training.train_data import prepare_data, split_validation

train_module = importlib.import_module("pyro_vae.training.train")

SMALL = {"dataset": "digits", "train_size": 300, "test_size": 60, "hidden": [16], "z_dim": 2,
         "batch_size": 50, "eval_k": 5}


def test_gated_dense_is_the_gated_linear_formula():
    """h = (W1 x + b1) * sigmoid(W2 x + b2), with the layer's own weights."""
    torch.manual_seed(0)
    layer = GatedDense(5, 3)
    x = torch.randn(4, 5)
    w1, b1, w2, b2 = layer.h.weight, layer.h.bias, layer.g.weight, layer.g.bias
    expected = (x @ w1.T + b1) * (1 / (1 + torch.exp(-(x @ w2.T + b2))))
    torch.testing.assert_close(layer(x), expected)


def test_gated_mlp_uses_gated_layers_in_encoder_and_decoder():
    vae = build_vae((1, 8, 8), encoder="gated-mlp", hidden=[12, 10], z_dim=3)
    for net in (vae.encoder, vae.decoder):
        assert sum(isinstance(m, GatedDense) for m in net.modules()) == 2
        assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    loc, scale = vae.encoder(torch.rand(7, 1, 8, 8))
    assert loc.shape == scale.shape == (7, 3) and (scale > 0).all()
    assert vae.decoder(loc).shape == (7, 1, 8, 8)


def test_the_validation_split_holds_out_examples_without_overlap():
    """Every training example lands in exactly one of the two parts (rows tagged by their index)."""
    n = 40
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n)
    split = split_validation(Dataset("tags", x, x[:3], y, y[:3]), 15, seed=3)
    train_ids, val_ids = split.train_x[:, 0, 0, 0].long(), split.val_x[:, 0, 0, 0].long()
    assert len(val_ids) == 15 and len(train_ids) == 25
    assert set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(n))
    assert torch.equal(split.train_y, train_ids)  # labels follow their images
    again = split_validation(Dataset("tags", x, x[:3], y, y[:3]), 15, seed=3)
    assert torch.equal(again.val_x, split.val_x)  # seeded
    other = split_validation(Dataset("tags", x, x[:3], y, y[:3]), 15, seed=4)
    assert not torch.equal(other.val_x, split.val_x)


def test_validation_and_test_are_binarized_once_and_training_images_are_not():
    config = Config.from_dict({**SMALL, "validation_size": 50, "binarize": "dynamic"})
    data, again = prepare_data(config), prepare_data(config)
    assert data.val_x.shape[0] == 50 and data.train_x.shape[0] == 250
    for x in (data.val_x, data.test_x):
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(data.val_x, again.val_x) and torch.equal(data.test_x, again.test_x)  # fixed
    assert not set(data.train_x.unique().tolist()) <= {0.0, 1.0}  # probabilities, drawn each epoch
    without = prepare_data(Config.from_dict({**SMALL, "binarize": "dynamic"}))
    assert torch.equal(without.test_x, data.test_x)  # a validation split leaves the test set as it was


def _trainer_run(tmp_path, monkeypatch, values, **settings):
    """Train with the validation ELBO of epoch e replaced by values[e - 1] (the rest is real)."""
    monkeypatch.setattr(train_module.Trainer, "validation_metrics",
                        lambda self: {"validation_elbo": values[self.epoch - 1]})
    config = Config.from_dict({**SMALL, "validation_size": 50, **settings})
    return train_module.train(config, tmp_path, progress=False, resume=(tmp_path / "config.json").exists())


def test_early_stopping_keeps_the_best_model_and_evaluates_it(tmp_path, monkeypatch):
    values = [-50.0, -40.0, -45.0, -41.0, -42.0, -30.0]
    result = _trainer_run(tmp_path / "run", monkeypatch, values, epochs=6, early_stop=3)
    rows = result.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # 3 epochs after epoch 2 without a better bound
    assert [r["validation_elbo"] for r in rows] == values[:5]
    assert [r["best_epoch"] for r in rows] == [1, 2, 2, 2, 2]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["step"] == rows[1]["step"] and best["validation_elbo"] == -40.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 2 and summary["stopped_early"] and summary["epochs"] == 5
    last = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert last["early_stop"] == {"best_epoch": 2, "best_validation_elbo": -40.0, "epochs_since_best": 3}
    _, vae = run_dir.load_model(tmp_path / "run")  # evaluate and sample load the best model
    state = vae.state_dict()
    assert all(torch.equal(state[k], best["model"][k]) for k in state)
    assert not all(torch.equal(state[k], last["model"][k]) for k in state)


def test_resume_continues_the_patience_count(tmp_path, monkeypatch):
    values = [-50.0, -40.0, -45.0, -41.0, -42.0, -30.0]
    straight = _trainer_run(tmp_path / "straight", monkeypatch, values, epochs=6, early_stop=3)
    _trainer_run(tmp_path / "run", monkeypatch, values, epochs=3, early_stop=3)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["early_stop"]["epochs_since_best"] == 1 and state["early_stop"]["best_epoch"] == 2
    resumed = _trainer_run(tmp_path / "run", monkeypatch, values, epochs=6, early_stop=3)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3, 4, 5]  # stopped where the straight run did
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(straight.metrics)
    a = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_cli_records_the_validation_bound_each_epoch(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--train-size", "300", "--test-size", "60", "--hidden", "16",
                 "--validation-size", "60", "--early-stop", "5", "--epochs", "2", "--eval-k", "5",
                 "--encoder", "gated-mlp", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["validation_size"] == 60 and config["early_stop"] == 5 and config["encoder"] == "gated-mlp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["validation_elbo"], float) and r["validation_elbo"] < 0 for r in rows)
    assert json.loads((out / "summary.json").read_text())["best_epoch"] in (1, 2)
    assert main(["sample", str(out), "--n", "4", "--device", "cpu"]) == 0


@pytest.mark.parametrize("settings, message", [
    ({"train_size": 100, "validation_size": 100}, "leaves none to train on"),
    ({"early_stop": 3}, "--validation-size"),
])
def test_bad_protocol_settings_are_input_errors(settings, message):
    from pyro_vae.errors import InputError

    with pytest.raises(InputError, match=message):
        Config.from_dict(settings)


def test_results_say_they_describe_best_pt_when_early_stopping_kept_one(tmp_path):
    """evaluate loads best.pt where it exists; eval.json's stamp names it, with its epoch and step."""
    run = tmp_path / "run"
    assert main(["train", "--epochs", "3", "--validation-size", "50", "--early-stop", "5", "--out", str(run),
                 "--train-size", "200", "--test-size", "30", "--eval-k", "5", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--eval-k", "5"]) == 0
    stamp = json.loads((run / "eval.json").read_text())["model_checkpoint"]
    best = torch.load(run / "best.pt", weights_only=True)
    assert stamp == {"checkpoint": "best.pt", "epoch": int(best["epoch"]), "step": int(best["step"])}
