"""Estimator comparison: on one fixed model/guide pair (our VAE, or any pair that meets the Program
contract) and one fixed test batch, for each ELBO estimator and number of particles K, measure

* the estimate: R independent draws of every example's bound, in nats: mean, per-example standard
  deviation of one draw, and bias against a high-k IWAE reference log p(x);
* the gradient of the training loss (-bound per example, averaged over the batch): per-parameter
  variance and signal-to-noise ratio SNR = |mean| / std over R draws (Rainforth et al. 2018),
  averaged over the guide's parameters ("encoder": variational, q) and over the model's ("decoder":
  generative, p: decoder, learned prior and scale), told apart by the param sites of each trace;
* the wall time of one loss + backward;
* optionally, the final test log p(x) when each estimator trains the same network from the same
  initialization for the same number of epochs.

Each estimator answers for itself how its value is computed: `per_example_bound(model, guide, x)`,
one draw of every example's bound (the built-in ones: elbo.py, iwae.py). A registered pyro.infer.ELBO
without that method is measured through its own loss (the batch mean, no per-example spread) and its
differentiable_loss or loss_and_grads; one that refuses the pair (a ValueError or
NotImplementedError while it computes, `Refused`) is skipped, and compare.md says why in one line.

A conditional pair, model(x, c) / guide(x, c) (a CVAE, or your own), is measured by the same code:
its condition c (`compare(..., c=c)`; for a run, the kind's test_conditions) follows x into model and
guide in every measurement, and the reference is log p(x | c) (the record's "log_px_of" names it).

Every measurement of an estimator starts from the same seed, so a result does not depend on which
other estimators were compared with it. `compare` measures a pair in Python; `compare_estimators`
(the CLI's) measures a run or a config's model; `write_comparison` writes compare.json, compare.md
and two PNG figures. An M2 run (a discrete latent y) is measured by compare_discrete.py instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from matplotlib.ticker import NullLocator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import Config, load_config_file
from ..data import Dataset
from ..device import resolve_device
from ..errors import InputError
from ..figures.plots import save_figure, subplots
from ..inference.estimators import ESTIMATORS, check_analytic_kl, make_estimator
from ..inference.program import Program, check_conditions
from ..models.kind import check_config, kind_of, model_kind
from ..renames import renamed_keywords
from ..rng import forked_rng
from ..stats import mean_se
from ..training.run_dir import build_from_config, load_model, model_stamp, read_config
from ..training.train import train
from ..training.train_data import prepare_data
from .compare_discrete import compare_m2_run
from .compare_measures import (
    CompareOptions,
    CompareResult,
    Refused,
    estimate_summary,
    gradient_stats,
    measured_cells,
    measured_columns,
    measured_rows,
    reference_name,
    refusals,
    table_head,
    write_files,
)
from .evaluate import iwae_log_px

CONDITIONAL = "log p(x | c)"  # what the reference of a conditional pair is, unless its owner says (log_px_of)
VAE_GROUPS = ("encoder", "decoder")  # the guide's parameters (q) and the model's (p), parameter_groups
TRAIN_DIR = "compare-train"  # where --train-epochs writes one run per estimator
PRETRAINED_DIR = "model"  # where --pretrain-epochs writes the model it measures


# the note of a row measured through the estimator's loss (an ELBO without per_example_bound)
BATCH_ONLY = ("has no per_example_bound: measured through its loss, the batch's mean bound, so the std of "
              "one draw is not available (—)")


def default_estimators() -> list[str]:
    """The estimators compared on a VAE by default: every registered one."""
    return list(ESTIMATORS)


def parse_specs(estimators: Sequence[str] | None, particles: Sequence[int]) -> list[tuple[str, int]]:
    """(name, K) pairs in order, without repeats: 'iwae:50' is iwae with K=50, a bare 'iwae' is iwae
    with each K in `particles`; None: default_estimators()."""
    specs: list[tuple[str, int]] = []
    for item in default_estimators() if estimators is None else estimators:
        name, colon, k = item.partition(":")
        if name not in ESTIMATORS:
            raise InputError(f"unknown estimator {name!r} in --estimators: choose one of "
                             f"{', '.join(ESTIMATORS)} (or one a --plugin registers), optionally as NAME:K "
                             "(e.g. iwae:50)")
        if colon and not (k.isdigit() and int(k) >= 1):
            raise InputError(f"--estimators {item!r}: the number of particles after ':' must be a "
                             "positive integer, e.g. iwae:50")
        for kk in [int(k)] if colon else particles:
            if (name, kk) not in specs:
                specs.append((name, kk))
    if not specs:
        raise InputError("--estimators needs at least one estimator")
    return specs


@torch.no_grad()
def estimate_stats(elbo: pyro.infer.ELBO, program: object, x: Tensor, repeats: int, log_px: Tensor,
                   conditions: tuple[Tensor, ...] = ()) -> dict:
    """R draws b_rn of every example's bound, by the estimator's per_example_bound, summarized by
    compare_measures.estimate_summary: mean over r and n (and its standard error over draws),
    per-example std sqrt(mean_n var_r b_rn), bias mean - mean_n log p(x_n), and the R batch means. An
    ELBO without per_example_bound gives R batch means -loss/N only: value_std is None and the row has
    a note saying so. `conditions` (a conditional pair's c) follow x into model and guide. The
    estimator's refusal of the pair is Refused."""
    program = Program.of(program)
    per_example = getattr(elbo, "per_example_bound", None)
    args = (program.model, program.guide, x, *conditions)
    with refusals():
        if per_example is not None:  # draws b_rn, (R, N)
            draws = torch.stack([per_example(*args) for _ in range(repeats)])
        else:  # batch means -loss/N, (R,)
            losses = [float(elbo.loss(*args)) for _ in range(repeats)]
            draws = -torch.tensor(losses, dtype=torch.float64) / x.shape[0]
    stats = estimate_summary(draws, log_px)
    return stats if per_example is not None else {**stats, "note": BATCH_ONLY}


def measure(program: object, x: Tensor, specs: Sequence[tuple[str, int]], repeats: int, eval_k: int,
            seed: int = 0, progress: bool = False, conditions: tuple[Tensor, ...] = ()) -> dict:
    """The comparison on one model/guide pair and batch: the reference log p(x) and one row per
    (name, K). `conditions`: a conditional pair's c (one row per example of x), passed after x to model
    and guide in every measurement; the reference is then log p(x | c), which "log_px_of" names (the
    pair's owner's `log_px_of` where it has one, else CONDITIONAL)."""
    program = Program.of(program)
    pyro.set_rng_seed(seed)
    log_px = iwae_log_px(program.model, program.guide, x, eval_k, conditions=conditions)
    record: dict = {"n_examples": int(x.shape[0]), "repeats": repeats, "k_ref": eval_k, "seed": seed,
                    "device": str(x.device), "log_px_ref": float(log_px.mean()),
                    "log_px_ref_se": mean_se(log_px)[1]}
    if conditions:
        record["log_px_of"] = getattr(program.owner, "log_px_of", CONDITIONAL)
    if any(name == "analytic" for name, _ in specs):
        record["analytic_kl"] = check_analytic_kl("analytic", program.model, program.guide, x, *conditions)
    rows = []
    for name, k in tqdm(specs, desc="estimators", disable=not progress):
        elbo = make_estimator(name, k)
        try:
            pyro.set_rng_seed(seed)
            row = {"estimator": name, "particles": k,
                   **estimate_stats(elbo, program, x, repeats, log_px, conditions)}
            pyro.set_rng_seed(seed)
            row.update(gradient_stats(elbo, program, x, repeats, progress, f"{name} K={k}",
                                      conditions=conditions))
        except Refused as err:  # the estimator refuses this pair: say why
            row = {"estimator": name, "particles": k, "skipped": str(err)}
        rows.append(row)
    record["estimators"] = rows
    return record


def _read_config(run: Path | None, config_file: Path | None, device: torch.device) -> Config:
    """The config of the run, or of the config file (on `device`)."""
    if config_file is not None:
        return check_config(Config.from_dict({**load_config_file(config_file), "device": device.type}))
    return read_config(run)[0]


class Measured(NamedTuple):
    """What compare measures from a run or a config: the model, the test batch x and its conditions (a
    conditional kind's c, one row per example of x; () for a model of x alone), and a description."""

    model: nn.Module
    x: Tensor
    conditions: tuple[Tensor, ...]
    described: str


def _model(run: Path | None, config_file: Path | None, config: Config, out: Path, options: CompareOptions,
           device: torch.device) -> Measured:
    """The model to measure, the first batch_size test examples and their conditions (the kind's
    test_conditions), and a description of the model."""
    kind, rows = model_kind(config.model), slice(options.batch_size)

    def measured(model: nn.Module, data: Dataset, described: str) -> Measured:
        conditions = tuple(c[rows] for c in kind.test_conditions(model, data))
        return Measured(model, data.test_x[rows], conditions, described)

    if config_file is not None and not options.pretrain_epochs:
        pyro.set_rng_seed(config.seed)  # the initialization `pyro-vae train` starts from
        data = prepare_data(config, kind).to(device)
        config = dataclasses.replace(config, **kind.derive(config, data))  # as train records it
        return measured(build_from_config(config, data.shape).to(device).eval(), data,
                        f"{config_file}, untrained")
    if config_file is not None:
        run = out / PRETRAINED_DIR
        train(dataclasses.replace(config, epochs=options.pretrain_epochs), out=run,
              progress=options.progress, overwrite=True)
    config, model = load_model(run, device)
    described = f"{run}" + (f", trained {options.pretrain_epochs} epochs" if config_file else "")
    return measured(model, prepare_data(config, kind).to(device), described)


def train_each(config: Config, specs: Sequence[tuple[str, int]], epochs: int, out: Path, eval_k: int,
               x: Tensor, progress: bool = True, conditions: tuple[Tensor, ...] = ()) -> dict[str, dict]:
    """Train the config's network from its initialization (same seed) with each estimator for `epochs`
    epochs; per 'name K' label, the final log p(x) (IWAE, eval_k) on the batch x (log p(x | c) given a
    conditional kind's `conditions` of x) and the run's summary."""
    results = {}
    for name, k in specs:
        run = out / TRAIN_DIR / f"{name}-K{k}"
        cfg = dataclasses.replace(config, estimator=name, particles=k, epochs=epochs, device=x.device.type)
        summary = train(cfg, out=run, progress=progress, overwrite=True).summary
        _, model = load_model(run, x.device)
        pyro.set_rng_seed(cfg.seed)
        log_px = iwae_log_px(model.model, model.guide, x, eval_k, conditions=conditions)
        results[f"{name} {k}"] = {
            "epochs": epochs, "run": str(run), "log_px": float(log_px.mean()),
            "log_px_se": mean_se(log_px)[1],
            "test_elbo": summary.get("test_elbo"), "train_seconds": summary.get("train_seconds"),
        }
        del model  # done with: the next estimator's model takes its names in the param store
    return results


def compare_estimators(run: str | Path | None = None, config_file: str | Path | None = None,
                       out: str | Path | None = None, options: CompareOptions | None = None) -> CompareResult:
    """Compare estimators on a trained run (RUN) or on a fresh model from a config file (then `out`
    is required); write compare.json, compare.md and the figures to `out` (default: RUN). Seeded with
    options.seed, on forked generators: the caller's random state is as it was afterwards."""
    options = options or CompareOptions()
    with forked_rng(resolve_device(options.device)):
        return _compare_estimators(run, config_file, out, options)


def _compare_estimators(run: str | Path | None, config_file: str | Path | None, out: str | Path | None,
                        options: CompareOptions) -> CompareResult:
    options.validate()
    if (run is None) == (config_file is None):
        raise InputError("compare needs either a run directory or --config FILE (not both)")
    if config_file is not None and out is None:
        raise InputError("compare --config needs --out DIR: where to write the comparison")
    if options.pretrain_epochs and config_file is None:
        raise InputError("--pretrain-epochs applies to --config (a fresh model); a run is already trained")
    device = resolve_device(options.device)
    out_dir = Path(out if out is not None else run)
    run, config_file = Path(run) if run else None, Path(config_file) if config_file else None
    config = _read_config(run, config_file, device)
    kind = model_kind(getattr(config, "model", "vae"))
    kind.refuse("compare-config" if run is None else "compare", str(run or config_file))
    if kind.comparison == "discrete":
        return compare_m2_run(run, config, out_dir, options)
    if options.temperature is not None:
        raise InputError("--temperature is the Gumbel-softmax temperature of an M2 run's 'relaxed' "
                         "estimator; a VAE has no discrete latent")
    specs = parse_specs(options.estimators, options.particles)
    if options.train_epochs:  # refuse a bad pairing (an estimator the config cannot train with) up front
        for name, k in specs:
            check_config(dataclasses.replace(config, estimator=name, particles=k,
                                             epochs=options.train_epochs))
    model, x, conditions, described = _model(run, config_file, config, out_dir, options, device)
    record = compare_pair(model, x, options, conditions)
    record.update(model=described, dataset=config.dataset, prior=getattr(config, "prior", None))
    if kind.conditional:
        record["condition"] = config.condition
    if run is not None and config_file is None:
        record["model_checkpoint"] = model_stamp(run)
    if options.train_epochs:
        del model  # measured: the models trained next take its names in Pyro's param store, not its tensors
        final = train_each(config, specs, options.train_epochs, out_dir, options.eval_k, x, options.progress,
                           conditions)
        for row in record["estimators"]:
            row["final"] = final[f"{row['estimator']} {row['particles']}"]
    return CompareResult(out_dir, record, write_comparison(record, out_dir))


def _describe(program: Program) -> str:
    """A name for the pair in the report: its owner's class, else the two functions' names."""
    if program.owner is not None:
        return type(program.owner).__name__
    return "/".join(getattr(fn, "__name__", type(fn).__name__) for fn in (program.model, program.guide))


@renamed_keywords(k_ref="eval_k")
def compare(program: object, x: Tensor, estimators: Sequence[str] | None = None,
            particles: Sequence[int] = (1, 5, 50), repeats: int = 100, eval_k: int = 1000, seed: int = 0,
            progress: bool = False, c: Tensor | None = None) -> dict:
    """Compare ELBO estimators on the model/guide pair `program` (our VAE, an object with .model and
    .guide, a (model, guide) tuple or a Program) and the batch x: the record compare.json holds (a
    reference log p(x) by IWAE with eval_k draws, and per estimator NAME or NAME:K (default: every
    registered one), K from `particles` for a bare NAME: value spread and bias over `repeats` draws,
    gradient variance and SNR of the guide's ("encoder") and the model's ("decoder") parameters, time;
    or a note, see the module's docstring). write_comparison writes it. Seeded with `seed`, on forked
    generators: the caller's random state is as it was afterwards.
    `c`: the condition of a conditional pair model(x, c) / guide(x, c) (a CVAE, or your own), one row
    per example of x; it follows x into model and guide in every measurement, and the reference is then
    log p(x | c) (the record's "log_px_of" says so)."""
    options = CompareOptions(estimators=list(estimators or ESTIMATORS), particles=list(particles),
                             repeats=repeats, eval_k=eval_k, seed=seed, progress=progress)
    return compare_pair(program, x, options, () if c is None else (c,))


def compare_pair(program: object, x: Tensor, options: CompareOptions,
                 conditions: tuple[Tensor, ...] = ()) -> dict:
    """`compare` with its settings in `options` (estimators, particles, repeats, eval_k, seed,
    progress) and `conditions`, tensors with one row per example of x passed after x to model and guide
    (a conditional pair's c; () for a pair of x alone)."""
    options.validate()
    check_conditions(x, conditions)
    program = Program.of(program)
    with forked_rng(x.device):  # tracing the pair draws too
        program.sites(x, *conditions)
        kind_of(program).refuse("compare", _describe(program))
        specs = parse_specs(options.estimators, options.particles)
        record = measure(program, x, specs, options.repeats, options.eval_k, options.seed, options.progress,
                         conditions)
    return {"model": _describe(program), "dataset": None, **record}


def write_comparison(record: dict, out: str | Path, table: str | None = None,
                     snr_figure: Callable[[dict, Path], Path] | None = None) -> list[Path]:
    """Write compare.json, compare.md (the Markdown `table`, default: the VAE's), compare_snr.png (drawn
    by `snr_figure`, default: the VAE's) and compare_estimates.png into `out`: all of them, or none
    (compare_measures.write_files)."""
    return write_files(record, out, markdown(record) if table is None else table, snr_figure or plot_snr)


def row_notes(record: dict) -> list[str]:
    """One line per row that was skipped, or measured in part, saying why."""
    notes = []
    for row in record["estimators"]:
        label = f"`{row['estimator']}` K={row['particles']}"
        if "skipped" in row:
            notes.append(f"- {label} not measured: {row['skipped']}")
        elif "note" in row:
            notes.append(f"- {label} {row['note']}")
    return notes


def markdown(record: dict) -> str:
    """The comparison as a Markdown table, with a line saying what was measured and how, and one line
    for each estimator skipped or measured in part."""
    rows = measured_rows(record)
    final = any("final" in row for row in rows)
    reference = reference_name(record)
    header = ["estimator", "K", *measured_columns("bound (nats)", VAE_GROUPS, reference)]
    if final:
        epochs = next(row["final"]["epochs"] for row in rows if "final" in row)
        header.append(f"{reference} after {epochs} epochs (nats)")
    lines = table_head(record, header, "test examples")
    for row in rows:
        cells = [row["estimator"], str(row["particles"]), *measured_cells(row, VAE_GROUPS)]
        if final:
            cells.append(f"{row['final']['log_px']:.2f} ± {row['final']['log_px_se']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "bound: mean over draws and examples ± its standard error over draws; std of one draw: "
        "per-example standard deviation of a single estimate; bias: bound − reference (the reference "
        "is itself a lower bound, so every bias is ≤ 0 up to noise). Gradients of the training loss "
        "(−bound per example, averaged over the batch): variance per parameter and SNR = |mean| / std "
        "per parameter, averaged over the encoder's (the guide's parameters, q) and the decoder's (the "
        "model's parameters, p). ms/step: median wall time of one loss + backward.",
    ]
    if row_notes(record):
        lines += ["", *row_notes(record)]
    if record.get("prior") == "vamp":
        lines += ["", VAMP_NOTE]
    return "\n".join(lines) + "\n"


VAMP_NOTE = (
    "VampPrior: p(z) = (1/K) sum_k q(z | u_k) runs the encoder on its pseudo-inputs u_k, so the "
    "\"encoder\" gradient here has two paths: through q(z|x) (the guide) and through the prior's log "
    "p(z) in the model. DReG's reweighting removes the score-function noise of the first path only; "
    "the second keeps its own noise, so iwae-dreg's encoder variance need not fall below iwae's "
    "(docs/estimators.md, \"The VampPrior and the encoder gradient\")."
)


def plot_snr(record: dict, path: Path) -> Path:
    """Encoder and decoder gradient SNR against the number of particles K, one line per estimator;
    each estimator's points are offset a little along K so that lines which coincide (e.g. mc,
    analytic and stl on the decoder) stay visible; the ticks are the K values measured."""
    fig, axes = subplots(1, 2, figsize=(11, 4.5), sharex=True)
    measured = measured_rows(record)
    names = list(dict.fromkeys(row["estimator"] for row in measured))
    ks = sorted({row["particles"] for row in measured})
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("v", "-."), ("D", "-"), ("x", "--")]
    for ax, group in zip(axes, VAE_GROUPS, strict=True):
        for i, name in enumerate(names):
            rows = sorted((r for r in measured if r["estimator"] == name),
                          key=lambda r: r["particles"])
            marker, line = styles[i % len(styles)]
            offset = SNR_OFFSET ** (i - (len(names) - 1) / 2)
            label = name if len(rows) > 1 else f"{name} (K={rows[0]['particles']} only)"
            ax.plot([r["particles"] * offset for r in rows], [r[group]["snr"] for r in rows], marker=marker,
                    linestyle=line, fillstyle="none", markersize=7, label=label)
        ax.set_xscale("log")
        ax.set_xticks(ks, labels=[str(k) for k in ks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("particles K (points offset slightly per estimator)")
        ax.set_ylabel("gradient SNR (|mean| / std, averaged)")
        ax.set_title(f"{group} parameters")
        if names:
            ax.legend(fontsize="small")
    return save_figure(fig, path)


SNR_OFFSET = 1.06  # the factor between neighbouring estimators' K positions in plot_snr


