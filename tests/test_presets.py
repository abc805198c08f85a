"""Presets shipped in the package: the published protocol's settings, overridden by config files and
flags, listed by `pyro-vae train --list-presets`."""

import argparse
import json

import pytest

from pyro_vae.cli import build_parser, main, resolve_config
from pyro_vae.config import Config
from pyro_vae.errors import InputError
from pyro_vae.presets import PRESETS, preset_settings

PUBLISHED = {"fashion-mnist-vae": "-228.70", "fashion-mnist-vampprior": "-227.35", "mnist-vae": "-84.45",
             "mnist-vampprior": "-82.43", "fashion-mnist-vae-exemplar": "-226.75 +- 0.07",
             "fashion-mnist-hvae-exemplar": "-226.53 +- 0.09"}


def _config(argv: list[str]) -> Config:
    args: argparse.Namespace = build_parser().parse_args(["train", *argv])
    return resolve_config(args)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_preset_is_the_published_protocol(name):
    config = _config(["--preset", name])
    assert (config.encoder, config.hidden, config.z_dim) == ("gated-mlp", [300, 300], 40)
    assert (config.lr, config.batch_size, config.kl_anneal) == (5e-4, 100, 100)
    protocol = (config.validation_size, config.early_stop, config.epochs, config.eval_k)
    assert protocol == (10_000, 50, 2000, 5000)
    assert config.binarize == "dynamic" and config.likelihood == "bernoulli"
    assert name.startswith(config.dataset + "-")
    if name.endswith("vampprior"):
        assert (config.prior, config.prior_components) == ("vamp", 500)
    elif name.endswith("exemplar"):
        assert (config.prior, config.exemplar_subset) == ("exemplar", 25_000)
    else:
        assert config.prior == "normal"
    assert PUBLISHED[name] in PRESETS[name].published


def test_flags_and_config_files_override_a_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("z_dim: 8\nlr: 0.001\n")
    config = _config(["--preset", "fashion-mnist-vae", "--config", str(tmp_path / "c.yaml"), "--lr", "0.002",
                      "--early-stop", "7"])
    assert config.z_dim == 8  # the file beats the preset
    assert config.lr == 0.002 and config.early_stop == 7  # flags beat both
    assert config.hidden == [300, 300] and config.validation_size == 10_000  # the rest stays


def test_preset_settings_are_a_copy():
    settings = preset_settings("mnist-vae")
    settings["hidden"].append(5)
    assert preset_settings("mnist-vae")["hidden"] == [300, 300]


def test_unknown_preset_is_an_input_error():
    with pytest.raises(InputError, match="unknown preset 'nope'"):
        _config(["--preset", "nope"])


def test_list_presets_prints_every_setting_and_target(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name, number in PUBLISHED.items():
        assert f"{name}:" in out and number in out
    assert "--encoder gated-mlp" in out and "--early-stop 50" in out and "--prior-components 500" in out
    assert "--prior exemplar --exemplar-subset 25000" in out


def test_a_preset_trains(tmp_path):
    """A preset with a small dataset and short run overriding it trains end to end, and records the
    preset's settings in config.json."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "fashion-mnist-vampprior", "--dataset", "digits", "--train-size", "300",
                 "--test-size", "40", "--validation-size", "50", "--hidden", "16", "--z-dim", "2",
                 "--prior-components", "5", "--epochs", "1", "--eval-k", "5", "--out", str(out),
                 "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["encoder"] == "gated-mlp" and config["prior"] == "vamp" and config["early_stop"] == 50
