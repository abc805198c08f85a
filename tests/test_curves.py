"""The learning-curve figure (curves.png, report's curves): which curves it draws, the best epoch,
the y axis zoomed past the KL warm-up, and the accuracy panel of labelled runs; and the same against
training wall time (`report --x seconds`): one curve per group of seeds, their mean on a common grid of
seconds, the band over seeds and the final log p(x)."""

import math
import statistics

import pytest

from pyro_vae.figures.plots import TimedRun, run_curves_figure, seconds_curves_figure


def _rows(epochs: int, warmup: int = 10, best: int | None = None, final: float = -230.0) -> list[dict]:
    """Synthetic metrics.jsonl rows: a bound rising to `final`; during warm-up the -loss sits far above
    it (the KL weight below 1), and the first epochs far below."""
    rows = []
    for epoch in range(1, epochs + 1):
        weight = min(1.0, epoch / warmup)
        elbo = final - 200.0 / epoch
        rows.append({"epoch": epoch, "step": 10 * epoch, "train_loss": -(elbo + 60.0 * (1 - weight)),
                     "test_elbo": elbo - 2.0, "test_recon": elbo + 15.0, "validation_elbo": elbo - 1.0,
                     "kl_weight": weight, "best_epoch": best or epoch})
    return rows


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.lines]


def test_one_run_draws_train_validation_test_and_the_best_epoch():
    fig = run_curves_figure({"": _rows(60, best=45)})
    (ax,) = fig.axes[:1]
    assert _labels(ax) == ["-train loss", "validation ELBO", "test ELBO", "best epoch 45"]
    assert ax.lines[3].get_xdata()[0] == 45


def test_long_runs_zoom_past_warmup_and_first_epochs():
    rows = _rows(80, warmup=20)
    low, high = run_curves_figure({"run": rows}).axes[0].get_ylim()
    at_full_weight = [m for m in rows if m["kl_weight"] == 1.0][15:]
    shown = [v for m in at_full_weight for v in (-m["train_loss"], m["validation_elbo"], m["test_elbo"])]
    assert low <= min(shown) and high >= max(shown)
    assert low > rows[0]["test_elbo"]  # epoch 1, 200 nats down, runs off the axis
    assert high < max(-m["train_loss"] for m in rows)  # the warm-up's -loss is not a bound
    assert "test_recon" not in str(_labels(run_curves_figure({"run": rows}).axes[0]))


def test_short_runs_are_not_zoomed():
    rows = _rows(5, warmup=1)
    low, high = run_curves_figure({"run": rows}).axes[0].get_ylim()
    assert low <= rows[0]["test_elbo"] and high >= -rows[-1]["train_loss"]


def test_autoencoder_curves_are_reconstruction_log_likelihood():
    rows = [{k: v for k, v in m.items() if k not in ("test_elbo", "validation_elbo")} for m in _rows(4)]
    ax = run_curves_figure({"": rows}).axes[0]
    assert "test log p(x|z)" in _labels(ax)
    assert list(ax.lines[1].get_ydata()) == [m["test_recon"] for m in rows]


def test_accuracy_panel_holds_every_labelled_run_and_goes_log_for_mixed_lengths():
    m2 = [{**m, "test_accuracy": 0.5 + 0.01 * m["epoch"]} for m in _rows(3, warmup=1)]
    classifier = [{"epoch": e, "step": e, "train_loss": 1.0 / e, "test_accuracy": 0.6} for e in range(1, 201)]
    fig = run_curves_figure({"m2": m2, "classifier": classifier})
    bound, accuracy = fig.axes[:2]
    assert _labels(accuracy) == ["m2", "classifier"]
    assert accuracy.get_xscale() == "log"
    assert all(label.startswith("m2") for label in _labels(bound))  # the classifier has no bound
    same_length = run_curves_figure({"m2": m2, "other": m2}).axes[1]
    assert same_length.get_xscale() == "linear"


# --- against wall-clock seconds (`pyro-vae report --x seconds`) -------------------------------------------

def _timed(seconds: list[float], intercept: float, slope: float, log_px: float | None = None,
           key: str = "validation_elbo") -> TimedRun:
    """A run whose epochs take `seconds` and whose bound is the line intercept + slope * t at the end of
    each epoch (t: cumulative seconds), so that any interpolation between epochs is exact."""
    rows, t = [], 0.0
    for epoch, s in enumerate(seconds, 1):
        t += s
        rows.append({"epoch": epoch, "step": epoch, "train_loss": 1.0, "seconds": s, "test_elbo": -500.0,
                     key: intercept + slope * t})
    return TimedRun(rows, log_px)


def _line(ax, start: str):
    (line,) = [line for line in ax.lines if line.get_label().startswith(start)]
    return line


def _errorbar(ax, start: str):
    (bar,) = [c for c in ax.containers if c.get_label().startswith(start)]
    return bar


def _band(ax, label: str) -> list[tuple[float, float, float]]:
    """The band of a group as (t, low, high) at each t of its outline's vertices (fill_between's polygon)."""
    (poly,) = [c for c in ax.collections if c.get_label() == f"_band {label}"]
    vertices = poly.get_paths()[0].vertices
    return [(t, vertices[vertices[:, 0] == t][:, 1].min(), vertices[vertices[:, 0] == t][:, 1].max())
            for t in sorted(set(vertices[:, 0].tolist()))]


def test_seconds_figure_draws_each_group_as_the_mean_over_seeds_on_the_common_grid_with_its_band():
    mc = [_timed([1.0, 1.0, 1.0, 1.0], -110.0, 2.0, -100.0), _timed([1.5, 1.5, 1.5], -120.0, 4.0, -98.0)]
    analytic = [_timed([2.0, 2.0, 2.0], -105.0, 1.0, -97.0), _timed([1.0, 2.0, 3.0], -108.0, 2.0, -96.0),
                _timed([2.5, 2.5], -100.0, 0.5, -95.0)]
    ax = seconds_curves_figure({"estimator mc": mc, "estimator analytic": analytic}).axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]  # one entry per group, by its curve
    assert legend == ["estimator mc: validation ELBO, mean of 2 seeds (min–max)",
                      "estimator analytic: validation ELBO, mean of 3 seeds (± s.e.)"]
    # mc: seed 1 ends its epochs at 1, 2, 3, 4 s, seed 2 at 1.5, 3, 4.5 s; both have data from 1.5 s to 4 s
    mean = _line(ax, "estimator mc: validation")
    assert list(mean.get_xdata()) == [1.5, 2.0, 3.0, 4.0]
    seeds = [[-110.0 + 2.0 * t, -120.0 + 4.0 * t] for t in (1.5, 2.0, 3.0, 4.0)]
    assert list(mean.get_ydata()) == pytest.approx([statistics.mean(v) for v in seeds])
    assert [t for t, _, _ in _band(ax, "estimator mc")] == [1.5, 2.0, 3.0, 4.0]
    for (_, low, high), values in zip(_band(ax, "estimator mc"), seeds, strict=True):  # 2 seeds: min–max
        assert (low, high) == pytest.approx((min(values), max(values)))
    # analytic: epochs end at 2, 4, 6 / 1, 3, 6 / 2.5, 5 s: every seed has data from 2.5 s to 5 s
    mean = _line(ax, "estimator analytic: validation")
    grid = [2.5, 3.0, 4.0, 5.0]
    assert list(mean.get_xdata()) == grid
    seeds = [[-105.0 + t, -108.0 + 2.0 * t, -100.0 + 0.5 * t] for t in grid]
    assert list(mean.get_ydata()) == pytest.approx([statistics.mean(v) for v in seeds])
    assert [t for t, _, _ in _band(ax, "estimator analytic")] == grid
    for (_, low, high), values in zip(_band(ax, "estimator analytic"), seeds, strict=True):
        se = statistics.stdev(values) / math.sqrt(3)
        assert (low, high) == pytest.approx((statistics.mean(values) - se, statistics.mean(values) + se))
    # the final log p(x): a bar at the seeds' mean total seconds, mean ± s.e. over seeds
    bar = _errorbar(ax, "_log p(x) estimator analytic")
    point = bar.lines[0]
    assert list(point.get_xdata()) == pytest.approx([statistics.mean([6.0, 6.0, 5.0])])
    assert list(point.get_ydata()) == pytest.approx([-96.0])
    ((_, low), (_, high)), = bar.lines[2][0].get_segments()
    se = statistics.stdev([-97.0, -96.0, -95.0]) / math.sqrt(3)
    assert (low, high) == pytest.approx((-96.0 - se, -96.0 + se))


def test_each_seed_of_a_group_is_drawn_faintly_to_its_own_end_with_its_own_log_px():
    # the band ends with the shorter seed (4 s); the longer seed's curve and its log p(x) still show at 9 s
    runs = [_timed([1.0] * 4, -110.0, 2.0, -100.0), _timed([1.5] * 6, -120.0, 4.0, -98.0)]
    fig = seconds_curves_figure({"g": runs})
    whole, zoom = fig.axes[:2]
    seeds = [line for line in whole.lines if line.get_label().startswith("_seed") and "log p(x)" not in
             line.get_label()]
    longer = [1.5, 3.0, 4.5, 6.0, 7.5, 9.0]
    assert [list(line.get_xdata()) for line in seeds] == [[1.0, 2.0, 3.0, 4.0], longer]
    assert list(seeds[1].get_ydata()) == pytest.approx([-120.0 + 4.0 * t for t in longer])
    finals = [line for line in whole.lines if line.get_label().startswith("_seed") and "log p(x)" in
              line.get_label()]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in finals] == [(4.0, -100.0), (9.0, -98.0)]
    assert _line(whole, "g: validation").get_xdata()[-1] == 4.0  # the mean: only where both seeds are
    low, high = zoom.get_ylim()
    start, end = zoom.get_xlim()
    assert low <= -100.0 and high >= -98.0 and start < 4.0 and end >= 9.0  # both seeds' finals in the zoom
    assert not [t.get_text() for t in whole.get_legend().get_texts() if "seed 1" in t.get_text()]


def test_a_group_of_one_run_is_a_plain_curve_with_its_log_px_at_its_total_seconds():
    run = _timed([3.0, 1.0, 2.0], -90.0, 1.0, -80.0, key="test_elbo")  # no validation: the test ELBO
    ax = seconds_curves_figure({"fm-vae-mc-s1": [run]}).axes[0]
    curve = _line(ax, "fm-vae-mc-s1: test ELBO")
    assert list(curve.get_xdata()) == [3.0, 4.0, 6.0]
    assert list(curve.get_ydata()) == [-87.0, -86.0, -84.0]
    marker = _line(ax, "_log p(x) fm-vae-mc-s1")
    assert (list(marker.get_xdata()), list(marker.get_ydata())) == ([6.0], [-80.0])
    assert not ax.collections  # no band


def test_seconds_figure_zooms_past_warmup_and_keeps_the_markers_in_view():
    rows = [{**m, "seconds": 2.0} for m in _rows(80, warmup=20)]
    ax = seconds_curves_figure({"a": [TimedRun(rows, -200.0)], "b": [TimedRun(rows, -210.0)]}).axes[0]
    low, high = ax.get_ylim()
    assert low > rows[0]["validation_elbo"]  # epoch 1, 200 nats down, runs off the axis
    assert low <= -210.0 and high >= -200.0
    assert _line(ax, "a: validation ELBO").get_xdata()[-1] == 160.0


def test_seconds_figure_has_a_panel_zoomed_on_the_final_log_px_where_a_far_lower_curve_runs_off():
    # two close runs ending near -100 after 40 s, and a slow one 60 nats below them the whole time
    close_a, close_b = _timed([1.0] * 40, -104.0, 0.1, -99.5), _timed([1.0] * 40, -104.2, 0.1, -99.7)
    slow = _timed([4.0] * 9, -170.0, 0.2, -150.0)
    fig = seconds_curves_figure({"a": [close_a], "b": [close_b], "slow": [slow]})
    whole, zoom = fig.axes[:2]
    assert zoom.get_xlim()[0] == pytest.approx(0.5 * 40.0)  # the last half of the latest run's 40 s
    assert zoom.get_xlim()[1] >= 40.0
    low, high = zoom.get_ylim()
    assert low <= -150.0 and high >= -99.5  # every final log p(x) in view, the slow one's included
    # the late curve values in view: a and b from 20 s on, slow's line (-170 + 0.2 t, below -160) is not
    assert high >= -104.0 + 0.1 * 40.0 and low > -170.0 + 0.2 * 36.0
    assert [line.get_label() for line in zoom.lines] == [line.get_label() for line in whole.lines]
    without = seconds_curves_figure({"a": [_timed([1.0] * 40, -104.0, 0.1)]})
    assert len(without.axes) == 1  # no final log p(x): no zoom panel


def test_the_zoom_panel_starts_early_enough_for_a_group_mean_marker_left_of_half_the_latest_time():
    # one seed of "slow" ran 100 s, so half the latest time is 50 s; group "fast"'s two seeds took 20 and
    # 40 s: their marker sits at the mean, 30 s, which the zoom must still show
    fast = [_timed([1.0] * 20, -104.0, 0.1, -99.0), _timed([1.0] * 40, -104.0, 0.1, -98.0)]
    slow = [_timed([1.0] * 100, -110.0, 0.1, -100.0), _timed([1.0] * 60, -110.0, 0.1, -100.4)]
    zoom = seconds_curves_figure({"fast": fast, "slow": slow}).axes[1]
    start, end = zoom.get_xlim()
    (bar,) = [c for c in zoom.containers if c.get_label() == "_log p(x) fast"]  # an errorbar: mean ± s.e.
    assert bar.lines[0].get_xdata()[0] == pytest.approx(30.0)
    assert start < 30.0 < end and end >= 100.0


def _laid_out(names: list[str]):
    """The curves figure of runs with these names, laid out and drawn as saving it would (the axis label
    placed under the tick labels), and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = run_curves_figure({name: _rows(30) for name in names})
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.canvas.draw()
    return fig, fig.canvas.get_renderer()


def _axes_inches(fig) -> tuple[float, float]:
    """The first axes' width and height in inches."""
    position, (width, height) = fig.axes[0].get_position(), fig.get_size_inches()
    return position.width * width, position.height * height


def test_many_runs_put_the_legend_below_the_axes_so_long_run_names_do_not_narrow_them():
    short, _ = _laid_out([f"r{i}" for i in range(3)])
    fig, renderer = _laid_out([f"fashion-mnist-hvae-vampprior-a-long-run-name-s{i}" for i in range(3)])
    # beside the axes, the legend took most of the width
    assert _axes_inches(fig)[0] == pytest.approx(_axes_inches(short)[0], rel=0.05)
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    assert fig.get_size_inches()[1] > 4.5  # taller by the legend's rows


@pytest.mark.parametrize("runs", [2, 6])
def test_the_legend_below_leaves_the_axis_label_free_and_the_axes_their_height(runs):
    """The legend sits under the x axis's ticks and label (not over them), and the figure grows by what
    the legend takes, so six runs' 24 entries leave the axes as tall as two runs' 8 do."""
    names = [f"fashion-mnist-hvae-vampprior-s{i}" for i in range(runs)]
    fig, renderer = _laid_out(names)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y1 < ax.xaxis.label.get_window_extent(renderer).y0
    assert legend.y1 < min(t.get_window_extent(renderer).y0 for t in ax.get_xticklabels() if t.get_text())
    assert legend.y0 >= 0  # inside the figure
    one, _ = _laid_out(names[:1])  # four entries: the legend inside the axes, the figure its base size
    assert _axes_inches(fig)[1] == pytest.approx(_axes_inches(one)[1], rel=0.1)


@pytest.mark.parametrize("length", [5, 14, 17, 41])
def test_the_legend_below_fits_the_axes_width_in_two_columns_where_they_fit(length):
    """Six runs' legend (four line styles, then each run once) goes in two columns when two columns of these
    names fit under the axes, in one otherwise; either way it lies under the axes, left and right."""
    names = ["n" * (length - 2) + f"s{i}" for i in range(6)]
    fig, renderer = _laid_out(names)
    ax = fig.axes[0]
    legend = ax.get_legend()
    extent, axes = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert axes.x0 <= extent.x0 and extent.x1 <= axes.x1
    columns = {round(t.get_window_extent(renderer).x0) for t in legend.get_texts()}
    assert len(columns) == (2 if length <= 14 else 1)
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["-train loss", "validation ELBO", "test ELBO", "best epoch (vertical)",
                     *(f"{name}, best epoch 30" for name in names)]


def test_several_labelled_runs_name_each_run_once_under_the_curves_and_leave_the_accuracy_panel_clear():
    """M2 runs and classifiers: one legend under the first panel names every run once, in the colour both
    panels give it (a classifier, drawn in the accuracy panel only, included); the accuracy panel has no
    legend over its curves, and the legend does not reach under it, so the two panels keep equal widths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    classifier = [{"epoch": e, "step": e, "train_loss": 1.0 / e, "test_accuracy": 0.6, "best_epoch": 150}
                  for e in range(1, 201)]
    m2 = [{**m, "test_accuracy": 0.5} for m in _rows(30, warmup=1)]
    names = [f"docs/runs/m2-fair-alpha10/n100-enum-aux-s{i}" for i in range(4)]
    runs = {"docs/runs/m2-fair/n100-classifier-s0": classifier, **{name: m2 for name in names}}
    fig = run_curves_figure(runs)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bound, accuracy = fig.axes
    assert accuracy.get_legend() is None
    legend = bound.get_legend()
    named = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles,
                                                            strict=True)}
    assert named["docs/runs/m2-fair/n100-classifier-s0, best epoch 150"] == accuracy.lines[0].get_color()
    for i, name in enumerate(names, start=1):
        assert named[f"{name}, best epoch 30"] == accuracy.lines[i].get_color()
    extent, left, right = (a.get_window_extent(renderer) for a in (legend, bound, accuracy))
    assert extent.x1 <= right.x0 and extent.y1 < left.y0
    assert left.width == pytest.approx(right.width, rel=0.15)


def test_up_to_twenty_runs_each_get_a_colour_of_their_own():
    """Seventeen runs (the M2 table's): no two share a colour in the accuracy panel, past the ten of C0-C9."""
    from matplotlib.colors import to_hex

    runs = {f"run-s{i}": [{**m, "test_accuracy": 0.5} for m in _rows(3, warmup=1)] for i in range(17)}
    colours = [to_hex(line.get_color()) for line in run_curves_figure(runs).axes[1].lines]
    assert len(colours) == 17 and len(set(colours)) == 17
