"""The learning-curve figure (curves.png, report's curves): which curves it draws, the best epoch,
the y axis zoomed past the KL warm-up, and the accuracy panel of labelled runs."""

from pyro_vae.plots import run_curves_figure


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
