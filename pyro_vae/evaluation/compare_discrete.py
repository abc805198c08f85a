"""Estimator comparison for M2 (m2.py): the three estimators of the sum over the class y (discrete.py),
'enum', 'score' and 'relaxed', side by side on one trained M2 and one fixed batch of unlabelled test
examples (model and guide called with x alone), as `pyro-vae compare RUN` measures them for an M2 run:

* the estimate: R draws of every example's value as the estimator sees it (enum: the ELBO with the
  sum over y exact, one z per class; score: the ELBO with y drawn from q(y|x); relaxed: y a
  Gumbel-softmax draw at temperature tau and the categorical log-mass in place of log p(y) and
  log q(y|x), a surrogate that is a bound on neither M2 nor the relaxed model, discrete.py), mean,
  per-example std of one draw, and difference from an IWAE reference log p(x) of the discrete M2 (eval
  mode);
* the gradient of the training loss (-bound / N, one particle): variance and SNR per parameter,
  averaged over the classifier q(y|x), the encoder q(z|x,y) and the decoder (p(x|y,z), with the prior
  and likelihood parameters), by compare_measures.gradient_stats; and ms per loss + backward.

The y site is built as in training (the M2 in training mode, m2.discrete set to each estimator in
turn). The score function needs a baseline b(x): the run's own where it was trained with 'score',
else one fitted by least squares to the downstream cost log w(x, y, z) on training examples.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Config
from ..data import binarize
from ..device import resolve_device
from ..errors import InputError
from ..figures.plots import save_figure, subplots
from ..inference.discrete import DISCRETE, make_discrete_estimator
from ..models.m2 import M2, Baseline
from ..sites import MAX_PLATE_NESTING, sample_sites
from ..stats import mean_se
from ..training.run_dir import load_model, model_stamp
from ..training.train_data import prepare_data
from .compare_measures import (
    CompareOptions,
    CompareResult,
    estimate_summary,
    gradient_stats,
    measured_cells,
    measured_columns,
    table_head,
    write_files,
)
from .evaluate import iwae_log_px

DEFAULT_TEMPERATURE = 0.5  # the relaxation's tau where the run did not train with 'relaxed'
BASELINE_EXAMPLES = 2000  # training examples the score function's baseline is fitted on, at most
BASELINE_RIDGE = 1.0  # the ridge penalty of that least-squares fit (not on the intercept)
GROUPS = ("classifier", "encoder", "decoder")


def parse_discrete(estimators: list[str] | None) -> list[str]:
    """The estimators to compare on an M2 (default: all three), checked: names from DISCRETE only."""
    names = list(dict.fromkeys(estimators or DISCRETE))
    for name in names:
        if name not in DISCRETE:
            raise InputError(f"unknown estimator {name!r} in --estimators for an M2 run: choose among "
                             f"{', '.join(DISCRETE)} (one particle each)")
    return names


def run_temperature(config: Config, temperature: float | None) -> float:
    """The relaxation's temperature: `temperature` if given, else the run's final one if it trained
    with 'relaxed', else DEFAULT_TEMPERATURE."""
    if temperature is not None:
        if not temperature > 0:
            raise InputError(f"--temperature must be positive, got {temperature}")
        return float(temperature)
    if config.discrete == "relaxed":
        return float(config.temperature_final if config.temperature_final is not None else config.temperature)
    return DEFAULT_TEMPERATURE


@contextmanager
def estimating(m2: M2, discrete: str, temperature: float, baseline: Baseline | None):
    """The M2 in training mode with `discrete` (and the relaxation's temperature, the score function's
    baseline) as the y site's estimator; restored afterwards."""
    saved = m2.training, m2.discrete, m2.temperature, m2.baseline
    m2.train()
    m2.discrete, m2.temperature = discrete, temperature
    if discrete == "score":
        m2.baseline = baseline
    try:
        yield m2
    finally:
        m2.train(saved[0])
        m2.discrete, m2.temperature, m2.baseline = saved[1:]


@torch.no_grad()
def bound_draw(model, guide, x: Tensor) -> Tensor:
    """One draw of every example's bound as the ELBO estimators compute it, shape (N,): the guide
    traced with its enumerated sites enumerated in parallel (poutine.enum), the model replayed on it,
    and log w = sum log p - sum log q (masked and scaled as the estimators see them) averaged over the
    enumerated values with weights q of those values: sum_y q(y|x) [log w(x, y, z_y)] for M2's 'enum',
    log w(x, y, z) at the drawn y for 'score' and 'relaxed'. Its sum is minus the estimator's loss."""
    guide_trace = poutine.trace(poutine.enum(guide, first_available_dim=-1 - MAX_PLATE_NESTING)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    log_w, log_q_enum = torch.zeros(()), torch.zeros(())
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for _, site in sample_sites(trace):
            log_w = log_w + sign * site["log_prob"]
            if sign < 0 and site["infer"].get("_enumerate_dim") is not None:
                log_q_enum = log_q_enum + site["log_prob"]
    weighted = log_q_enum.exp() * log_w
    return weighted.reshape(-1, x.shape[0]).sum(0)


@torch.no_grad()
def fit_baseline(m2: M2, x: Tensor) -> Baseline:
    """b(x) = w.x + c fitted by ridge least squares to one draw of the score function's downstream cost
    log w(x, y, z) (y ~ q(y|x)) on the examples x: the baseline for a run not trained with 'score'."""
    baseline = Baseline(tuple(x.shape[1:])).to(x.device)
    training = m2.training
    m2.eval()  # y ~ Categorical(q(y|x)) as 'score' draws it, with no baseline to call
    target = bound_draw(m2.model, m2.guide, x)
    m2.train(training)
    features = torch.cat([x.flatten(1), torch.ones(x.shape[0], 1, device=x.device)], dim=1).double()
    penalty = BASELINE_RIDGE * torch.eye(features.shape[1], dtype=features.dtype, device=x.device)
    penalty[-1, -1] = 0
    solution = torch.linalg.solve(features.T @ features + penalty, features.T @ target.double())
    baseline.net.weight.copy_(solution[:-1].unsqueeze(0))
    baseline.net.bias.copy_(solution[-1:])
    return baseline


def parameter_groups(m2: M2) -> dict[str, list[Tensor]]:
    """'classifier' q(y|x), 'encoder' q(z|x,y), 'decoder' p(x|y,z) with the prior's and likelihood's
    trainable parameters; the score function's baseline is in none."""
    decoder = [*m2.decoder.parameters(), *m2.prior.parameters(), *m2.likelihood.parameters()]
    return {"classifier": list(m2.classifier.parameters()), "encoder": list(m2.encoder.parameters()),
            "decoder": [p for p in decoder if p.requires_grad]}


def measure_m2(m2: M2, x: Tensor, names: list[str], repeats: int, eval_k: int, temperature: float,
               baseline: Baseline, seed: int = 0, progress: bool = False) -> dict:
    """The comparison of the estimators `names` on the M2 and the unlabelled batch x: the record
    compare.json holds (rows as compare's, with a 'classifier' group, particles 1)."""
    m2.eval()
    pyro.set_rng_seed(seed)
    log_px = iwae_log_px(m2.model, m2.guide, x, eval_k)
    record: dict = {"kind": "m2", "n_examples": int(x.shape[0]), "repeats": repeats, "k_ref": eval_k,
                    "seed": seed, "device": str(x.device), "log_px_ref": float(log_px.mean()),
                    "log_px_ref_se": mean_se(log_px)[1],
                    "temperature": temperature, "labels": "none (every example unlabelled)"}
    groups = parameter_groups(m2)
    rows = []
    for name in tqdm(names, desc="estimators", disable=not progress):
        with estimating(m2, name, temperature, baseline):
            pyro.set_rng_seed(seed)
            draws = torch.stack([bound_draw(m2.model, m2.guide, x) for _ in range(repeats)])  # (R, N)
            row = {"estimator": name, "particles": 1, **estimate_summary(draws, log_px)}
            pyro.set_rng_seed(seed)
            row.update(gradient_stats(make_discrete_estimator(name), m2, x, repeats, progress, name, groups))
        baseline.zero_grad(set_to_none=True)  # the baseline loss's gradient, measured in no group
        surrogate = name == "relaxed"
        row["objective"] = f"surrogate (tau={temperature:g}), not a bound" if surrogate else "ELBO"
        row["surrogate"] = surrogate
        rows.append(row)
    record["estimators"] = rows
    return record


def compare_m2_run(run: Path, config: Config, out: Path, options: CompareOptions) -> CompareResult:
    """`pyro-vae compare RUN` for an M2 run: measure_m2 on the first options.batch_size test examples,
    written as compare.json, compare.md and the two figures into `out`."""
    names = parse_discrete(options.estimators)
    for flag in ("train_epochs", "pretrain_epochs"):
        if getattr(options, flag):
            raise InputError(f"--{flag.replace('_', '-')} is not supported for an M2 run: compare measures "
                             "the trained M2 as it is")
    tau = run_temperature(config, options.temperature)
    device = resolve_device(options.device)
    config, m2 = load_model(run, device)
    data = prepare_data(config).to(device)
    x = data.test_x[: options.batch_size]
    if m2.baseline is not None:
        baseline, fitted = m2.baseline, "the run's b(x) (trained with --discrete score)"
    else:
        pyro.set_rng_seed(options.seed)
        train_x = data.train_x[:BASELINE_EXAMPLES]
        if config.binarize == "dynamic":
            train_x = binarize(train_x, torch.Generator(device=train_x.device).manual_seed(options.seed))
        baseline = fit_baseline(m2, train_x)
        fitted = f"b(x) linear, fitted by least squares to log w on {train_x.shape[0]} training examples"
    record = measure_m2(m2, x, names, options.repeats, options.eval_k, tau, baseline, options.seed,
                        options.progress)
    record.update(model=f"{run} (M2, trained with --discrete {config.discrete})", dataset=config.dataset,
                  prior=config.prior, score_baseline=fitted, model_checkpoint=model_stamp(run))
    return CompareResult(out, record, write_files(record, out, markdown(record), plot_snr))


def markdown(record: dict) -> str:
    """The M2 comparison as a Markdown table, with what was measured and how."""
    header = ["estimator", "objective", *measured_columns("estimate (nats)", GROUPS)]
    lines = table_head(record, header, "unlabelled test examples", ", y drawn from q(y|x)")
    for row in record["estimators"]:
        cells = [row["estimator"], row["objective"], *measured_cells(row, GROUPS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "enum sums over the class y exactly (one z per class), score draws y ~ q(y|x) and uses the score "
        f"function with a baseline ({record['score_baseline']}), relaxed draws a Gumbel-softmax y at "
        f"tau = {record['temperature']:g} and scores it with the categorical log-mass sum_k y_k log pi_k in "
        "place of the densities of p(y) and q(y|x): a surrogate, not a bound on M2 or on the relaxed model "
        "(it may exceed log p(x)), so its bias is not comparable. Estimate: mean over draws and examples "
        "± its standard error over draws; std of one draw: per-example standard deviation of a single "
        "estimate. Gradients of the training loss (−objective per example, averaged over the batch): "
        "variance per parameter and SNR = |mean| / std per parameter, averaged over the classifier q(y|x), "
        "the encoder q(z|x,y) and the decoder p(x|y,z). ms/step: median wall time of one loss + backward.",
    ]
    return "\n".join(lines) + "\n"


def plot_snr(record: dict, path: Path) -> Path:
    """Gradient SNR per estimator, one group of bars per parameter group."""
    rows = record["estimators"]
    fig, ax = subplots(figsize=(7, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(GROUPS))],
               [row[group]["snr"] for group in GROUPS], width, label=row["estimator"])
    ax.set_xticks(range(len(GROUPS)), labels=list(GROUPS))
    ax.set_yscale("log")
    ax.set_ylabel("gradient SNR (|mean| / std, averaged)")
    ax.set_title(f"M2: {record['repeats']} draws on {record['n_examples']} unlabelled test examples")
    ax.legend()
    return save_figure(fig, path)
