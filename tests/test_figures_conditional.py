"""Figures of a conditional VAE (pyro_vae/figures/conditional.py): quadrant completions beside the
baseline's prediction, and samples per class."""

import pyro
import pytest
import torch
from PIL import Image

from pyro_vae.data import CLASS_NAMES
from pyro_vae.errors import InputError
from pyro_vae.figures.conditional import (
    class_sample_images,
    completion_images,
    plot_class_samples,
    plot_completions,
)
from pyro_vae.models.conditions import given_pixels
from pyro_vae.models.cvae import build_cvae
from pyro_vae.models.nn_baseline import build_baseline

SHAPE = (1, 8, 8)


def test_completions_show_the_given_pixels_in_every_column_and_differ_between_draws(tmp_path):
    torch.manual_seed(0)
    base = build_baseline(SHAPE, "quadrants:1", hidden=(16,))
    cvae = build_cvae(SHAPE, "quadrants:1", hidden=(16,), z_dim=3, baseline=base)
    x = torch.bernoulli(torch.full((3, *SHAPE), 0.5))
    c = cvae.condition.condition(x)
    tiles, names = completion_images(cvae, x, c, base, n_samples=4)
    assert names == ["given", "truth", "baseline", "CVAE 1", "CVAE 2", "CVAE 3", "CVAE 4"]
    assert tiles.shape == (3, 7, 3, 8, 8)
    given = given_pixels(8, 8, 1)
    for column in range(7):
        assert torch.equal(tiles[:, column, 0][:, given], x[:, 0][:, given])
    assert not torch.equal(tiles[:, 0, 2][:, ~given], tiles[:, 0, 0][:, ~given])  # missing: coloured
    assert not torch.equal(tiles[:, 3][..., ~given], tiles[:, 4][..., ~given])  # draws differ
    path = plot_completions(cvae, x, c, tmp_path / "completions.png", base, n_samples=4)
    assert Image.open(path).size[0] > Image.open(path).size[1]  # 7 columns, 3 rows


def test_class_samples_give_one_row_per_class_decoded_under_that_class(tmp_path):
    torch.manual_seed(0)
    cvae = build_cvae(SHAPE, "class", hidden=(16,), z_dim=3, n_classes=4)
    images = class_sample_images(cvae, n_per_class=5, seed=3)
    assert images.shape == (4, 5, 1, 8, 8)
    pyro.set_rng_seed(3)
    c = cvae.condition.condition(torch.zeros(1), torch.arange(4).repeat_interleave(5))
    torch.testing.assert_close(images.flatten(0, 1), cvae.complete(c))
    path = plot_class_samples(cvae, tmp_path / "classes.png", CLASS_NAMES["fashion-mnist"][:4], n_per_class=5)
    assert Image.open(path).size[0] > 0
    with pytest.raises(InputError, match="completions need a quadrant condition"):
        plot_completions(cvae, torch.zeros(2, *SHAPE), c[:2], tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()
