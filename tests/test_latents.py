"""Latents for users (pyro_vae/evaluation/latents.py): `pyro-vae encode` (posterior means and scales per
example,
labels), `pyro-vae interpolate` (pictures decoded between two examples' posterior means), the same in
Python, and `pyro-vae --version`."""

import shutil

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.errors import InputError
from pyro_vae.evaluation.latents import encode, interpolate
from pyro_vae.inference.program import Program
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

from .conftest import QUICK


@pytest.fixture(scope="module")
def trained(digits_run):
    config, vae = load_model(digits_run)
    data = prepare_data(config)
    return vae, data


def test_encode_gives_the_guides_mean_and_standard_deviation_and_the_labels(trained):
    vae, data = trained
    x = data.test_x
    out = encode(vae, x, data.test_y, batch_size=50)  # in three batches
    q = vae.posterior(x)
    np.testing.assert_allclose(out["mean"], q.mean.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scale"], q.stddev.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(out["labels"], data.test_y.numpy())
    assert "scale" not in encode(vae, x, scales=False)


def test_pyro_vae_encode_writes_the_latents_of_the_test_set(digits_run, trained, tmp_path):
    vae, data = trained
    out = tmp_path / "z.npz"
    assert main(["encode", str(digits_run), "--out", str(out)]) == 0
    saved = np.load(out)
    np.testing.assert_allclose(saved["mean"], vae.posterior(data.test_x).mean.detach().numpy(), atol=1e-5)
    assert saved["scale"].shape == saved["mean"].shape and (saved["scale"] > 0).all()
    assert np.array_equal(saved["labels"], data.test_y.numpy())
    assert int(saved["epoch"]) == 3
    assert main(["encode", str(digits_run), "--data", "train", "--out", str(out)]) == 0
    assert np.load(out)["mean"].shape[0] == data.train_x.shape[0]


def test_an_autoencoder_has_codes_but_no_scales(tmp_path_factory, tmp_path):
    run = tmp_path_factory.mktemp("ae") / "run"
    assert main(["train", "--model", "ae", "--epochs", "1", "--out", str(run), *QUICK]) == 0
    with pytest.raises(InputError, match="point mass"):
        encode(load_model(run)[1], torch.zeros(2, 1, 8, 8))
    assert main(["encode", str(run), "--out", str(tmp_path / "z.npz")]) == 2
    assert not (tmp_path / "z.npz").exists()
    assert main(["encode", str(run), "--no-scales", "--out", str(tmp_path / "z.npz")]) == 0
    assert set(np.load(tmp_path / "z.npz").files) == {"mean", "labels", "epoch", "step"}


def test_interpolation_starts_and_ends_at_the_two_reconstructions(trained):
    vae, data = trained
    x = data.test_x
    images, z = interpolate(vae, x[:1], x[7:8], steps=5)
    assert images.shape == (5, 1, 8, 8)
    recon = Program.of(vae).reconstruct(torch.cat([x[:1], x[7:8]]))
    torch.testing.assert_close(images[0], recon[0])
    torch.testing.assert_close(images[-1], recon[1])
    torch.testing.assert_close(z[2], (z[0] + z[-1]) / 2)


def test_pyro_vae_interpolate_writes_a_figure_and_the_decoded_images(digits_run, trained, tmp_path):
    vae, data = trained
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert main(["interpolate", str(run), "--from", "3", "--to", "9", "--steps", "4"]) == 0
    saved = np.load(run / "interpolate_3_9.npz")
    assert saved["images"].shape == (4, 1, 8, 8)
    expected, _ = interpolate(vae, data.test_x[3:4], data.test_x[9:10], steps=4)
    np.testing.assert_allclose(saved["images"], expected.numpy(), atol=1e-6)
    assert (run / "interpolate_3_9.png").stat().st_size > 0


def test_pyro_vae_version_prints_the_packages_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyro-vae {pyro_vae.__version__}"
