"""The conditional VAE of Sohn et al. (2015) as one Pyro program that takes the condition c as an input:

    model(x, c):  z ~ p(z | c) = N(mu_p(c), diag sigma_p(c)^2),  x ~ p(x | z, c) = Bernoulli(sigmoid(g(z, c)))
    guide(x, c):  z ~ q(z | x, c) = N(mu_q(x, c), diag sigma_q(x, c)^2)

The ELBO is a bound on the conditional log-likelihood,
log p(x | c) >= E_q[log p(x | z, c)] - KL(q(z | x, c) || p(z | c)), the KL in closed form between the two
diagonal Gaussians under TraceMeanField_ELBO (`--estimator analytic`).

The condition (conditions.py) is `quadrants:N` (c: the image with its missing pixels at -1; the
likelihood scores the missing pixels only, so the bound is on log p(x_m | x_given)) or `class` (c: the
one-hot label; the likelihood scores the whole image). The networks read c as a vector h(c): for
quadrants, with a baseline (nn_baseline.py), the image with its gaps filled by the baseline's
prediction, as in Sohn et al. and Pyro's examples/cvae (the baseline is frozen: trained first, its
parameters never registered here); without one, c itself; for a class, the one-hot label.

Sites: latent "z", observation "x", in the data plate "data" (dim -1): every estimator of the registry
(mc, analytic, iwae, stl, iwae-dreg) trains it, passing (x, c) through to model and guide. model()
registers the prior network and decoder, guide() the recognition network, in Pyro's param store under
"cvae$$$<name>" (param_store.py), so Pyro's own SVI trains it.

Its model kind ("cvae": `pyro-vae train --model cvae --condition quadrants:N | class`) builds it from
the settings; for quadrants the run first trains the baseline (nn_baseline.train_baseline), then the
CVAE with the baseline frozen. Evaluation scores log p(x_m | x_given) (or log p(x | class)) by
importance sampling beside the conditional ELBO and, for quadrants, the baseline's exact likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..data import CLASS_NAMES, Dataset
from ..errors import InputError
from ..inference.estimators import ESTIMATORS
from ..inference.program import Program
from ..inference.scores import elbo_terms, iwae_log_px
from ..param_store import RegisteringModule
from ..rng import seeded
from ..stats import mean_se
from .conditions import ClassLabel, Condition, Quadrants, parse_condition
from .kind import MODEL_KINDS, ModelKind, Picture, check_kl_weight
from .nets import _gaussian_params, _mlp, he_init
from .nn_baseline import (
    COMPLETION_EXAMPLES,
    LOG_PX_OF,
    BaselineNet,
    build_baseline,
    check_quadrant_settings,
    given_picture,
    missing_pixels_bernoulli,
    rgb,
    train_baseline,
)


class CVAE(RegisteringModule):
    """p(z | c) p(x | z, c) and q(z | x, c), each network an MLP over [its inputs, h(c)] (see the
    module's docstring). `baseline`: a trained BaselineNet whose prediction fills the missing quadrants
    in h(c) (frozen: its parameters stop requiring gradients)."""

    is_autoencoder = False
    is_classifier = False
    model_kind = "cvae"
    param_prefix = "cvae"

    def __init__(self, x_shape: Sequence[int], condition: Condition, hidden: Sequence[int] = (400,),
                 z_dim: int = 20, baseline: BaselineNet | None = None):
        super().__init__()
        if baseline is not None and not isinstance(condition, Quadrants):
            raise InputError(f"a baseline fills missing quadrants; --condition {condition.name} has none: "
                             "build the CVAE without one, or use --condition quadrants:N")
        self.x_shape, self.condition, self.z_dim = tuple(x_shape), condition, z_dim
        d, f = math.prod(self.x_shape), condition.features(self.x_shape)
        self.recognition = _mlp([d + f, *hidden, 2 * z_dim])
        self.prior_net = _mlp([f, *hidden, 2 * z_dim])
        self.decoder = _mlp([z_dim + f, *reversed(hidden), d])
        self.baseline = None if baseline is None else baseline.requires_grad_(False)
        self.register_buffer("missing", condition.missing(self.x_shape))

    @property
    def log_px_of(self) -> str:
        """What its log p(x | c) is: log p(x_missing | x_given) for quadrants, log p(x | class) for a
        class (evaluate and compare label their results with it)."""
        return LOG_PX_OF if isinstance(self.condition, Quadrants) else "log p(x | class)"

    def features(self, c: Tensor) -> Tensor:
        """h(c), (N, F): the condition as the networks read it (the baseline's filled image, if any)."""
        if self.baseline is not None:
            with torch.no_grad():
                c = self.baseline.predict(c)
        return c.flatten(1)

    def prior(self, h: Tensor) -> dist.Distribution:
        """p(z | c) = N(mu_p(h), diag sigma_p(h)^2)."""
        return dist.Normal(*_gaussian_params(self.prior_net(h))).to_event(1)

    def likelihood(self, z: Tensor, h: Tensor) -> dist.Distribution:
        """p(x | z, c): Bernoulli over the predicted pixels (all of them for a class condition)."""
        joined = torch.cat([z, h.expand(*z.shape[:-1], h.shape[-1])], dim=-1)
        return missing_pixels_bernoulli(self.decoder(joined).unflatten(-1, self.x_shape), self.missing)

    def posterior(self, x: Tensor, c: Tensor) -> dist.Distribution:
        """q(z | x, c) = N(mu_q(x, h), diag sigma_q(x, h)^2), without running Pyro."""
        return dist.Normal(*_gaussian_params(self.recognition(torch.cat([x.flatten(1), self.features(c)],
                                                                        dim=-1)))).to_event(1)

    def model(self, x: Tensor | None, c: Tensor) -> Tensor:
        """p(z | c) p(x | z, c) for a batch of conditions c; x=None draws x."""
        self.register_parts("prior_net", "decoder")
        h = self.features(c)
        with pyro.plate("data", h.shape[0]):
            z = pyro.sample("z", self.prior(h))
            return pyro.sample("x", self.likelihood(z, h), obs=x)

    def guide(self, x: Tensor, c: Tensor) -> Tensor:
        """q(z | x, c), reparameterized."""
        self.register_parts("recognition")
        with pyro.plate("data", c.shape[0]):
            return pyro.sample("z", self.posterior(x, c))

    @torch.no_grad()
    def complete(self, c: Tensor) -> Tensor:
        """One sampled completion per condition: z ~ p(z | c), the mean of p(x | z, c) at the predicted
        pixels and c's given pixels elsewhere (for a class condition, the mean image), (N, C, H, W)."""
        h = self.features(c)
        mean = self.likelihood(self.prior(h).sample(), h).mean
        return torch.where(self.missing, mean, c) if isinstance(self.condition, Quadrants) else mean


def build_cvae(x_shape: Sequence[int], condition: str | Condition, hidden: Sequence[int] = (400,),
               z_dim: int = 20, n_classes: int | None = None,
               baseline: BaselineNet | None = None) -> CVAE:
    """A CVAE for examples of shape x_shape under `condition` ("quadrants:N", "class" with n_classes, or
    a Condition), its quadrants filled by `baseline`'s prediction where one is given."""
    if isinstance(condition, str):
        condition = parse_condition(condition, x_shape, n_classes)
    return CVAE(x_shape, condition, hidden, z_dim, baseline)


@torch.no_grad()
def completion_images(cvae: CVAE, x: Tensor, c: Tensor, baseline: BaselineNet | None = None,
                      n_samples: int = 6, seed: int = 0) -> tuple[Tensor, list[str]]:
    """One row per example: the given quadrants, the truth x, the baseline's prediction (if given),
    then n_samples completions z ~ p(z | c), x = mean of p(x | z, c) at the missing pixels (the given
    ones kept); as (rows, columns, 3, H, W) pictures and the columns' names. Seeded."""
    with seeded(seed, x.device):
        samples = [cvae.complete(c) for _ in range(n_samples)]
    columns = [given_picture(c), rgb(x)]
    names = ["given", "truth"]
    if baseline is not None:
        columns.append(rgb(baseline.predict(c)))
        names.append("baseline")
    columns += [rgb(s) for s in samples]
    names += [f"CVAE {i + 1}" for i in range(n_samples)]
    return torch.stack(columns, dim=1), names


@torch.no_grad()
def class_sample_images(cvae: CVAE, n_per_class: int = 10, seed: int = 0,
                        classes: Sequence[int] | None = None) -> Tensor:
    """For a class-conditional CVAE: (len(classes), n_per_class, C, H, W), row k the mean of
    p(x | z, classes[k]) for z ~ p(z | classes[k]) (classes: all of them by default). Seeded."""
    n_classes = cvae.condition.n_classes
    chosen = torch.arange(n_classes) if classes is None else torch.tensor(list(classes))
    labels = chosen.to(cvae.missing.device).repeat_interleave(n_per_class)
    c = cvae.condition.condition(torch.zeros(1, device=labels.device), labels)
    with seeded(seed, c.device):
        images = cvae.complete(c)
    return images.unflatten(0, (len(chosen), n_per_class))


COMPLETION_SAMPLES = 6  # sampled completions per example in the completions figure
CLASS_SAMPLES = 10  # samples per class in the class_samples figure
SAMPLE_COLUMNS = 8  # columns of `sample --class K`'s grid


class CVAEKind(ModelKind):
    """--model cvae --condition quadrants:N | class: the conditional VAE (MLPs, Bernoulli pixels,
    diagonal Gaussian guide and conditional prior), trained by any estimator of the registry (the
    analytic KL between the two Gaussians with --estimator analytic), its condition passed to model and
    guide after x (`conditions`). Evaluation: log p(x_m | x_given) by importance sampling with k draws
    ("log_px", so that report pairs runs on it), the conditional ELBO, and with quadrants the baseline's
    exact log-likelihood and the paired differences."""

    name = "cvae"
    conditional = True
    eager = True
    figures = ("completions.png", "class_samples.png")  # by the condition: figure_names

    def check(self, config) -> None:
        check_quadrant_settings(config, self)
        ESTIMATORS.lookup(config.estimator)
        check_kl_weight(config)

    def derive(self, config, data: Dataset) -> dict:
        """With --condition class, the number of classes (one more than the largest label, unless given);
        a condition the data cannot give is an InputError."""
        if config.condition != "class":
            parse_condition(config.condition, data.shape)  # square images with an even side
            return {}
        if data.train_y is None or data.test_y is None:
            raise InputError(f"--condition class needs the class of every image, and dataset {data.name!r} "
                             f"has no labels: use digits, mnist, fashion-mnist, a folder of images in one "
                             "subfolder per class, or an .npz with y_train and y_test; or --condition "
                             "quadrants:N")
        largest = max(int(y.max()) for y in (data.train_y, data.test_y) if y.numel())
        if config.classes is not None and largest >= config.classes:
            raise InputError(f"--classes {config.classes} is too few: the data's labels go up to {largest}")
        return {} if config.classes is not None else {"classes": largest + 1}

    def build(self, config, x_shape: tuple[int, ...]) -> CVAE:
        condition = parse_condition(config.condition, x_shape, config.classes)
        baseline = build_baseline(x_shape, condition, config.hidden) if isinstance(condition, Quadrants) \
            else None
        return CVAE(x_shape, condition, config.hidden, config.z_dim, baseline)

    def start(self, model: CVAE, config, data: Dataset) -> None:
        """--weight-init, then (quadrants) the baseline trained first and frozen (train_baseline)."""
        if config.weight_init == "he":
            he_init(model)
        if model.baseline is not None:
            train_baseline(model.baseline, data, config)

    def conditions(self, model: CVAE, x: Tensor, labels: Tensor | None) -> tuple[Tensor, ...]:
        """c: x with the predicted quadrants at MISSING, or the one-hot labels."""
        return (model.condition.condition(x, labels),)

    def test_metrics(self, program: Program, data: Dataset) -> dict[str, float | None]:
        """The conditional ELBO per test example (one draw of z) and its reconstruction term."""
        c = self.test_conditions(program.owner, data)
        test = elbo_terms(program.model, program.guide, data.test_x, conditions=c)
        return {"test_elbo": float(test["elbo"].mean()), "test_recon": float(test["recon"].mean())}

    def validation_elbo(self, program: Program, data: Dataset) -> Tensor:
        c = self.conditions(program.owner, data.val_x, data.val_y)  # held-out images keep their labels
        return elbo_terms(program.model, program.guide, data.val_x, conditions=c)["elbo"].mean()

    def evaluate(self, program: Program, data: Dataset, k: int, progress: bool = False,
                 elbo_samples: int = 10) -> tuple[dict, dict[str, Tensor]]:
        """Per test example: "log_px", log p(x_m | x_given) ~ log (1/k) sum_j p(x | z_j, c) p(z_j | c) /
        q(z_j | x, c); "elbo" = "recon" - "kl" (closed-form KL, elbo_samples draws); with quadrants
        "baseline_log_px", the baseline's exact log p(x_m | x_given). The summary: their means with
        standard errors and the paired differences log_px - elbo, log_px - baseline, elbo - baseline."""
        cvae, x = program.owner, data.test_x
        c = self.conditions(cvae, x, data.test_y)
        values = elbo_terms(program.model, program.guide, x, elbo_samples, conditions=c)
        values["log_px"] = iwae_log_px(program.model, program.guide, x, k, progress=progress, conditions=c)
        if cvae.baseline is not None:
            with torch.no_grad():
                values["baseline_log_px"] = torch.cat([cvae.baseline.log_likelihood(xs, cs)
                                                       for xs, cs in zip(x.split(2000), c[0].split(2000),
                                                                         strict=True)])
        result: dict = {"condition": cvae.condition.name, "log_px_of": cvae.log_px_of}
        for name, key in (("test_elbo", "elbo"), ("log_px", "log_px"), ("kl", "kl"), ("recon", "recon"),
                          ("baseline_log_px", "baseline_log_px")):
            if key in values:
                result[name], result[f"{name}_se"] = mean_se(values[key])
        for a, b in (("log_px", "elbo"), ("log_px", "baseline_log_px"), ("elbo", "baseline_log_px")):
            if b in values:
                name = f"{'test_elbo' if a == 'elbo' else a}_minus_{'baseline' if b != 'elbo' else 'elbo'}"
                result[name], result[f"{name}_se"] = mean_se(values[a] - values[b])
        result.update(n_examples=int(x.shape[0]), k=k)
        return result, values

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        return (("log_px", f"log p(x|c), k={k}"), ("test_elbo", "conditional ELBO"),
                ("baseline_log_px", "baseline log p(x|c)"), ("log_px_minus_elbo", "paired IS - ELBO"),
                ("log_px_minus_baseline", "paired IS - baseline"),
                ("test_elbo_minus_baseline", "paired ELBO - basel."), ("recon", "E_q log p(x|z,c)"),
                ("kl", "KL(q(z|x,c)||p(z|c))"))

    def evaluation_notes(self, result: dict, config) -> list[str]:
        return [f"log p(x|c) is {result['log_px_of']}, in nats (--condition {result['condition']}); paired: "
                f"differences on the same {result['n_examples']} test examples"]

    def result_line(self, summary: dict) -> str:
        line = (f"test {summary['log_px_of']} {summary['log_px']:.2f} nats (k={summary['k']}), conditional "
                f"ELBO {summary['test_elbo']:.2f} nats")
        if "baseline_log_px" in summary:
            line += f", baseline {summary['baseline_log_px']:.2f} nats"
        return line

    # -- figures -------------------------------------------------------------------------------------

    def figure_names(self, model: CVAE) -> tuple[str, ...]:
        return ("completions.png",) if isinstance(model.condition, Quadrants) else ("class_samples.png",)

    def pictures(self, model: CVAE, data: Dataset, seed: int) -> dict[str, Picture]:
        """With quadrants, completions.png: the given quadrants of the first test images, the truth, the
        baseline's prediction and sampled completions; with a class, class_samples.png: a row of samples
        per class, named by class_names where the dataset has them."""
        if isinstance(model.condition, Quadrants):
            x = data.test_x[:COMPLETION_EXAMPLES]
            tiles, names = completion_images(model, x, model.condition.condition(x), model.baseline,
                                             COMPLETION_SAMPLES, seed)
            return {"completions.png": Picture(
                tiles, f"{model.condition.given} quadrant(s) given (blue: predicted): the baseline's "
                f"prediction and {COMPLETION_SAMPLES} CVAE completions", names)}
        names = class_names_of(data.name, model.condition)
        tiles = rgb(class_sample_images(model, CLASS_SAMPLES, seed))
        return {"class_samples.png": Picture(
            tiles, "samples per class: z ~ p(z | class), mean of p(x | z, class)", None, names)}

    def class_picture(self, model: CVAE, label: int, n: int, seed: int,
                      class_names: list[str] | None) -> Picture:
        """n samples of class `label` in rows of SAMPLE_COLUMNS (the last filled with blanks)."""
        if not isinstance(model.condition, ClassLabel):
            raise InputError(f"--class draws samples of one class, and this run's CVAE is conditioned on "
                             f"--condition {model.condition.name}: use a --condition class run, or drop "
                             "--class")
        n_classes = model.condition.n_classes
        if not 0 <= label < n_classes:
            raise InputError(f"--class {label} is not a class of this run: choose 0..{n_classes - 1}")
        images = rgb(class_sample_images(model, n, seed, [label])[0])
        columns = min(n, SAMPLE_COLUMNS)
        rows = math.ceil(n / columns)
        blank = images.new_ones(rows * columns - n, *images.shape[1:])
        name = class_names[label] if class_names else str(label)
        return Picture(torch.cat([images, blank]).unflatten(0, (rows, columns)),
                       f"class {label} ({name}): z ~ p(z | class), mean of p(x | z, class)")

    def refusal(self, command: str, what: str) -> str | None:
        if command in ("diagnose", "interpolate"):  # encode reads q(z | x, c) with each example's c
            return (f"{what} trained a conditional VAE (--model cvae), whose model and guide take a "
                    f"condition besides x; {command} handles models of x alone: use a vae run "
                    "(`pyro-vae encode` takes cvae runs)")
        return None


def class_names_of(dataset: str, condition: ClassLabel) -> list[str]:
    """The names of the classes (data.CLASS_NAMES) where the dataset has them, else the labels."""
    names = CLASS_NAMES.get(dataset)
    return list(names) if names and len(names) == condition.n_classes else \
        [str(k) for k in range(condition.n_classes)]


CVAE_KIND = MODEL_KINDS.builtin(CVAEKind())
