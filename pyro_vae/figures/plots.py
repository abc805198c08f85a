"""Figures: samples from the prior, reconstructions, a latent traversal, a 2-D latent map and
training curves, written as PNGs. Pictures show the mean of p(x|z), clipped to [0, 1], for our VAE or
any model/guide pair that meets the Program contract: a picture is the mean of the observed site's
distribution reshaped like x (N, C, H, W). A figure that cannot be made for a pair (no mean, a
traversal of several latent sites, data that are not pictures) raises an InputError saying why, and
save_figures skips it with a one-line warning."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from ..data import CLASS_NAMES, IMAGE_CHANNELS, Dataset
from ..errors import InputError
from ..inference.program import Program
from ..models.kind import ModelKind, Picture, kind_of
from ..rng import seeded
from ..staging import write_all_or_none
from ..stats import mean_se

# the bound drawn against seconds: the first of these a run records
TIMED_BOUNDS = (("validation_elbo", "validation ELBO"), ("test_elbo", "test ELBO"))
TRAVERSAL_RANGE = 3.0  # z_u from -3 to 3: three prior standard deviations
MAX_LEGEND_CLASSES = 20  # the latent map names its classes in a legend up to this many
LEGEND_BELOW_AXIS_PAD = 4.2  # axes bottom to a legend below it, in its font sizes: x tick labels and x label


def image_grid(images: Tensor, rows: int, cols: int, pad: int = 1) -> Tensor:
    """Tile images (rows * cols, C, H, W) into one (H', W', C) picture with `pad` pixels between."""
    c, h, w = images.shape[1:]
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad, c)
    for i, img in enumerate(images[: rows * cols]):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = img.permute(1, 2, 0).clamp(0, 1)
    return grid


def _save_grid(grid: Tensor, path: Path, title: str, xlabel: str = "", ylabel: str = "",
               row_labels: list[str] | None = None) -> Path:
    """Show a tiled grid (image_grid) with a title, axis labels and optionally one label per row."""
    fig, ax = subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(grid.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    if row_labels:
        height = grid.shape[0] / len(row_labels)
        ax.set_yticks([height * (i + 0.5) for i in range(len(row_labels))], labels=row_labels)
    return save_figure(fig, path)


def _check_pictures(x: Tensor) -> None:
    if x.dim() != 4:
        raise InputError(f"pictures need data of shape (N, C, H, W); x has shape {tuple(x.shape)}")
    if x.shape[1] not in IMAGE_CHANNELS:
        raise InputError(f"pictures need 1 (grayscale) or 3 (RGB) channels; the data have {x.shape[1]}")


def _rows(x: Tensor, n: int) -> Tensor:
    """n rows of x (cycling through them): a batch of the right size and shape for the model."""
    return x[torch.arange(n, device=x.device) % x.shape[0]]


@torch.no_grad()
def plot_samples(program: object, x: Tensor, path: Path, n: int = 64, seed: int = 0,
                 title: str | None = None) -> Path:
    """x = mean of p(x|z) for z ~ p(z): what the model generates from its prior (for an autoencoder,
    which has no prior: z ~ N(0, I) noise); x gives the pictures' shape; `title` by default the model
    kind's (ModelKind.sample_title)."""
    program = Program.of(program)
    _check_pictures(x)
    with seeded(seed, x.device):
        images = program.sample(_rows(x, n)).cpu()
    cols = math.ceil(n**0.5)
    title = kind_of(program).sample_title if title is None else title
    return _save_grid(image_grid(images, math.ceil(n / cols), cols), path, f"{n} {title}")


@torch.no_grad()
def plot_class_samples(model: object, x: Tensor, path: Path, class_names: list[str] | None = None,
                       n_styles: int = 10, seed: int = 0) -> Path:
    """For a model with a class latent (M2, m2.py): the mean of p(x|y, z_j), one row per class y, one
    column per draw z_j ~ p(z) shared by the rows: the "style" z kept, the class changed."""
    _check_pictures(x)
    with seeded(seed, x.device):
        z = model.prior().sample((n_styles,))
    images = model.class_samples(z).flatten(0, 1).reshape(-1, *x.shape[1:]).cpu()
    names = class_names or [str(c) for c in range(model.n_classes)]
    return _save_grid(image_grid(images, model.n_classes, n_styles), path,
                      "one class per row, one shared z ~ p(z) per column",
                      "z_j ~ p(z), the same in every row", row_labels=[f"y={name}" for name in names])


@torch.no_grad()
def plot_reconstructions(program: object, x: Tensor, path: Path, n: int = 16) -> Path:
    """Top row: test images; bottom row: mean of p(x|z) at z = E_q[z|x]."""
    _check_pictures(x)
    x = x[:n]
    recon = Program.of(program).reconstruct(x)
    grid = image_grid(torch.cat([x, recon]).cpu(), 2, len(x))
    return _save_grid(grid, path, "test images (top) and reconstructions (bottom)")


@torch.no_grad()
def plot_traversal(program: object, x: Tensor, path: Path, n_dims: int = 8, steps: int = 9) -> Path:
    """Vary one coordinate of the latent site at a time from -3 to 3, the others fixed at E_q[z|x] of
    one test image (a discrete site, such as M2's class, at its most likely value there); one row per
    coordinate, the most used coordinates (largest Var_x E_q[z]) first. Needs a program with one
    continuous latent site."""
    program = Program.of(program)
    _check_pictures(x)
    latent = program.continuous_sites(x)
    if len(latent) != 1:
        raise InputError(f"a traversal varies the coordinates of one continuous latent site; this pair has "
                         f"{len(latent)} ({', '.join(map(repr, latent))})")
    (name,) = latent
    moments = program.posterior_moments(x[:512])
    mean, _ = moments[name]
    means = mean.flatten(1)
    dims = means.var(0).argsort(descending=True)[:n_dims] if len(means) > 1 else torch.arange(n_dims)
    dims = dims[: means.shape[-1]]
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, steps, device=x.device)
    z = means[0].repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    z = z.reshape(-1, *mean.shape[1:])
    fixed = {site: mode[:1].expand(z.shape[0], *mode.shape[1:]) for site, (mode, _) in moments.items()
             if site != name}
    images = program.decode(_rows(x, z.shape[0]), {name: z, **fixed}).cpu()
    return _save_grid(image_grid(images, len(dims), steps), path,
                      "latent traversal: one coordinate per row, most used first",
                      f"{name}_u from -{TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:g}, "
                      f"the others at E_q[{name}|x]",
                      row_labels=[f"{name}_{int(d)}" for d in dims])


def latent_2d(means: Tensor, name: str = "z") -> tuple[Tensor, str]:
    """Posterior means as 2-D points: the means themselves if they are 2-D, else their first two
    principal components (PCA on the centred means); and the axis label, from `name`."""
    if means.shape[-1] <= 2:
        return torch.nn.functional.pad(means, (0, 2 - means.shape[-1])), name
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = centred @ v[:2].T  # fewer than 2 components when there are fewer than 3 examples
    return torch.nn.functional.pad(points, (0, 2 - points.shape[-1])), f"PCA of {name}"


@torch.no_grad()
def plot_latent_map(program: object, x: Tensor, labels: Tensor | None, path: Path,
                    class_names: Sequence[str] | None = None) -> Path:
    """Scatter of E_q[z|x] over test images, coloured by label (PCA to 2-D above 2 dimensions; with
    several continuous latent sites, of all their coordinates together; discrete sites have no mean): a
    legend entry per class (its name from class_names where known) up to 20 classes, a colour bar
    beyond. Needs 2 or more examples."""
    program = Program.of(program)
    if x.shape[0] < 2:
        raise InputError(f"a latent map needs 2 or more test examples, there is {x.shape[0]}")
    latent = program.continuous_sites(x)
    name = latent[0] if len(latent) == 1 else f"({', '.join(latent)})"
    points, axis = latent_2d(program.posterior_means(x).cpu(), name)
    fig, ax = subplots(figsize=(7, 5))
    classes = labels.unique().tolist() if labels is not None else []
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7)
    elif len(classes) <= MAX_LEGEND_CLASSES:
        labels = labels.cpu()
        for i, c in enumerate(classes):
            shown = class_names[int(c)] if class_names and 0 <= int(c) < len(class_names) else str(c)
            ax.scatter(points[labels == c, 0], points[labels == c, 1], s=4, alpha=0.7,
                       color=f"C{i % 10}" if len(classes) <= 10 else None, label=shown)
        ax.legend(title="label", markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    else:
        sc = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="viridis", s=4, alpha=0.7)
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(f"test posterior means E_q[{name} | x]")
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
    """One run's learning curves (see plot_run_curves): -train loss, validation and test ELBO per epoch
    in nats per example (for an autoencoder the reconstruction log p(x|z)), the best epoch where early
    stopping kept one; for a model with labels (M2), a second panel with the test accuracy."""
    return plot_run_curves({"": metrics}, path)


def _plot_points(ax: Axes, points: list[tuple[int, float]], style: str, colour: str, label: str) -> None:
    """One curve of (epoch, value) points; dots mark the epochs where there are few (under 30)."""
    ax.plot(*zip(*points, strict=True), style, marker="." if len(points) < 30 else None, color=colour,
            label=label)


def run_colour(i: int, n: int) -> str | tuple[float, float, float]:
    """The colour of the i-th of n runs or groups: matplotlib's ten (C0 ... C9) up to ten, past ten the
    twenty of the tab20 map, so that up to twenty share no colour."""
    return f"C{i}" if n <= 10 else colormaps["tab20"].colors[i % 20]


def _accuracy_panel(ax: Axes, runs: dict[str, list[dict]]) -> None:
    """Test accuracy of q(y|x) per epoch into `ax`, a colour per run (`runs`: name -> metrics rows);
    the epoch axis is logarithmic when the runs' lengths differ tenfold (M2 and the classifier)."""
    lengths = []
    for i, (name, metrics) in enumerate(runs.items()):
        points = [(m["epoch"], m["test_accuracy"]) for m in metrics if m.get("test_accuracy") is not None]
        if points:
            lengths.append(points[-1][0])
            _plot_points(ax, points, "-", run_colour(i, len(runs)), name)
    log = bool(lengths) and max(lengths) >= 10 * max(min(lengths), 1)
    if log:
        ax.set_xscale("log")
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch (log scale)" if log else "epoch")
    ax.set_ylabel("test accuracy of q(y|x)")
    ax.set_title("test accuracy per epoch (most likely class of q(y|x))", fontsize="medium")


def plot_run_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """run_curves_figure(runs) written to `path`; returns path."""
    return save_figure(run_curves_figure(runs), path)


def run_curves_figure(runs: dict[str, list[dict]]) -> Figure:
    """Several runs' learning curves, a colour per run: the train bound (-train loss, solid; below the
    ELBO only by the KL weight during warm-up and alpha log q(y|x) with --aux-loss), the validation
    ELBO (dotted, where recorded) and the test ELBO (dashed) per epoch, in nats per example, and a
    vertical line at each run's best epoch (early stopping); autoencoders give log p(x|z) instead of
    the ELBO. Where runs record a test accuracy (M2, the classifier), a second panel with it per
    epoch; a run without a bound (the classifier) is in that panel alone. One run's legend names its
    curves; several runs' legend, under the first panel, names each run once in its colour (the same in
    both panels) with its best epoch, after a key of the line styles. `runs` maps a run's name ("" for a
    lone run) to its metrics.jsonl rows."""
    accuracy = any(m.get("test_accuracy") is not None for rows in runs.values() for m in rows)
    fig, axes = subplots(1, 2 if accuracy else 1, figsize=(12 if accuracy else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    bounded = {name: rows for name, rows in runs.items() if rows and "train_loss" in rows[0]
               and any(m.get("test_elbo") is not None or m.get("test_recon") is not None for m in rows)}
    ae = bool(bounded) and all(m.get("test_elbo") is None for rows in bounded.values() for m in rows)
    test_key, quantity = ("test_recon", "log p(x|z)") if ae else ("test_elbo", "ELBO")
    styles = (("-train loss", lambda m: -m["train_loss"], "-"),
              (f"validation {quantity}", lambda m: m.get("validation_elbo"), ":"),
              (f"test {quantity}", lambda m: m.get(test_key), "--"))
    for i, (name, metrics) in enumerate(runs.items()):
        if name not in bounded:
            continue  # no bound: its loss is not in nats of x
        colour = run_colour(i, len(runs))
        for kind, value, style in styles:
            points = [(m["epoch"], value(m)) for m in metrics if value(m) is not None]
            if points:
                _plot_points(ax, points, style, colour, f"{name}, {kind}" if name else kind)
        best = metrics[-1].get("best_epoch")
        if best is not None:
            ax.axvline(best, color=colour, linewidth=0.8, alpha=0.6,
                       label=f"{name}, best epoch {best}" if name else f"best epoch {best}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{quantity} (nats per example)")
    ax.set_title("learning curves: -train loss solid, validation dotted, test dashed", fontsize="medium")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(runs) > 1:
        _legend_below(fig, ax, _run_key(ax, runs))
    elif ax.lines:
        ax.legend(fontsize="small")
    if ax.lines:
        _clip_warmup(ax, bounded, lambda m: (-m["train_loss"], m.get("validation_elbo"), m.get(test_key)))
    if accuracy:
        _accuracy_panel(axes[0][1], runs)
    return fig


def _run_key(ax: Axes, runs: dict[str, list[dict]]) -> list[Line2D]:
    """Legend handles for several runs: a grey line per style drawn in `ax` (labels "name, kind"), then a
    line per run in its colour (run_colour, in the order of `runs`, as both panels draw them) named with
    its best epoch."""
    styles: dict[str, Line2D] = {}
    for line in ax.lines:
        kind = line.get_label().rpartition(", ")[2]
        kind = "best epoch (vertical)" if kind.startswith("best epoch") else kind
        styles.setdefault(kind, Line2D([], [], color="0.4", linestyle=line.get_linestyle(),
                                       linewidth=line.get_linewidth(), label=kind))
    named = []
    for i, (name, rows) in enumerate(runs.items()):
        best = rows[-1].get("best_epoch") if rows else None
        label = name if best is None else f"{name}, best epoch {best}"
        named.append(Line2D([], [], color=run_colour(i, len(runs)), label=label))
    return [*styles.values(), *named]


def _legend_below(fig: Figure, ax: Axes, handles: list[Line2D]) -> None:
    """A legend of `handles` under `ax`, below its x axis's ticks and label and centred on it, in two
    columns past 8 entries where two columns fit its width (measured); the figure is made taller by the
    legend's height, so the axes keep their width and height however many runs and however long their
    names."""
    width, height = fig.get_size_inches()
    renderer = FigureCanvasAgg(fig).get_renderer()
    for columns in (2, 1) if len(handles) > 8 else (1,):
        legend = ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 0),
                           ncol=columns, borderaxespad=LEGEND_BELOW_AXIS_PAD)
        extent = legend.get_window_extent(renderer)  # measured, not guessed
        if extent.width <= ax.get_window_extent(renderer).width:
            break
    fig.set_size_inches(width, height + extent.height / fig.dpi)


def _clip_warmup(ax: Axes, runs: dict[str, list[dict]], plotted: Callable[[dict], Iterable[float | None]],
                 extra: Iterable[float] = ()) -> None:
    """Zoom the y axis on convergence for long runs (20 epochs or more): it spans the plotted values
    (`plotted`: a metrics row's values drawn, None where absent) of the last three quarters of each run's
    epochs at full KL weight, the `extra` values drawn (markers), and a margin; the first epochs (bounds
    hundreds of nats lower) and the warm-up's -loss (not a bound) run off the axis."""
    tail = list(extra)
    for rows in runs.values():
        full = [m for m in rows if m.get("kl_weight", 1.0) == 1.0]
        tail += [v for m in full[len(full) // 4:] for v in plotted(m) if v is not None]
    if len(tail) > 1 and max((len(rows) for rows in runs.values()), default=0) >= 20:
        low, high = min(tail), max(tail)
        margin = 0.1 * (high - low) + 1e-6
        ax.set_ylim(low - margin, high + margin)


@dataclass(frozen=True)
class TimedRun:
    """One run on the wall-clock axis (`pyro-vae report --x seconds`): its metrics.jsonl rows, each with
    its epoch's `seconds`, and its final test log p(x) from eval.json (None where it has none)."""

    metrics: list[dict]
    log_px: float | None = None


@dataclass(frozen=True)
class SeedBand:
    """Seeds' curves on a common grid of seconds: the mean over seeds at each grid point and its s.e."""

    grid: np.ndarray
    mean: np.ndarray
    se: np.ndarray


def cumulative_seconds(metrics: list[dict]) -> np.ndarray:
    """t_e = sum of the rows' `seconds` up to and including epoch e: the training wall time at the end of
    each epoch (sessions of a resumed run included, as the trainer records them)."""
    return np.cumsum([float(m["seconds"]) for m in metrics])


def bound_key(metrics: list[dict]) -> tuple[str, str] | None:
    """The metric drawn against seconds for a run and its name: the first of TIMED_BOUNDS it records."""
    return next(((key, name) for key, name in TIMED_BOUNDS if any(m.get(key) is not None for m in metrics)),
                None)


def bound_curve(metrics: list[dict]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """A run's bound against cumulative seconds: the validation ELBO where the run records one, else the
    test ELBO, as (its name, seconds, values) at the epochs that have it; None for a run with neither (the
    classifier)."""
    found = bound_key(metrics)
    if found is None:
        return None
    key, name = found
    at = [i for i, m in enumerate(metrics) if m.get(key) is not None]
    return name, cumulative_seconds(metrics)[at], np.array([metrics[i][key] for i in at], dtype=float)


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> SeedBand | None:
    """Several seeds' curves (seconds, values) on a common grid: the seeds' own seconds inside the span
    every seed covers (from the latest first point to the earliest last one), each curve interpolated
    linearly there, y_s(t); the mean over seeds of y_s(t) and its s.e. (mean_se). None where the spans do
    not overlap."""
    start, end = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    if start > end:
        return None
    grid = np.unique(np.concatenate([x[(x >= start) & (x <= end)] for x, _ in curves]))
    mean, se = (v.numpy() for v in mean_se(np.stack([np.interp(grid, x, y) for x, y in curves]), dim=0))
    return SeedBand(grid, mean, se)


def _spread(n: int) -> str:
    """What mean ± s.e. over n seeds is, in words (with 2 seeds it is their min–max)."""
    return "min–max" if n == 2 else "± s.e."


def plot_seconds_curves(groups: dict[str, list[TimedRun]], path: Path) -> Path:
    """seconds_curves_figure(groups) written to `path`; returns path."""
    return save_figure(seconds_curves_figure(groups), path)


def seconds_curves_figure(groups: dict[str, list[TimedRun]]) -> Figure:
    """Learning curves against training wall time (`pyro-vae report --x seconds`), a colour per group of
    runs (`groups`: label -> its runs, the seeds of one setting): the bound (bound_curve: validation ELBO,
    else test ELBO) against cumulative seconds, and the final test log p(x) as a marker at the run's total
    seconds. A group of one run is a plain curve and marker; a group of several is the mean over seeds on a
    common grid of seconds (seed_band) with a band of ± one s.e. over seeds (with 2 seeds: their min–max),
    and one marker at the seeds' mean total seconds, their mean log p(x) ± s.e. (a bar), with each seed's own
    curve and log p(x) drawn faintly (_draw_seeds: the band ends with the shortest seed). Nats per
    example; the y axis zoomed past the KL warm-up (_clip_warmup). Runs without a bound have no curve.
    Where runs have a final log p(x), a second panel (axes[1]) draws the same over the last half of the
    wall time (from earlier where a marker sits earlier), zoomed on the finals (_zoom_on_finals): there
    tenths of a nat between runs are visible."""
    finals = any(_has_log_px(run) for runs in groups.values() for run in runs)
    fig, axes = subplots(1, 2 if finals else 1, figsize=(15 if finals else 9, 6), squeeze=False,
                         gridspec_kw={"width_ratios": [3, 2]} if finals else None)
    ax = axes[0][0]
    drawn, markers, marker_seconds, curves, t_max = _draw_seconds_groups(axes[0], groups)
    ax.set_title("the bound against training wall time; \u25c6 final test log p(x) at the run's total time\n"
                 "several seeds: their mean, band and bar \u00b1 s.e. over seeds (2 seeds: min\u2013max);\n"
                 "faint: each seed's own curve, \u25c7 its own log p(x)", fontsize="medium")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13))
        _clip_warmup(ax, drawn, lambda m: (m["drawn"],), markers)
    if finals:
        zoom = axes[0][1]
        _zoom_on_finals(zoom, curves, markers, marker_seconds, t_max)
        zoom.set_title("the end of training, zoomed on the final test log p(x)", fontsize="medium")
    return fig


Curve = tuple[np.ndarray, np.ndarray]  # (seconds, values)


def _has_log_px(run: TimedRun) -> bool:
    """Whether the run has epochs and a final test log p(x) to mark at its total seconds."""
    return run.log_px is not None and bool(run.metrics)


def _draw_seconds_groups(axes: Sequence[Axes], groups: dict[str, list[TimedRun]]
                         ) -> tuple[dict[str, list[dict]], list[float], list[float], list[Curve], float]:
    """seconds_curves_figure's curves, bands and markers, computed once and drawn into each of `axes`;
    returns what the zooms span: the value drawn per epoch of each run (for _clip_warmup), the markers'
    extent (log p(x), ± s.e. for a bar), their seconds, each drawn curve as (seconds, values) and the latest
    time drawn."""
    drawn: dict[str, list[dict]] = {}
    markers: list[float] = []
    marker_seconds: list[float] = []
    plotted: list[Curve] = []
    t_max = 0.0
    for i, (label, runs) in enumerate(groups.items()):
        colour = run_colour(i, len(groups))
        curves = [curve for run in runs if run.metrics and (curve := bound_curve(run.metrics)) is not None]
        for j, run in enumerate(runs):  # what the zoom spans: the value drawn, per epoch
            if (found := bound_key(run.metrics)) is not None:
                drawn[f"{label} {j}"] = [{"kl_weight": m.get("kl_weight", 1.0), "drawn": m.get(found[0])}
                                         for m in run.metrics]
        finals = [(float(cumulative_seconds(run.metrics)[-1]), run.log_px)  # each run's total seconds
                  for run in runs if _has_log_px(run)]
        band = seed_band([(x, y) for _, x, y in curves]) if len(curves) > 1 else None
        if band is not None:
            n = len(curves)
            for ax in axes:
                ax.fill_between(band.grid, band.mean - band.se, band.mean + band.se, color=colour, alpha=0.2,
                                linewidth=0, label=f"_band {label}")  # "_": not in the legend
                ax.plot(band.grid, band.mean, "-", color=colour,
                        label=f"{label}: {curves[0][0]}, mean of {n} seeds ({_spread(n)})")
            plotted.append((band.grid, band.mean))
            _draw_seeds(axes, label, colour, curves, finals, markers, marker_seconds)
            plotted += [(x, y) for _, x, y in curves]
        for j, (quantity, x, y) in enumerate(curves if band is None else []):
            apart = " (each seed: no seconds in common)" if len(curves) > 1 else ""
            for ax in axes:
                _plot_points(ax, list(zip(x.tolist(), y.tolist(), strict=True)), "-", colour,
                             f"{label}: {quantity}{apart}" if j == 0 else "_nolegend_")
            plotted.append((x, y))
        if len(finals) == 1:
            for ax in axes:
                ax.plot([finals[0][0]], [finals[0][1]], "D", color=colour, markeredgecolor="black",
                        label=f"_log p(x) {label}")  # the legend names the group once, by its curve
            markers.append(finals[0][1])
            marker_seconds.append(finals[0][0])
        elif finals:
            seconds, log_px = np.array(finals).T
            mean, se = mean_se(log_px)
            for ax in axes:
                ax.errorbar([seconds.mean()], [mean], yerr=[se], fmt="D", color=colour,
                            markeredgecolor="black", capsize=4, label=f"_log p(x) {label}")
            markers += [mean - se, mean + se]
            marker_seconds.append(float(seconds.mean()))
        t_max = max([t_max, *(float(x[-1]) for _, x, _ in curves), *(t for t, _ in finals)])
    for ax in axes:
        ax.set_xlabel("training wall time (seconds, summed over epochs)")
        ax.set_ylabel("nats per example")
        ax.set_xlim(left=0)
    return drawn, markers, marker_seconds, plotted, t_max


def _draw_seeds(axes: Sequence[Axes], label: str, colour: str,
                curves: list[tuple[str, np.ndarray, np.ndarray]], finals: list[tuple[float, float]],
                markers: list[float], marker_seconds: list[float]) -> None:
    """Each seed of a group drawn faintly beside the group's mean and band: its own curve to its own end,
    and its final log p(x) as a hollow marker at its own total seconds (`finals`: (seconds, log p(x)) per
    seed; added to `markers` and `marker_seconds`, what the zoom spans); labelled "_seed J: LABEL" (not in
    the legend)."""
    for j, (_, x, y) in enumerate(curves):
        for ax in axes:
            ax.plot(x, y, "-", color=colour, linewidth=0.6, alpha=0.35, label=f"_seed {j}: {label}")
    for j, (t, log_px) in enumerate(finals):
        for ax in axes:
            ax.plot([t], [log_px], "D", markersize=4, markerfacecolor="none", color=colour, alpha=0.7,
                    label=f"_seed {j} log p(x): {label}")
        markers.append(log_px)
        marker_seconds.append(t)


def _zoom_on_finals(ax: Axes, curves: list[Curve], markers: list[float], marker_seconds: list[float],
                    t_max: float) -> None:
    """Zoom `ax` on the end of training: x from half the latest time t_max (or just before the earliest
    marker, `marker_seconds`, where one sits earlier: a group's mean total time can) to t_max; y from the
    lowest final marker (`markers`: log p(x), with its bars) to the highest of the markers and of the curves'
    values (`curves`: seconds, values) from that start, with a margin; curves far below the finals run off
    the axis."""
    start = min([0.5 * t_max, *(0.95 * t for t in marker_seconds)])
    late = [float(v) for x, y in curves for v in y[x >= start]]
    low, high = min(markers), max([*markers, *late])
    margin = 0.1 * (high - low) + 0.05
    ax.set_xlim(start, t_max + 0.02 * t_max)
    ax.set_ylim(low - margin, high + margin)


def save_figures(
    program: object, data: Dataset | Tensor, out: Path, metrics: list[dict] | None = None, seed: int = 0,
    n_samples: int = 64, kind: ModelKind | None = None,
) -> list[Path]:
    """Write samples.png, reconstructions.png, traversal.png, latent_map.png (class_samples.png for a
    model with a class latent, curves.png when metrics are given) into the folder `out` (made if missing), for
    our VAE or any model/guide pair (Program.of); data: a Dataset (its test images and labels) or a tensor of
    test images. Which figures: those of the model's kind (`kind`, by default kind_of(program):
    ModelKind.figure_names), with the figures the kind makes itself (ModelKind.pictures, e.g. a CVAE's
    completions; given a Dataset). A figure the pair cannot give is skipped with a one-line warning saying
    why; a pair that breaks the contract is an InputError. Returns the paths written."""
    kind = kind_of(program) if kind is None else kind
    program, out = Program.of(program), Path(out)
    x, labels = (data, None) if isinstance(data, Tensor) else (data.test_x, data.test_y)
    class_names = None if isinstance(data, Tensor) else CLASS_NAMES.get(data.name)
    if kind.latent:  # a pair that breaks the contract is an error, not a figure to skip
        program.sites(x, *kind.conditions(program.owner, x, labels))
    drawn: dict[str, Callable[[Path], Path]] = {
        "samples.png": lambda path: plot_samples(program, x, path, n=n_samples, seed=seed,
                                                 title=kind.sample_title),
        "reconstructions.png": lambda path: plot_reconstructions(program, x, path),
        "traversal.png": lambda path: plot_traversal(program, x, path),
        "latent_map.png": lambda path: plot_latent_map(program, x, labels, path, class_names),
        "class_samples.png": lambda path: plot_class_samples(program.owner, x, path, class_names, seed=seed),
    }
    own = {} if isinstance(data, Tensor) else kind.pictures(program.owner, data, seed)  # the kind's own
    drawn.update({name: partial(draw_picture, picture) for name, picture in own.items()})
    unknown = [name for name in kind.figure_names(program.owner) if name not in drawn]
    if unknown:
        raise InputError(f"model kind {kind.name!r} names figure(s) {', '.join(unknown)}; save_figures draws "
                         f"{', '.join(drawn)}")
    figures = [(name, drawn[name]) for name in kind.figure_names(program.owner)]
    if metrics:
        figures.append(("curves.png", lambda path: plot_curves(metrics, path)))

    def write(folder: Path) -> list[Path]:
        paths = []
        for name, draw in figures:
            try:
                paths.append(draw(folder / name))
            except InputError as err:
                warnings.warn(f"skipped {name}: {err}", UserWarning, stacklevel=4)
        return paths

    return write_all_or_none(out, write)


def draw_picture(picture: Picture, path: Path) -> Path:
    """A kind's own figure (ModelKind.pictures, ModelKind.class_picture), drawn as a grid into `path`."""
    return save_tiles(picture.tiles, path, picture.title, picture.columns, picture.rows)


def save_tiles(tiles: Tensor, path: Path, title: str, column_names: Sequence[str] | None = None,
               row_names: Sequence[str] | None = None) -> Path:
    """Draw (rows, columns, C, H, W) pictures (C = 1 or 3) as one grid, its columns and rows named where
    names are given."""
    rows, cols = tiles.shape[:2]
    grid = image_grid(tiles.flatten(0, 1).cpu(), rows, cols)
    fig, ax = subplots(figsize=(1.0 + 0.9 * cols, 0.9 + 0.9 * rows))
    ax.imshow(grid.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize="medium")
    ax.set_xticks([])
    ax.set_yticks([])
    width, height = grid.shape[1] / cols, grid.shape[0] / rows
    if column_names:
        ax.set_xticks([width * (i + 0.5) for i in range(cols)], labels=list(column_names), rotation=45,
                      fontsize="small")
    if row_names:
        ax.set_yticks([height * (i + 0.5) for i in range(rows)], labels=list(row_names), fontsize="small")
    return save_figure(fig, path)
