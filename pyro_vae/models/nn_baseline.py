"""The deterministic baseline of a quadrant-completing CVAE (Sohn et al. 2015; Pyro's examples/cvae):
a network from the given quadrants c to a prediction of the missing pixels, scored by the Bernoulli
likelihood of the missing pixels,

    log p(x_m | c) = sum_{i missing} [x_i log lambda_i + (1 - x_i) log(1 - lambda_i)],
    lambda = sigmoid(f(c)),

which is its conditional log-likelihood (there is no latent). As a Pyro program model(x, c) observes
the missing pixels of x and guide(x, c) samples nothing, so the ELBO is that log-likelihood and Pyro's
SVI with Trace_ELBO trains it; the CVAE (cvae.py) reads its prediction, frozen, as its prior's input.

Its model kind ("nn-baseline", `pyro-vae train --model nn-baseline --condition quadrants:N`) trains it
alone; a `--model cvae --condition quadrants:N` run trains one first, inside the same run
(`train_baseline`, called by the CVAE kind's `start`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..data import Dataset, batch_indices, binarize
from ..errors import InputError
from ..inference.program import Program
from ..param_store import RegisteringModule
from ..stats import mean_se
from .conditions import MISSING, Quadrants, check_condition_name, parse_condition
from .kind import (
    LATENT_SETTINGS,
    MODEL_KINDS,
    ModelKind,
    Picture,
    binarization,
    changed,
    check_discrete,
    flags,
    refuse_at_defaults,
)
from .nets import _mlp

IMAGE_DIMS = 3  # (C, H, W): one event per example
MISSING_COLOUR = (0.25, 0.45, 0.85)  # the pixels to predict, in a completions figure's "given" column
COMPLETION_EXAMPLES = 8  # rows of a completions figure


def missing_pixels_bernoulli(logits: Tensor, missing: Tensor) -> dist.Distribution:
    """prod over the pixels where `missing` (C, H, W) is True of Bernoulli(x_i; sigmoid(logits_i)), one
    event per image (the other pixels contribute log 1 = 0); unmasked where every pixel is missing. No
    support check: grey values in [0, 1] are scored by the usual relaxation."""
    pixels = dist.Bernoulli(logits=logits, validate_args=False)
    if not bool(missing.all()):
        pixels = pixels.mask(missing)
    return pixels.to_event(IMAGE_DIMS)


class BaselineNet(RegisteringModule):
    """lambda = sigmoid(MLP(c)): the missing pixels' probabilities given the quadrants c (missing pixels
    at MISSING). Its parameters reach Pyro's param store under "baseline$$$net...", registered by model()
    (param_store.py)."""

    param_prefix = "baseline"

    def __init__(self, x_shape: Sequence[int], condition: Quadrants, hidden: Sequence[int] = (400,)):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.condition = condition
        d = math.prod(self.x_shape)
        self.net = _mlp([d, *hidden, d])
        self.register_buffer("missing", condition.missing(self.x_shape))

    def logits(self, c: Tensor) -> Tensor:
        """The logits of every pixel, shaped like c (..., C, H, W)."""
        return self.net(c.flatten(-3)).unflatten(-1, self.x_shape)

    def predict(self, c: Tensor) -> Tensor:
        """c with its missing pixels replaced by their predicted probabilities (the baseline's single
        completion, and the CVAE's prior network's input)."""
        return torch.where(c == MISSING, torch.sigmoid(self.logits(c)), c)

    def log_likelihood(self, x: Tensor, c: Tensor) -> Tensor:
        """log p(x_m | c) per example, in nats: shape (N,)."""
        return missing_pixels_bernoulli(self.logits(c), self.missing).log_prob(x)

    model_kind = "nn-baseline"

    def model(self, x: Tensor | None, c: Tensor) -> Tensor:
        """p(x_m | c): the missing pixels of x observed; with x=None one Bernoulli draw of them."""
        self.register_parts("net")
        with pyro.plate("data", c.shape[0]):
            return pyro.sample("x", missing_pixels_bernoulli(self.logits(c), self.missing), obs=x)

    def guide(self, x: Tensor | None, c: Tensor) -> None:
        """No latent: nothing to sample (the ELBO is log p(x_m | c) itself)."""


def build_baseline(x_shape: Sequence[int], condition: str | Quadrants,
                   hidden: Sequence[int] = (400,)) -> BaselineNet:
    """The baseline for `condition` ("quadrants:N" or a Quadrants); a class condition has no quadrants
    to predict (an InputError)."""
    if isinstance(condition, str):
        condition = parse_condition(condition, x_shape)
    if not isinstance(condition, Quadrants):
        raise InputError(f"the NN baseline predicts missing quadrants; --condition {condition.name} has "
                         "none to predict: use --condition quadrants:N")
    return BaselineNet(x_shape, condition, hidden)


def train_baseline(baseline: BaselineNet, data: Dataset, config) -> None:
    """Fit the baseline to data.train_x by maximum likelihood, max mean log p(x_m | c): Adam with
    config.lr, config.epochs passes in batches of config.batch_size in an order drawn from a generator
    seeded with config.seed (the images binarized afresh each pass with --binarize dynamic); its
    parameters require no gradient afterwards (the CVAE reads it frozen). The caller's random state is
    left as it was."""
    x_all = data.train_x
    baseline.requires_grad_(True)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=config.lr)
    order = torch.Generator(device=x_all.device).manual_seed(config.seed)
    for _ in range(config.epochs):
        epoch_x = binarize(x_all, order) if binarization(config) == "dynamic" else x_all
        for rows in batch_indices(x_all.shape[0], config.batch_size, order, x_all.device):
            x = epoch_x[rows]
            loss = -baseline.log_likelihood(x, baseline.condition.condition(x)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    baseline.requires_grad_(False)


def rgb(images: Tensor) -> Tensor:
    """(..., C, H, W) images with 1 or 3 channels as 3-channel ones."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:]) if images.shape[-3] == 1 else images


def given_picture(c: Tensor) -> Tensor:
    """A quadrant condition as a picture: given pixels grey, missing ones in MISSING_COLOUR (N, 3, H, W)."""
    missing = (c == MISSING).any(-3, keepdim=True)
    colour = torch.tensor(MISSING_COLOUR, device=c.device, dtype=c.dtype).view(3, 1, 1)
    return torch.where(missing, colour, rgb(c.clamp(0, 1)))


def check_quadrant_settings(config, kind: ModelKind, allowed: tuple[str, ...] = ()) -> None:
    """What a model of quadrant completion (or a conditional VAE) built from MLPs over Bernoulli pixels
    cannot take: --condition missing or unknown, the VAE's own parts (other than `allowed`), labels, a
    discrete latent, streamed data."""
    if config.condition is None:
        raise InputError(f"--model {kind.name} needs a condition: --condition quadrants:N (N = 1, 2, 3 "
                         "quadrants given, the rest predicted)"
                         + (" or --condition class" if kind.name == "cvae" else ""))
    check_condition_name(config.condition)
    if config.labels is not None or (config.classes is not None and config.condition != "class"):
        raise InputError(f"--labels and --classes apply to --model m2 or classifier (and --classes to "
                         f"--condition class), not --model {kind.name} --condition {config.condition}")
    check_discrete(config, kind)
    fixed = {name: value for name, value in CONDITIONAL_FIXED.items() if name not in allowed}
    refuse_at_defaults(config, fixed, lambda wrong: (
        f"{flags(wrong)} do(es) not apply to --model {kind.name} (MLP networks, a Bernoulli likelihood of "
        "the pixels, a diagonal Gaussian guide, data in memory): leave them at their defaults"))


# the settings of pyro-vae's VAE that a conditional model does not take, at their defaults
CONDITIONAL_FIXED = {"encoder": "mlp", "prior": "normal", "likelihood": "bernoulli", "guide": "diagonal",
                     "prior_components": None, "prior_init": "noise", "pseudo_inputs": "free",
                     "guide_rank": None, "flows": None, "encoder_scale": "softplus", "workers": 0,
                     "sigma_mode": "shared", "exemplar_subset": None, "exemplar_k": None}


class BaselineKind(ModelKind):
    """--model nn-baseline --condition quadrants:N: the deterministic predictor alone, trained by maximum
    likelihood; no latent, so its ELBO is its exact conditional log-likelihood log p(x_m | x_given),
    which evaluate writes as "log_px" (and "elbo"), paired by report with a CVAE's on the same
    examples."""

    name = "nn-baseline"
    latent = False
    conditional = True
    comparison = None
    figures = ("completions.png",)
    sample_title = "the baseline's predictions"

    def check(self, config) -> None:
        given = changed(config, LATENT_SETTINGS)
        if given:
            raise InputError(f"--model nn-baseline predicts the missing quadrants without a latent: "
                             f"{flags(given)} cannot apply; drop {'it' if len(given) == 1 else 'them'} or "
                             "use --model cvae")
        check_quadrant_settings(config, self)
        refuse_at_defaults(config, {"estimator": "mc", "particles": 1}, lambda wrong: (
            f"{flags(wrong)} choose(s) an ELBO estimator, and --model nn-baseline has no latent (its "
            "objective is its exact log-likelihood): drop them"))
        if config.condition == "class":
            raise InputError("--model nn-baseline predicts missing quadrants; --condition class has none "
                             "to predict: use --condition quadrants:N, or --model cvae --condition class")
        if config.early_stop is not None:
            raise InputError("--early-stop watches the validation ELBO of a latent model, and --model "
                             "nn-baseline has none: drop --early-stop")

    def derive(self, config, data: Dataset) -> dict:
        parse_condition(config.condition, data.shape)  # square images with an even side
        return {}

    def build(self, config, x_shape: tuple[int, ...]) -> BaselineNet:
        return build_baseline(x_shape, config.condition, config.hidden)

    def conditions(self, model: BaselineNet, x: Tensor, labels: Tensor | None) -> tuple[Tensor, ...]:
        """c: x with the predicted quadrants at MISSING."""
        return (model.condition.condition(x),)

    def log_likelihood(self, program: Program, x: Tensor) -> Tensor:
        """log p(x_m | x_given) per example, in chunks of examples."""
        owner = program.owner
        return torch.cat([owner.log_likelihood(rows, owner.condition.condition(rows))
                          for rows in x.split(LOG_LIKELIHOOD_BATCH)])

    def test_metrics(self, program: Program, data: Dataset) -> dict[str, float | None]:
        """The test ELBO, which is the exact log p(x_m | x_given)."""
        with torch.no_grad():
            return {"test_elbo": float(self.log_likelihood(program, data.test_x).mean())}

    def epoch_line(self, row: dict) -> str:
        return f"test log p(x_missing | x_given) {row['test_elbo']:.2f} nats"

    def evaluate(self, program: Program, data: Dataset, k: int, progress: bool = False,
                 elbo_samples: int = 10) -> tuple[dict, dict[str, Tensor]]:
        """The exact log p(x_m | x_given) per example, as "log_px" and "elbo" (no latent: they are one)."""
        with torch.no_grad():
            log_lik = self.log_likelihood(program, data.test_x)
        result: dict = {"condition": program.owner.condition.name, "log_px_of": LOG_PX_OF}
        result["log_px"], result["log_px_se"] = mean_se(log_lik)
        result["test_elbo"], result["test_elbo_se"] = result["log_px"], result["log_px_se"]
        result["n_examples"] = int(log_lik.shape[0])
        return result, {"log_px": log_lik, "elbo": log_lik}

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        return (("log_px", "log p(x_m | x_g)"),)

    def evaluation_notes(self, result: dict, config) -> list[str]:
        return [f"exact (no latent); {result['n_examples']} test examples, {result['condition']}"]

    def result_line(self, summary: dict) -> str:
        return f"test log p(x_missing | x_given) {summary['log_px']:.2f} nats (exact)"

    def pictures(self, model: BaselineNet, data: Dataset, seed: int) -> dict[str, Picture]:
        x = data.test_x[:COMPLETION_EXAMPLES]
        c = model.condition.condition(x)
        with torch.no_grad():
            tiles = torch.stack([given_picture(c), rgb(x), rgb(model.predict(c))], dim=1)
        return {"completions.png": Picture(tiles, f"{model.condition.given} quadrant(s) given (blue: "
                                           "predicted): the baseline's prediction", ["given", "truth",
                                                                                     "baseline"])}

    def refusal(self, command: str, what: str) -> str | None:
        if command in ("compare", "compare-config", "diagnose", "encode", "interpolate"):
            return (f"{what} trained the NN baseline (--model nn-baseline): it has no latent for "
                    f"{command}; use a cvae or vae run")
        return None


LOG_LIKELIHOOD_BATCH = 2000  # test examples scored at a time
LOG_PX_OF = "log p(x_missing | x_given)"  # what a quadrant run's "log_px" is

BASELINE_KIND = MODEL_KINDS.builtin(BaselineKind())
