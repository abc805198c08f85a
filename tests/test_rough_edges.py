"""A new user's first hour: array layouts, tiny test sets, data on the wrong scale, threads, and
figures a reader understands (the stale results and resume with fewer epochs: test_report.py)."""

import json
import warnings

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.data import load_dataset
from pyro_vae.evaluation.compare import VAMP_NOTE, markdown, plot_snr
from pyro_vae.figures.plots import latent_2d

TINY = ["--hidden", "16", "--z-dim", "2", "--eval-k", "5", "--epochs", "1", "--quiet"]


def test_a_channels_last_array_is_read_as_channels_first(tmp_path):
    rng = np.random.default_rng(0)
    last = rng.random((30, 6, 5, 1)).astype(np.float32)
    np.save(tmp_path / "last.npy", last)
    np.save(tmp_path / "first.npy", last.transpose(0, 3, 1, 2))
    a, b = load_dataset(str(tmp_path / "last.npy")), load_dataset(str(tmp_path / "first.npy"))
    assert a.shape == (1, 6, 5) and torch.equal(a.train_x, b.train_x)
    rgb = rng.random((30, 6, 5, 3)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    x = load_dataset(str(tmp_path / "rgb.npy"))
    assert x.shape == (3, 6, 5)


def test_a_channels_last_array_trains_and_draws_its_figures(tmp_path):
    np.save(tmp_path / "last.npy", np.random.default_rng(0).random((40, 8, 8, 1)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "last.npy"), "--likelihood", "gaussian", "--out",
                 str(out), *TINY]) == 0
    for figure in ("samples.png", "reconstructions.png", "traversal.png", "latent_map.png"):
        assert (out / figure).is_file()


def test_a_channels_last_array_with_another_channel_count_is_refused_before_training(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((20, 8, 8, 2), np.float32))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "x.npy"), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "channels-last" in err and "(20, 8, 8, 2)" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_two_channel_images_train_and_skip_the_pictures_with_a_note(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 2, 8, 8)).astype(np.float32))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels; the data have 2"):
        assert main(["train", "--dataset", str(tmp_path / "x.npy"), "--likelihood", "gaussian",
                     "--out", str(out), *TINY]) == 0
    written = {p.name for p in out.iterdir()}
    assert {"summary.json", "latent_map.png", "curves.png"} <= written and "samples.png" not in written


def test_one_test_example_trains_and_skips_the_latent_map_with_a_note(tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="latent map needs 2 or more test examples"):
        assert main(["train", "--train-size", "100", "--test-size", "1", "--out", str(out), *TINY]) == 0
    written = {p.name for p in out.iterdir()}
    assert {"samples.png", "reconstructions.png", "traversal.png", "summary.json"} <= written
    assert not (out / "latent_map.png").exists()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_latent_2d_gives_two_coordinates_for_tiny_sets(n):
    points, _ = latent_2d(torch.randn(n, 5))
    assert points.shape == (n, 2) and torch.isfinite(points).all()


def test_0_to_255_data_with_a_continuous_likelihood_warns_how_to_rescale(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 4, 4)).astype(np.float32)
    np.save(tmp_path / "bytes.npy", pixels)
    with pytest.warns(UserWarning, match="divide 0..255 pixel values by 255"):
        assert main(["train", "--dataset", str(tmp_path / "bytes.npy"), "--likelihood", "gaussian",
                     "--out", str(tmp_path / "run"), *TINY]) == 0
    np.save(tmp_path / "unit.npy", np.random.default_rng(0).random((40, 4, 4)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "pixel values range")
        assert main(["train", "--dataset", str(tmp_path / "unit.npy"), "--likelihood", "gaussian",
                     "--out", str(tmp_path / "unit"), *TINY]) == 0


def test_0_to_255_data_with_bernoulli_advises_rescaling_not_binarize_none(tmp_path, capsys):
    np.save(tmp_path / "bytes.npy", np.full((40, 4, 4), 200.0, np.float32))
    data = str(tmp_path / "bytes.npy")
    assert main(["train", "--dataset", data, "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "divide 0..255 pixel values by 255" in err and "--binarize none" not in err


def test_threads_are_recorded_applied_and_may_change_on_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    out = tmp_path / "run"
    assert main(["train", "--train-size", "100", "--test-size", "20", "--threads", "2", "--out", str(out),
                 *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["threads"] == 2 and calls[0] == 2
    assert main(["train", "--resume", str(out), "--epochs", "2", "--threads", "1", "--quiet"]) == 0
    assert calls[2] == 1 and calls[1] == calls[3]  # each run's threads, then the caller's restored


def test_sample_n_draws_and_shows_exactly_n_images(tmp_path, monkeypatch):
    import pyro_vae.figures.plots as plots

    out = tmp_path / "run"
    assert main(["train", "--train-size", "100", "--test-size", "20", "--out", str(out), *TINY]) == 0
    shown = []
    grid = plots.image_grid
    monkeypatch.setattr(plots, "image_grid", lambda images, rows, cols: shown.append(
        (len(images), rows * cols)) or grid(images, rows, cols))
    for n in (10, 64, 7):
        assert main(["sample", str(out), "--n", str(n)]) == 0
        drawn, cells = next(s for s in shown if s[0] == n)  # the samples' grid (reconstructions: 32)
        assert cells >= n
        shown.clear()


def _record(prior="normal"):
    rows = [{"estimator": name, "particles": k, "encoder": {"snr": 1.0, "grad_var": 1.0},
             "decoder": {"snr": 2.0, "grad_var": 1.0}, "value_mean": -1.0, "value_mean_se": 0.1,
             "value_std": 1.0, "bias": -0.1, "ms_per_step": 1.0}
            for name, ks in (("mc", (1, 5)), ("analytic", (1, 5)), ("iwae", (50,))) for k in ks]
    return {"estimators": rows, "model": "VAE", "dataset": "digits", "n_examples": 8, "repeats": 3,
            "seed": 0, "device": "cpu", "log_px_ref": -1.0, "k_ref": 10, "prior": prior}


def test_snr_figure_ticks_are_the_particles_used_and_coinciding_lines_stay_apart(tmp_path, monkeypatch):
    import pyro_vae.evaluation.compare as compare

    saved = {}
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: saved.setdefault("fig", fig) and path)
    plot_snr(_record(), tmp_path / "snr.png")
    for ax in saved["fig"].axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "50"]
        xs = [tuple(line.get_xdata()) for line in ax.lines]
        assert len(set(xs)) == len(xs)  # mc and analytic share K and SNR, but not positions
        assert any("(K=50 only)" in t.get_text() for t in ax.get_legend().get_texts())


def test_compare_explains_the_vampprior_encoder_gradient():
    assert VAMP_NOTE in markdown(_record("vamp"))
    assert VAMP_NOTE not in markdown(_record("normal"))


def test_the_latent_map_names_fashion_mnist_classes(tmp_path, monkeypatch):
    import pyro_vae.figures.plots as plots
    from pyro_vae.data import CLASS_NAMES
    from pyro_vae.figures.plots import plot_latent_map
    from pyro_vae.models.vae import build_vae

    vae = build_vae((1, 4, 4), hidden=[8], z_dim=3)
    x = torch.rand(30, 1, 4, 4).bernoulli()
    labels = torch.arange(30) % 10
    saved = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.setdefault("fig", fig) and path)
    plot_latent_map(vae, x, labels, tmp_path / "map.png", CLASS_NAMES["fashion-mnist"])
    texts = [t.get_text() for t in saved["fig"].axes[0].get_legend().get_texts()]
    assert texts == list(CLASS_NAMES["fashion-mnist"])
