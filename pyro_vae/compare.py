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

Every measurement of an estimator starts from the same seed, so a result does not depend on which
other estimators were compared with it. `compare` measures a pair in Python; `compare_estimators`
(the CLI's) measures a run or a config's model; `write_comparison` writes compare.json, compare.md
and two PNG figures. An M2 run (a discrete latent y) is measured by compare_discrete.py instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch import Tensor
from tqdm.auto import tqdm

from .config import Config, load_config_file
from .errors import InputError
from .estimators import ESTIMATORS, check_analytic_kl, make_estimator
from .evaluate import iwae_log_px
from .model import VAE
from .plots import save_figure, subplots
from .program import Program
from .rng import forked_rng
from .run_dir import build_from_config, load_model, model_stamp, read_config, write_json
from .staging import write_all_or_none

JSON, MARKDOWN = "compare.json", "compare.md"
SNR_FIGURE, ESTIMATES_FIGURE = "compare_snr.png", "compare_estimates.png"
VAE_GROUPS = ("encoder", "decoder")  # the guide's parameters (q) and the model's (p), parameter_groups
TRAIN_DIR = "compare-train"  # where --train-epochs writes one run per estimator
PRETRAINED_DIR = "model"  # where --pretrain-epochs writes the model it measures


def _se(values: Tensor) -> float | None:
    """Standard error of the mean over examples (None for one example)."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else None


class Refused(ValueError):
    """The estimator refused the pair: its ValueError or NotImplementedError, as one line."""


@contextmanager
def refusals() -> Iterator[None]:
    """Within the block, an estimator's ValueError or NotImplementedError becomes Refused (one line)."""
    try:
        yield
    except (ValueError, NotImplementedError) as err:
        raise Refused(" ".join(str(err).split())) from err


# the note of a row measured through the estimator's loss (an ELBO without per_example_bound)
BATCH_ONLY = ("has no per_example_bound: measured through its loss, the batch's mean bound, so the std of "
              "one draw is not available (—)")


@dataclass
class CompareOptions:
    """What to compare and how hard to look (the `pyro-vae compare` flags)."""

    # NAME or NAME:K; None: for a VAE every registered estimator (default_estimators), for an M2 its
    # three discrete estimators (compare_discrete.py)
    estimators: list[str] | None = None
    particles: list[int] = field(default_factory=lambda: [1, 5, 50])  # K for a bare NAME
    repeats: int = 100
    batch_size: int = 64
    k_ref: int = 1000
    train_epochs: int = 0
    pretrain_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    temperature: float | None = None  # M2's 'relaxed': the Gumbel-softmax tau (None: the run's final, or 0.5)

    def validate(self) -> None:
        """Raise InputError for values outside their range."""
        for name in ("batch_size", "k_ref"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        if self.repeats < 2:
            raise InputError(f"--repeats must be at least 2 (a standard deviation needs two draws), "
                             f"got {self.repeats}")
        for name in ("train_epochs", "pretrain_epochs"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.particles or min(self.particles) < 1:
            raise InputError(f"--particles-list needs positive integers, got {self.particles}")


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
def estimate_stats(elbo: pyro.infer.ELBO, program: object, x: Tensor, repeats: int, log_px: Tensor) -> dict:
    """R draws b_rn of every example's bound, by the estimator's per_example_bound: mean over r and n
    (and its standard error over draws), per-example std sqrt(mean_n var_r b_rn), bias mean - mean_n
    log p(x_n), and the R batch means. An ELBO without per_example_bound gives R batch means
    -loss/N only: value_std is None and the row has a note saying so. The estimator's refusal of the
    pair is Refused."""
    program = Program.of(program)
    per_example = getattr(elbo, "per_example_bound", None)
    with refusals():
        if per_example is not None:  # draws b_rn, (R, N)
            draws = torch.stack([per_example(program.model, program.guide, x) for _ in range(repeats)])
        else:
            losses = [float(elbo.loss(program.model, program.guide, x)) for _ in range(repeats)]
    if per_example is not None:
        batch_means, value_std = draws.mean(1), float(draws.var(0).mean().sqrt())
    else:
        batch_means, value_std = -torch.tensor(losses, dtype=torch.float64) / x.shape[0], None
    mean = float(batch_means.mean())
    stats = {
        "value_mean": mean,
        "value_mean_se": float(batch_means.std() / math.sqrt(repeats)),
        "value_std": value_std,
        "bias": mean - float(log_px.mean()),
        "batch_means": batch_means.tolist(),
    }
    return stats if per_example is not None else {**stats, "note": BATCH_ONLY}


def parameter_groups(program: object, x: Tensor) -> dict[str, list[Tensor]]:
    """'encoder': the guide's parameters (variational: the param sites of a guide trace); 'decoder':
    the model's other parameters (generative: decoder network, and a learned prior or likelihood
    scale where the model has one). See Program.parameter_groups."""
    groups = Program.of(program).parameter_groups(x)
    return {"encoder": list(groups["guide"].values()), "decoder": list(groups["model"].values())}


def _clear_grads(groups: dict[str, list[Tensor]]) -> None:
    for params in groups.values():
        for p in params:
            p.grad = None


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    """All the parameters' gradients in one vector (zeros for a parameter the loss did not reach)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backward(elbo: pyro.infer.ELBO, program: Program, x: Tensor, groups: dict[str, list[Tensor]]) -> None:
    """Backpropagate the gradient of loss = -bound/N into the parameters' .grad: through the
    estimator's differentiable_loss, or where it has none (Pyro's RenyiELBO, TraceGraph_ELBO) through
    its loss_and_grads, which backpropagates -bound itself: the groups' gradients are then divided by N.
    The estimator's refusal of the pair is Refused."""
    if hasattr(elbo, "differentiable_loss"):
        with refusals():
            loss = elbo.differentiable_loss(program.model, program.guide, x)
        (loss / x.shape[0]).backward()
        return
    with refusals():
        elbo.loss_and_grads(program.model, program.guide, x)
    for params in groups.values():
        for p in params:
            if p.grad is not None:
                p.grad.div_(x.shape[0])


def gradient_stats(elbo: pyro.infer.ELBO, program: object, x: Tensor, repeats: int, progress: bool = False,
                   desc: str = "gradients", groups: dict[str, list[Tensor]] | None = None) -> dict:
    """R draws g_r of the gradient of loss = -bound/N (as in a training step; _backward): per group of
    parameters (`groups`, by default parameter_groups'), the per-parameter variance var_r(g) and SNR
    |mean_r g| / std_r g, each averaged over the group's parameters (those with std > 0); and the
    median wall time of one loss + backward, in ms. The parameters' .grad are cleared before and after."""
    program = Program.of(program)
    groups = parameter_groups(program, x) if groups is None else groups
    sums = {g: torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64, device=x.device)
            for g, ps in groups.items()}
    squares = {g: s.clone() for g, s in sums.items()}
    times = []
    for r in tqdm(range(repeats + 1), desc=desc, leave=False, disable=not progress):
        _clear_grads(groups)
        _sync(x.device)
        start = time.perf_counter()
        _backward(elbo, program, x, groups)
        _sync(x.device)
        if r == 0:
            continue  # a warm-up step: first-call costs are not part of the time or the statistics
        times.append(time.perf_counter() - start)
        for g, ps in groups.items():
            flat = _flat_grad(ps).double()
            sums[g] += flat
            squares[g] += flat.square()
    _clear_grads(groups)
    result: dict = {"ms_per_step": 1000 * float(torch.tensor(times).median())}
    for g in groups:
        mean = sums[g] / repeats
        var = ((squares[g] - repeats * mean.square()) / (repeats - 1)).clamp(min=0)
        varying = var > 0
        snr = mean[varying].abs() / var[varying].sqrt()
        result[g] = {"grad_var": float(var.mean()), "snr": float(snr.mean()) if varying.any() else math.nan,
                     "n_params": int(var.numel())}
    return result


def measure(program: object, x: Tensor, specs: Sequence[tuple[str, int]], repeats: int, k_ref: int,
            seed: int = 0, progress: bool = False) -> dict:
    """The comparison on one model/guide pair and batch: the reference log p(x) and one row per
    (name, K)."""
    program = Program.of(program)
    pyro.set_rng_seed(seed)
    log_px = iwae_log_px(program.model, program.guide, x, k_ref)
    record: dict = {"n_examples": int(x.shape[0]), "repeats": repeats, "k_ref": k_ref, "seed": seed,
                    "device": str(x.device), "log_px_ref": float(log_px.mean()), "log_px_ref_se": _se(log_px)}
    if any(name == "analytic" for name, _ in specs):
        record["analytic_kl"] = check_analytic_kl("analytic", program.model, program.guide, x)
    rows = []
    for name, k in tqdm(specs, desc="estimators", disable=not progress):
        elbo = make_estimator(name, k)
        try:
            pyro.set_rng_seed(seed)
            row = {"estimator": name, "particles": k, **estimate_stats(elbo, program, x, repeats, log_px)}
            pyro.set_rng_seed(seed)
            row.update(gradient_stats(elbo, program, x, repeats, progress, f"{name} K={k}"))
        except Refused as err:  # the estimator refuses this pair: say why
            row = {"estimator": name, "particles": k, "skipped": str(err)}
        rows.append(row)
    record["estimators"] = rows
    return record


def _read_config(run: Path | None, config_file: Path | None, device: torch.device) -> Config:
    """The config of the run, or of the config file (on `device`)."""
    if config_file is not None:
        return Config.from_dict({**load_config_file(config_file), "device": device.type})
    return read_config(run)[0]


def _model(run: Path | None, config_file: Path | None, config: Config, out: Path, options: CompareOptions,
           device: torch.device) -> tuple[VAE, Tensor, str]:
    """The model to measure, the test batch, and a description of the model."""
    from .train import prepare_data, train

    if config_file is not None and not options.pretrain_epochs:
        pyro.set_rng_seed(config.seed)  # the initialization `pyro-vae train` starts from
        data = prepare_data(config).to(device)
        vae = build_from_config(config, data.shape).to(device).eval()
        return vae, data.test_x[: options.batch_size], f"{config_file}, untrained"
    if config_file is not None:
        run = out / PRETRAINED_DIR
        train(dataclasses.replace(config, epochs=options.pretrain_epochs), out=run,
              progress=options.progress, overwrite=True)
    config, vae = load_model(run, device)
    data = prepare_data(config).to(device)
    described = f"{run}" + (f", trained {options.pretrain_epochs} epochs" if config_file else "")
    return vae, data.test_x[: options.batch_size], described


def train_each(config: Config, specs: Sequence[tuple[str, int]], epochs: int, out: Path, k_ref: int,
               x: Tensor, progress: bool = True) -> dict[str, dict]:
    """Train the config's network from its initialization (same seed) with each estimator for `epochs`
    epochs; per 'name K' label, the final log p(x) (IWAE, k_ref) on the batch x and the run's summary."""
    from .train import train

    results = {}
    for name, k in specs:
        run = out / TRAIN_DIR / f"{name}-K{k}"
        cfg = dataclasses.replace(config, estimator=name, particles=k, epochs=epochs, device=x.device.type)
        summary = train(cfg, out=run, progress=progress, overwrite=True).summary
        _, vae = load_model(run, x.device)
        pyro.set_rng_seed(cfg.seed)
        log_px = iwae_log_px(vae.model, vae.guide, x, k_ref)
        results[f"{name} {k}"] = {
            "epochs": epochs, "run": str(run), "log_px": float(log_px.mean()),
            "log_px_se": _se(log_px),
            "test_elbo": summary.get("test_elbo"), "train_seconds": summary.get("train_seconds"),
        }
    return results


@dataclass
class CompareResult:
    """Where the comparison was written, and what it measured."""

    out: Path
    record: dict
    paths: list[Path]


def compare_estimators(run: str | Path | None = None, config_file: str | Path | None = None,
                       out: str | Path | None = None, options: CompareOptions | None = None) -> CompareResult:
    """Compare estimators on a trained run (RUN) or on a fresh model from a config file (then `out`
    is required); write compare.json, compare.md and the figures to `out` (default: RUN). Seeded with
    options.seed, on forked generators: the caller's random state is as it was afterwards."""
    from .device import resolve_device

    options = options or CompareOptions()
    with forked_rng(resolve_device(options.device)):
        return _compare_estimators(run, config_file, out, options)


def _compare_estimators(run: str | Path | None, config_file: str | Path | None, out: str | Path | None,
                        options: CompareOptions) -> CompareResult:
    from .device import resolve_device

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
    model = getattr(config, "model", "vae")
    if model == "m2":
        if run is None:
            raise InputError("compare measures a trained M2: give its run directory, not --config")
        from .compare_discrete import compare_m2_run

        return compare_m2_run(run, config, out_dir, options)
    if model == "classifier":
        raise InputError(f"{run or config_file} is the classifier baseline (model 'classifier'): it has no "
                         "latent and no ELBO to estimate; compare an M2 or a VAE run")
    if model != "vae":
        raise InputError(f"{run or config_file} is an autoencoder (model {config.model!r}): it has no ELBO "
                         "to estimate; compare a VAE")
    if options.temperature is not None:
        raise InputError("--temperature is the Gumbel-softmax temperature of an M2 run's 'relaxed' "
                         "estimator; a VAE has no discrete latent")
    specs = parse_specs(options.estimators, options.particles)
    if options.train_epochs:  # refuse a bad pairing (an estimator the config cannot train with) up front
        for name, k in specs:
            dataclasses.replace(config, estimator=name, particles=k, epochs=options.train_epochs).validate()
    vae, x, described = _model(run, config_file, config, out_dir, options, device)
    record = compare(vae, x, options.estimators, options.particles, options.repeats, options.k_ref,
                     options.seed, options.progress)
    record.update(model=described, dataset=config.dataset, prior=getattr(config, "prior", None))
    if run is not None and config_file is None:
        record["model_checkpoint"] = model_stamp(run)
    if options.train_epochs:
        final = train_each(config, specs, options.train_epochs, out_dir, options.k_ref, x, options.progress)
        for row in record["estimators"]:
            row["final"] = final[f"{row['estimator']} {row['particles']}"]
    return CompareResult(out_dir, record, write_comparison(record, out_dir))


def _describe(program: Program) -> str:
    """A name for the pair in the report: its owner's class, else the two functions' names."""
    if program.owner is not None:
        return type(program.owner).__name__
    return "/".join(getattr(fn, "__name__", type(fn).__name__) for fn in (program.model, program.guide))


def compare(program: object, x: Tensor, estimators: Sequence[str] | None = None,
            particles: Sequence[int] = (1, 5, 50), repeats: int = 100, k_ref: int = 1000, seed: int = 0,
            progress: bool = False) -> dict:
    """Compare ELBO estimators on the model/guide pair `program` (our VAE, an object with .model and
    .guide, a (model, guide) tuple or a Program) and the batch x: the record compare.json holds (a
    reference log p(x) by IWAE with k_ref draws, and per estimator NAME or NAME:K (default: every
    registered one), K from `particles` for a bare NAME: value spread and bias over `repeats` draws,
    gradient variance and SNR of the guide's ("encoder") and the model's ("decoder") parameters, time;
    or a note, see the module's docstring). write_comparison writes it. Seeded with `seed`, on forked
    generators: the caller's random state is as it was afterwards."""
    options = CompareOptions(estimators=list(estimators or ESTIMATORS), particles=list(particles),
                             repeats=repeats, k_ref=k_ref, seed=seed, progress=progress)
    options.validate()
    program = Program.of(program)
    with forked_rng(x.device):  # tracing the pair draws too
        program.sites(x)
        if program.is_autoencoder:
            raise InputError(f"{_describe(program)} is an autoencoder (a point-mass guide): it has no ELBO "
                             "to estimate; compare a VAE")
        specs = parse_specs(options.estimators, options.particles)
        record = measure(program, x, specs, repeats, k_ref, seed, progress)
    return {"model": _describe(program), "dataset": None, **record}


def write_comparison(record: dict, out: str | Path, table: str | None = None,
                     snr_figure: Callable[[dict, Path], Path] | None = None) -> list[Path]:
    """Write compare.json, compare.md (the Markdown `table`, default: the VAE's), compare_snr.png (drawn
    by `snr_figure`, default: the VAE's) and compare_estimates.png into `out`: all of them, or none."""

    def write(folder: Path) -> list[Path]:
        write_json(folder / JSON, record)
        (folder / MARKDOWN).write_text(markdown(record) if table is None else table)
        return [folder / JSON, folder / MARKDOWN, (snr_figure or plot_snr)(record, folder / SNR_FIGURE),
                plot_estimates(record, folder / ESTIMATES_FIGURE)]

    return write_all_or_none(out, write)


def table_head(record: dict, header: list[str], examples: str, reference: str = "") -> list[str]:
    """The lines above a comparison's rows: what was measured (model, `examples`, draws, seed, device,
    the reference log p(x), with `reference` added to how it was computed) and the table's header."""
    return [
        f"Model: {record['model']}" + (f" ({record['dataset']})" if record.get("dataset") else "")
        + f"; {record['n_examples']} {examples}, {record['repeats']} draws per estimator, "
        f"seed {record['seed']}, device {record['device']}. Reference log p(x) = {record['log_px_ref']:.2f} "
        f"nats (IWAE, k={record['k_ref']}{reference}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]


def measured_columns(estimate: str, groups: Sequence[str]) -> list[str]:
    """The header of the columns every comparison has: the estimate, its spread and bias, gradient
    variance and SNR per parameter group, ms per step."""
    return [estimate, "std of one draw (nats)", "bias vs log p(x) (nats)",
            *(f"{g} {m}" for g in groups for m in ("grad var", "SNR")), "ms/step"]


def measured_cells(row: dict, groups: Sequence[str]) -> list[str]:
    """A row's cells under measured_columns ("—" for a value not measured)."""
    std = "—" if row["value_std"] is None else f"{row['value_std']:.2f}"
    return [f"{row['value_mean']:.2f} ± {row['value_mean_se']:.2f}", std,
            f"{row['bias']:.2f}",
            *(cell for g in groups for cell in (f"{row[g]['grad_var']:.2e}", f"{row[g]['snr']:.3f}")),
            f"{row['ms_per_step']:.1f}"]


def measured_rows(record: dict) -> list[dict]:
    """The record's rows that were measured (not skipped)."""
    return [row for row in record["estimators"] if "skipped" not in row]


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
    header = ["estimator", "K", *measured_columns("bound (nats)", VAE_GROUPS)]
    if final:
        epochs = next(row["final"]["epochs"] for row in rows if "final" in row)
        header.append(f"log p(x) after {epochs} epochs (nats)")
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


def plot_estimates(record: dict, path: Path) -> Path:
    """estimates_figure(record) written to `path`; returns path."""
    return save_figure(estimates_figure(record), path)


SURROGATE_LABEL = "surrogate, not a bound"


def estimates_figure(record: dict) -> Figure:
    """The distribution of each estimator's batch-mean estimate over draws, against the reference
    log p(x): the bounds first (grey boxes), then, apart beyond a dotted line, the rows whose value is a
    surrogate (row["surrogate"], e.g. M2's 'relaxed'; orange boxes, labelled "surrogate, not a bound"),
    which may lie on either side of log p(x). Rows without a measurement (skipped estimators) are not
    drawn."""
    rows = measured_rows(record)
    bounds = [r for r in rows if not r.get("surrogate")]
    surrogates = [r for r in rows if r.get("surrogate")]
    fig, ax = subplots(figsize=(max(5.0, 1.1 * len(rows)), 4.5))
    for group, start, colour, label in ((bounds, 1, "lightgrey", "bound"),
                                        (surrogates, len(bounds) + 1, "tab:orange", SURROGATE_LABEL)):
        if not group:
            continue
        ax.boxplot([r["batch_means"] for r in group], positions=range(start, start + len(group)),
                   tick_labels=[f"{r['estimator']}\nK={r['particles']}" for r in group], patch_artist=True,
                   boxprops={"facecolor": colour}, medianprops={"color": "k"}, label=label)
    if bounds and surrogates:
        ax.axvline(len(bounds) + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axhline(record["log_px_ref"], color="k", linestyle="--", linewidth=1,
               label=f"log p(x), IWAE k={record['k_ref']}")
    ax.set_ylabel("estimate (nats per example, batch mean)")
    ax.set_title(f"{record['repeats']} draws on {record['n_examples']} test examples")
    ax.legend()
    return fig
