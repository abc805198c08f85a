"""What every estimator comparison shares (compare.py for a VAE or any model/guide pair,
compare_discrete.py for M2): the options and the result of `pyro-vae compare`, an estimator's refusal
of a pair, the gradient statistics of the training loss per parameter group, the table's head and the
columns every comparison has, the figure of the estimates, and writing the files (all or none)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..figures.plots import save_figure, subplots
from ..inference.program import Program
from ..staging import write_all_or_none
from ..stats import mean_se
from ..training.run_dir import write_json

JSON, MARKDOWN = "compare.json", "compare.md"
SNR_FIGURE, ESTIMATES_FIGURE = "compare_snr.png", "compare_estimates.png"


class Refused(ValueError):
    """The estimator refused the pair: its ValueError or NotImplementedError, as one line."""


@contextmanager
def refusals() -> Iterator[None]:
    """Within the block, an estimator's ValueError or NotImplementedError becomes Refused (one line)."""
    try:
        yield
    except (ValueError, NotImplementedError) as err:
        raise Refused(" ".join(str(err).split())) from err


@dataclass
class CompareOptions:
    """What to compare and how hard to look (the `pyro-vae compare` flags)."""

    # NAME or NAME:K; None: for a VAE every registered estimator (default_estimators), for an M2 its
    # three discrete estimators (compare_discrete.py)
    estimators: list[str] | None = None
    particles: list[int] = field(default_factory=lambda: [1, 5, 50])  # K for a bare NAME
    repeats: int = 100
    batch_size: int = 64
    eval_k: int = 1000
    train_epochs: int = 0
    pretrain_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    temperature: float | None = None  # M2's 'relaxed': the Gumbel-softmax tau (None: the run's final, or 0.5)

    def validate(self) -> None:
        """Raise InputError for values outside their range."""
        for name in ("batch_size", "eval_k"):
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
            raise InputError(f"--particles needs positive integers, got {self.particles}")


def parameter_groups(program: object, x: Tensor, *conditions: Tensor) -> dict[str, list[Tensor]]:
    """'encoder': the guide's parameters (variational: the param sites of a guide trace); 'decoder':
    the model's other parameters (generative: decoder network, and a learned prior or likelihood
    scale where the model has one). See Program.parameter_groups (`conditions`: a conditional pair's c)."""
    groups = Program.of(program).parameter_groups(x, *conditions)
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


def _backward(elbo: pyro.infer.ELBO, program: Program, x: Tensor, groups: dict[str, list[Tensor]],
              conditions: tuple[Tensor, ...] = ()) -> None:
    """Backpropagate the gradient of loss = -bound/N into the parameters' .grad: through the
    estimator's differentiable_loss, or where it has none (Pyro's RenyiELBO, TraceGraph_ELBO) through
    its loss_and_grads, which backpropagates -bound itself: the groups' gradients are then divided by N.
    `conditions` follow x into model and guide. The estimator's refusal of the pair is Refused."""
    if hasattr(elbo, "differentiable_loss"):
        with refusals():
            loss = elbo.differentiable_loss(program.model, program.guide, x, *conditions)
        (loss / x.shape[0]).backward()
        return
    with refusals():
        elbo.loss_and_grads(program.model, program.guide, x, *conditions)
    for params in groups.values():
        for p in params:
            if p.grad is not None:
                p.grad.div_(x.shape[0])


def gradient_stats(elbo: pyro.infer.ELBO, program: object, x: Tensor, repeats: int, progress: bool = False,
                   desc: str = "gradients", groups: dict[str, list[Tensor]] | None = None,
                   conditions: tuple[Tensor, ...] = ()) -> dict:
    """R draws g_r of the gradient of loss = -bound/N (as in a training step; _backward): per group of
    parameters (`groups`, by default parameter_groups'), the per-parameter variance var_r(g) and SNR
    |mean_r g| / std_r g, each averaged over the group's parameters (those with std > 0); and the
    median wall time of one loss + backward, in ms. The parameters' .grad are cleared before and after.
    `conditions`: a conditional pair's c (one row per example of x), passed after x to model and guide."""
    program = Program.of(program)
    groups = parameter_groups(program, x, *conditions) if groups is None else groups
    sums = {g: torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64, device=x.device)
            for g, ps in groups.items()}
    squares = {g: s.clone() for g, s in sums.items()}
    times = []
    for r in tqdm(range(repeats + 1), desc=desc, leave=False, disable=not progress):
        _clear_grads(groups)
        _sync(x.device)
        start = time.perf_counter()
        _backward(elbo, program, x, groups, conditions)
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


def estimate_summary(draws: Tensor, log_px: Tensor) -> dict:
    """The statistics of R draws of an estimate, given per example, b_rn of shape (R, N), or as batch
    means only, shape (R,): the mean over r and n of the batch means m_r and its standard error over
    draws (stats.mean_se), the per-example std of one draw sqrt(mean_n var_r b_rn) (None from batch
    means), the bias mean - mean_n log p(x_n), and the m_r."""
    per_example = draws.dim() == 2
    batch_means = draws.mean(1) if per_example else draws
    mean, se = mean_se(batch_means)
    return {"value_mean": mean, "value_mean_se": se,
            "value_std": float(draws.var(0).mean().sqrt()) if per_example else None,
            "bias": mean - float(log_px.mean()), "batch_means": batch_means.tolist()}


@dataclass
class CompareResult:
    """Where the comparison was written, and what it measured."""

    out: Path
    record: dict
    paths: list[Path]


def reference_name(record: dict) -> str:
    """What the reference log_px_ref estimates: record["log_px_of"] (a conditional pair's "log p(x | c)"),
    else "log p(x)"."""
    return record.get("log_px_of", "log p(x)")


def table_head(record: dict, header: list[str], examples: str, reference: str = "") -> list[str]:
    """The lines above a comparison's rows: what was measured (model, `examples`, draws, seed, device,
    the reference log p(x) (reference_name), with `reference` added to how it was computed) and the
    table's header."""
    return [
        f"Model: {record['model']}" + (f" ({record['dataset']})" if record.get("dataset") else "")
        + f"; {record['n_examples']} {examples}, {record['repeats']} draws per estimator, "
        f"seed {record['seed']}, device {record['device']}. Reference {reference_name(record)} = "
        f"{record['log_px_ref']:.2f} nats (IWAE, k={record['k_ref']}{reference}).",
        "",
        "| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |",  # log p(x | c): not a column
        "|" + "---|" * len(header),
    ]


def measured_columns(estimate: str, groups: Sequence[str], reference: str = "log p(x)") -> list[str]:
    """The header of the columns every comparison has: the estimate, its spread and bias against
    `reference` (reference_name), gradient variance and SNR per parameter group, ms per step."""
    return [estimate, "std of one draw (nats)", f"bias vs {reference} (nats)",
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


def plot_estimates(record: dict, path: Path) -> Path:
    """estimates_figure(record) written to `path`; returns path."""
    return save_figure(estimates_figure(record), path)


SURROGATE_LABEL = "surrogate, not a bound"


def estimates_figure(record: dict) -> Figure:
    """The distribution of each estimator's batch-mean estimate over draws, against the reference
    log p(x) (or log p(x | c): reference_name): the bounds first (grey boxes), then, apart beyond a
    dotted line, the rows whose value is a surrogate (row["surrogate"], e.g. M2's 'relaxed'; orange boxes,
    labelled "surrogate, not a bound"), which may lie on either side of log p(x). Rows without a
    measurement (skipped estimators) are not drawn."""
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
               label=f"{reference_name(record)}, IWAE k={record['k_ref']}")
    ax.set_ylabel("estimate (nats per example, batch mean)")
    ax.set_title(f"{record['repeats']} draws on {record['n_examples']} test examples")
    ax.legend()
    return fig


def write_files(record: dict, out: str | Path, table: str,
                snr_figure: Callable[[dict, Path], Path]) -> list[Path]:
    """Write compare.json, compare.md (the Markdown `table`), compare_snr.png (drawn by `snr_figure`) and
    compare_estimates.png into `out`: all of them, or none."""

    def write(folder: Path) -> list[Path]:
        write_json(folder / JSON, record)
        (folder / MARKDOWN).write_text(table)
        return [folder / JSON, folder / MARKDOWN, snr_figure(record, folder / SNR_FIGURE),
                plot_estimates(record, folder / ESTIMATES_FIGURE)]

    return write_all_or_none(out, write)
