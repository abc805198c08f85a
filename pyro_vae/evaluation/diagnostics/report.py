"""What `pyro-vae diagnose RUN` writes: diagnose.json (every number, per example too), diagnose.md
(the table), diagnose_khat.png, diagnose_posterior.png and diagnose_posterior.nc (ArviZ
InferenceData with the NUTS draws of z)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.patches import Ellipse
from matplotlib.ticker import MaxNLocator

from ...figures.plots import save_figure, subplots
from ...staging import write_all_or_none
from ...training.run_dir import write_json
from .diagnosis import R_HAT_OK, Diagnosis
from .importance import KHAT_GOOD, KHAT_THRESHOLD

SHORTFALL_SE = 2.0  # standard errors above 0 at which the reference log p(x) is called an underestimate
JSON, MARKDOWN = "diagnose.json", "diagnose.md"
KHAT_FIGURE, POSTERIOR_FIGURE = "diagnose_khat.png", "diagnose_posterior.png"
POSTERIOR_NETCDF = "diagnose_posterior.nc"
NETCDF_ENGINE = "h5netcdf"  # a declared dependency; xarray would otherwise try netCDF4 first, then fail


def _row(label: str, value: dict) -> str:
    return f"| {label} | {value['mean']:.2f} | {value['se']:.2f} |"


def _trust(psis: dict) -> str:
    """What k-hat says about an importance-sampled log p(x), for its table row."""
    share = psis["share_above_threshold"]
    if share == 0:
        return f"k̂ ≤ {KHAT_THRESHOLD} for every example"
    return (f"**k̂ > {KHAT_THRESHOLD} for {share:.0%} of the examples: there this estimate is not to be "
            "trusted**")


def _shortfall(value: dict) -> str:
    """Whether importance sampling with the full-rank q* found log p(x) higher than the reference."""
    line = (f"log p(x) with the full-rank q* as proposal minus the reference: {value['mean']:.2f} ± "
            f"{value['se']:.2f} nats.")
    if value["mean"] > SHORTFALL_SE * value["se"]:
        line += (" **The reference underestimates log p(x): the approximation gaps above are too small "
                 "(and can even come out negative) by about that much.**")
    return line


def markdown(summary: dict) -> str:
    """The diagnose table in Markdown: bounds and gaps (nats per example, standard errors over the
    examples), the k-hat distribution, and the NUTS comparison."""
    b, g, p = summary["bounds"], summary["gaps"], summary["psis"]
    lines = [
        f"Inference diagnostics on {summary['n_examples']} test examples (k = {summary['k']} importance "
        f"samples; q* fitted by {summary['svi_steps']} SVI steps, {summary['svi_particles']} particles).",
        "",
        "| quantity | nats per example | std. error |",
        "|---|---|---|",
        _row(f"log p(x), importance-sampled with q(z\\|x), the reference ({_trust(p)})", b["log_px"]),
        _row(f"log p(x), importance-sampled with the full-rank q* ({_trust(p['q_star_full_rank'])})",
             b["log_px_q_star_full_rank"]),
        _row("amortized ELBO L[q] (the encoder)", b["elbo_amortized"]),
        _row("optimal ELBO L[q*], diagonal Gaussian per example", b["elbo_optimal_diagonal"]),
        _row("optimal ELBO L[q*], full-rank Gaussian per example", b["elbo_optimal_full_rank"]),
        _row("approximation gap log p(x) − L[q*], diagonal", g["diagonal"]["approximation"]),
        _row("amortization gap L[q*] − L[q], diagonal", g["diagonal"]["amortization"]),
        _row("approximation gap log p(x) − L[q*], full-rank", g["full_rank"]["approximation"]),
        _row("L[q*] − L[q], full-rank (amortization + richer family)", g["full_rank"]["amortization"]),
        "",
        _shortfall(summary["reference_shortfall"]),
        "",
        f"PSIS k̂ of the weights p(x, z) / q(z|x): median {p['khat_quantiles']['0.5']:.2f}, 90% quantile "
        f"{p['khat_quantiles']['0.9']:.2f}, max {p['khat_quantiles']['1.0']:.2f}; "
        f"{p['share_below_good']:.0%} below {KHAT_GOOD} (good), {p['share_above_threshold']:.0%} above "
        f"{KHAT_THRESHOLD} (not to be trusted).",
    ]
    if "mcmc" in summary:
        m = summary["mcmc"]
        label = m["coordinates"]  # "site_u": coordinate u of a latent site
        lines += [
            "",
            f"NUTS on the latent sites ({m['chains']} chains × {m['num_samples']} draws after "
            f"{m['warmup']} warm-up, decoder fixed): max R-hat {m['r_hat_max']:.3f}, min bulk ESS "
            f"{m['ess_bulk_min']:.0f}, min tail ESS {m['ess_tail_min']:.0f}, divergences "
            f"{sum(m['divergences'])}."
            + ("" if m["mixed"] else f" **R-hat > {R_HAT_OK} for some coordinates: the chains may not "
                                     "have mixed; run longer (--num-samples, --warmup) before trusting "
                                     "the comparison below.**"),
            "",
            "| test example | max R-hat | min bulk ESS | \\|q mean − posterior mean\\| in posterior sd: "
            "mean / max over coordinates | q sd / posterior sd | most different coordinates |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {e['index']} | {e['r_hat_max']:.3f} | {e['ess_bulk_min']:.0f} | "
                  f"{e['mean_shift_in_posterior_sd']:.2f} / {e['max_mean_shift_in_posterior_sd']:.2f} | "
                  f"{e['q_sd_over_posterior_sd']:.2f} | "
                  f"{', '.join(label[u] for u in e['top_coordinates'])} |" for e in m["examples"]]
    return "\n".join(lines) + "\n"


def plot_khat(khat: torch.Tensor, khat_q_star: torch.Tensor, path: Path) -> Path:
    """Histograms of the per-example k-hat with q(z|x) and with the full-rank q* as proposal, and
    the 0.5 and 0.7 thresholds."""
    fig, ax = subplots(figsize=(6, 4))
    both = torch.cat([khat, khat_q_star])
    bins = torch.linspace(float(both.min()), float(both.max()), 31).numpy()
    ax.hist(khat.numpy(), bins=bins, color="tab:blue", alpha=0.8, label="proposal q(z|x)")
    ax.hist(khat_q_star.numpy(), bins=bins, histtype="step", color="tab:red", linewidth=1.5,
            label="proposal: full-rank q*")
    for value, label in ((KHAT_GOOD, f"below {KHAT_GOOD}: good"),
                         (KHAT_THRESHOLD, f"above {KHAT_THRESHOLD}: not to be trusted")):
        ax.axvline(value, color="k", linestyle="--" if value == KHAT_GOOD else "-", label=label)
    ax.set_xlabel("PSIS k̂ of the weights p(x, z) / proposal(z)")
    ax.set_ylabel("test examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    ax.legend()
    return save_figure(fig, path)


def plot_posterior(diagnosis: Diagnosis, path: Path) -> Path:
    """One panel per NUTS example: posterior draws and q(z|x) (1 and 2 sd ellipses) on the two
    coordinates where they differ most."""
    nuts, examples = diagnosis.nuts, diagnosis.summary["mcmc"]["examples"]
    label = diagnosis.summary["mcmc"]["coordinates"]
    fig, axes = subplots(1, len(examples), figsize=(3.2 * len(examples), 3.4), squeeze=False)
    for i, (ax, e) in enumerate(zip(axes[0], examples, strict=True)):
        u, v = e["top_coordinates"] if len(e["top_coordinates"]) == 2 else (0, 0)
        z = nuts.z[:, :, i].flatten(0, 1).cpu()
        ax.scatter(z[:, u], z[:, v], s=2, alpha=0.3, color="tab:blue", label="NUTS p(z|x)")
        centre = (e["q_mean"][u], e["q_mean"][v])
        for n_sd in (1, 2):
            ax.add_patch(Ellipse(centre, 2 * n_sd * e["q_sd"][u], 2 * n_sd * e["q_sd"][v], fill=False,
                                 color="tab:red", label="q(z|x), 1 and 2 sd" if n_sd == 1 else None))
        ax.plot(*centre, "x", color="tab:red")
        ax.set_xlabel(label[u])
        ax.set_ylabel(label[v])
        ax.set_title(f"test example {e['index']}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def write_report(diagnosis: Diagnosis, run: Path) -> list[Path]:
    """Write diagnose.json, diagnose.md and the figures (and the NetCDF posterior) into the folder
    `run` (made if missing): all of them, or none if one fails."""

    def write(folder: Path) -> list[Path]:
        write_json(folder / JSON, diagnosis.summary)
        (folder / MARKDOWN).write_text(markdown(diagnosis.summary))
        per = diagnosis.per_example
        paths = [folder / JSON, folder / MARKDOWN,
                 plot_khat(per["khat"], per["khat_q_star_full_rank"], folder / KHAT_FIGURE)]
        if diagnosis.nuts is not None:
            paths.append(plot_posterior(diagnosis, folder / POSTERIOR_FIGURE))
            diagnosis.posterior.to_netcdf(str(folder / POSTERIOR_NETCDF), engine=NETCDF_ENGINE)
            paths.append(folder / POSTERIOR_NETCDF)
        return paths

    return write_all_or_none(run, write)
