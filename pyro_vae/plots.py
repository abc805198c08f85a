"""Figures: samples from the prior, reconstructions, a latent traversal, a 2-D latent map and
training curves, written as PNGs. Pictures show the mean of p(x|z), clipped to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from .data import Dataset
from .model import VAE

TRAVERSAL_RANGE = 3.0  # z_u from -3 to 3: three prior standard deviations


def image_grid(images: Tensor, rows: int, cols: int, pad: int = 1) -> Tensor:
    """Tile images (rows * cols, C, H, W) into one (H', W', C) picture with `pad` pixels between."""
    c, h, w = images.shape[1:]
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad, c)
    for i, img in enumerate(images[: rows * cols]):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = img.permute(1, 2, 0).clamp(0, 1)
    return grid


def _save_grid(grid: Tensor, path: Path, title: str, xlabel: str = "", ylabel: str = "") -> Path:
    fig, ax = subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(grid.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


@torch.no_grad()
def plot_samples(vae: VAE, path: Path, n: int = 64, seed: int = 0) -> Path:
    """x = mean of p(x|z) for z ~ p(z): what the model generates from its prior (for an autoencoder,
    which has no prior: z ~ N(0, I) noise)."""
    torch.manual_seed(seed)
    z = vae.sample_latents(n)
    cols = int(n**0.5)
    title = ("decoded N(0, I) noise (an autoencoder has no prior)" if vae.is_autoencoder
             else "samples from the prior")
    return _save_grid(image_grid(vae.decode(z).cpu(), n // cols, cols), path, title)


@torch.no_grad()
def plot_reconstructions(vae: VAE, x: Tensor, path: Path, n: int = 16) -> Path:
    """Top row: test images; bottom row: mean of p(x|z) at z = E_q[z|x]."""
    x = x[:n]
    recon = vae.decode(vae.posterior(x).mean)
    grid = image_grid(torch.cat([x, recon]).cpu(), 2, len(x))
    return _save_grid(grid, path, "test images (top) and reconstructions (bottom)")


@torch.no_grad()
def plot_traversal(vae: VAE, x: Tensor, path: Path, n_dims: int = 8, steps: int = 9) -> Path:
    """Vary one latent coordinate at a time from -3 to 3, the others fixed at E_q[z|x] of one test
    image; one row per coordinate, the most used coordinates (largest Var_x E_q[z]) first."""
    means = vae.posterior(x[:512]).mean
    dims = means.var(0).argsort(descending=True)[:n_dims] if len(means) > 1 else torch.arange(n_dims)
    dims = dims[: means.shape[-1]]
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, steps, device=x.device)
    z = means[0].repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    images = vae.decode(z.reshape(-1, z.shape[-1])).cpu()
    return _save_grid(image_grid(images, len(dims), steps), path,
                      "latent traversal", f"z_u from -{TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:g}",
                      "coordinate u: " + ", ".join(str(int(d)) for d in dims))


def latent_2d(means: Tensor) -> tuple[Tensor, str]:
    """Posterior means as 2-D points: the means themselves if z is 2-D, else their first two
    principal components (PCA on the centred means)."""
    if means.shape[-1] <= 2:
        return torch.nn.functional.pad(means, (0, 2 - means.shape[-1])), "z"
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T, "PCA of z"


@torch.no_grad()
def plot_latent_map(vae: VAE, x: Tensor, labels: Tensor | None, path: Path) -> Path:
    """Scatter of E_q[z|x] over test images, coloured by label (PCA to 2-D above 2 dimensions)."""
    points, axis = latent_2d(vae.posterior(x).mean.cpu())
    fig, ax = subplots(figsize=(6, 5))
    colour = None if labels is None else labels.cpu().numpy()
    sc = ax.scatter(points[:, 0], points[:, 1], c=colour, cmap="tab10", s=4, alpha=0.7)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title("test posterior means E_q[z|x]")
    return save_figure(fig, path)


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **options):
    """A Figure and its axes, as pyplot.subplots makes them, but without pyplot: nothing global is
    touched (no backend is selected, no figure is kept), and savefig writes the file by itself."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **options)


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out `fig` and write it to `path` as a PNG (120 dpi); returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_curves(metrics: list[dict], path: Path) -> Path:
    """Train ELBO (= -train loss) and test ELBO per epoch, in nats per example (for an autoencoder:
    the reconstruction log-likelihood, train and test)."""
    fig, ax = subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    ae = metrics[0].get("test_elbo") is None
    key, name = ("test_recon", "log p(x|z)") if ae else ("test_elbo", "ELBO")
    ax.plot(epochs, [-m["train_loss"] for m in metrics], marker=".", label=f"train {name}")
    ax.plot(epochs, [m[key] for m in metrics], marker=".", label=f"test {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{name} (nats per example)")
    ax.legend()
    return save_figure(fig, path)


def save_figures(
    vae: VAE, data: Dataset, out: Path, metrics: list[dict] | None = None, seed: int = 0,
    n_samples: int = 64,
) -> list[Path]:
    """Write samples.png, reconstructions.png, traversal.png, latent_map.png (and curves.png
    when metrics are given) into `out`."""
    out = Path(out)
    vae.eval()
    paths = [
        plot_samples(vae, out / "samples.png", n=n_samples, seed=seed),
        plot_reconstructions(vae, data.test_x, out / "reconstructions.png"),
        plot_traversal(vae, data.test_x, out / "traversal.png"),
        plot_latent_map(vae, data.test_x, data.test_y, out / "latent_map.png"),
    ]
    if metrics:
        paths.append(plot_curves(metrics, out / "curves.png"))
    return paths
