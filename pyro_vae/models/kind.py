"""A model kind: one object that answers for everything that differs between kinds of model.

No command of pyro-vae (train, evaluate, sample, compare, diagnose, report) knows a kind by name: each
asks the run's kind. A kind says

* which settings it takes (`check`: any other is refused in one line), what it derives from the data
  (`derive`, e.g. the number of classes) and how it shapes the training set (`training_data`);
* how its model is built from the settings (`build`, then `start` on the training data; `prepare` in
  every session of a run);
* its training objective (`objective`) and what changes along training (`schedule`, e.g. M2's
  Gumbel-softmax temperature: values the trainer asks for at each step and passes to model and guide
  as keyword arguments);
* what each epoch's metrics row holds (`test_metrics`, `validation_metrics`), which of its validation
  measures early stopping watches (`early_stop_metric`) and the progress line (`epoch_line`);
* its evaluation (`per_example`, `summarize`, `evaluate`) and how it is printed (`evaluation_rows`,
  `evaluation_notes`, `result_line`);
* its figures (`figures`, `sample_title`) and what compare, diagnose and sample can do with it
  (`comparison`, `refusal`).

The base class is itself a kind: a user's own model/guide pair (PAIR) meeting the Program contract
(program.py), with an ELBO. The other kinds are registered by name with `register_model(name, kind)`
(from Python or from a `--plugin` module) and looked up by `--model NAME` (`model_kind`); `kind_of` is
the kind of a built model (its `model_kind` attribute, else the pair's). A new kind is one module: a
subclass overriding what differs, and one `register_model` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, replace
from typing import Any, NamedTuple

from pyro.infer import ELBO
from torch import Tensor, nn

from ..config import Config
from ..data import Dataset
from ..errors import InputError
from ..inference.discrete import DISCRETE, UNLABELLED, choose_labelled, mask_labels
from ..inference.estimators import ESTIMATORS, make_estimator
from ..inference.program import Program
from ..inference.scores import active_units, elbo_terms, iwae_log_px, labelled_correct
from ..registry import Registry, load_factory
from ..stats import mean_se
from .guides import GUIDES
from .likelihoods import LIKELIHOODS, SIGMA_MODES, make_likelihood
from .nets import ENCODER_SCALES, NETWORKS, WEIGHT_INITS, he_init
from .priors import PRIORS, PSEUDO_INPUTS

# the settings that build pyro-vae's own models; a user's own model/guide pair brings its own networks
MODEL_SETTINGS = ("model", "encoder", "hidden", "z_dim", "prior", "prior_components", "prior_init",
                  "guide", "guide_rank", "flows", "labels", "classes", "discrete", "aux_loss", "temperature",
                  "temperature_final", "exemplar_subset", "exemplar_k", "weight_init", "encoder_scale",
                  "pseudo_inputs", "condition", "aux_loss_scale", "labelled_per_batch")
# the settings of the latent z and the model of x: without them (the classifier) they mean nothing
LATENT_SETTINGS = ("z_dim", "prior", "prior_components", "prior_init", "likelihood", "sigma", "sigma_mode",
                   "beta", "kl_anneal", "eval_k", "exemplar_subset", "exemplar_k")
MIXTURE_PRIORS = ("mog", "vamp")  # the priors that take --prior-components
EXEMPLAR_SETTINGS = ("exemplar_subset", "exemplar_k")  # which exemplars the exemplar prior uses per step
# the settings of a discrete latent (M2's class y) and of its training, with their defaults
DISCRETE_SETTINGS = {"discrete": "enum", "aux_loss": 0.0, "temperature": 1.0, "temperature_final": None,
                     "aux_loss_scale": "fixed", "labelled_per_batch": None}
FIGURES = ("samples.png", "reconstructions.png", "traversal.png", "latent_map.png")  # plots.save_figures


class Picture(NamedTuple):
    """A grid of images a kind makes for one of its figures (plots.save_figures draws it): tiles
    (rows, columns, C, H, W) with values in [0, 1], the title, and the names of the columns and rows."""

    tiles: Tensor
    title: str
    columns: list[str] | None = None
    rows: list[str] | None = None


def changed(config: Any, names: tuple[str, ...] | Mapping[str, Any]) -> list[str]:
    """Those of the settings `names` whose value is not the default (set by a flag, a config file or a
    preset: a default given explicitly is the default); `names` a mapping: not its value."""
    defaults = names if isinstance(names, Mapping) else {
        f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(config)}
    return [name for name in names if getattr(config, name) != defaults[name]]


def flags(names: list[str]) -> str:
    """--a-b, --c for settings a_b, c."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


def discrete_likelihood(config: Any) -> bool:
    """Whether config.likelihood is a probability mass function (False where it cannot be made: the
    kind's check then says why)."""
    try:
        return make_likelihood(config.likelihood, sigma=config.sigma, sigma_mode=config.sigma_mode).discrete
    except InputError:
        return False


class ModelKind:
    """A kind of model, and the base of all: a user's own model/guide pair (the Program contract), whose
    model and guide take the batch x, with an ELBO and pictures. Subclasses override what differs."""

    name = "pair"
    labelled = False  # model and guide take (x, y): the training labels, UNLABELLED where none
    latent = True  # latent sites: their KL weight, active units, validation ELBO, pictures
    bound = True  # an ELBO and log p(x): what early stopping watches and compare and diagnose measure
    auto_cuda_graph = False  # --cuda-graph auto captures its step on one GPU (on: always, unless eager)
    eager = False  # its step cannot be captured: --cuda-graph on is refused
    exemplar_prior = False  # its p(z) may be --prior exemplar (exemplar.py: the training images in memory)
    conditional = False  # model and guide take a condition c after x (--condition; conditions())
    scales = True  # its guide has a spread: encode writes the scales of q(z|x) (not a point mass)
    comparison: str | None = "continuous"  # compare.py's measure of its estimators (None: refused)
    figures: tuple[str, ...] = FIGURES  # train and sample draw these (plots.save_figures)
    sample_title = "samples from the prior"
    early_stop_metric = "validation_elbo"  # the validation measure --early-stop watches (higher is better)

    # -- settings ------------------------------------------------------------------------------------

    def check(self, config: Any) -> None:
        """Raise InputError (one line) for settings this kind does not take. The pair brings its own
        networks: a setting that builds pyro-vae's own models must stay at its default."""
        wrong = changed(config, MODEL_SETTINGS)
        if wrong:
            raise InputError(f"setting(s) {', '.join(wrong)} build pyro-vae's own VAE and do not apply to "
                             "your own model/guide pair: leave them at their defaults")

    def derive(self, config: Any, data: Dataset) -> dict:
        """Settings read off the data, recorded in config.json (the model is rebuilt from them)."""
        return {}

    def training_data(self, config: Any, data: Dataset) -> Dataset:
        """The dataset as this kind trains on it (e.g. the labelled subset)."""
        return data

    # -- the model -----------------------------------------------------------------------------------

    def build(self, config: Any, x_shape: tuple[int, ...]) -> nn.Module:
        """The untrained model that `config` describes, for examples of shape x_shape."""
        raise InputError("a run of your own model/guide pair cannot be rebuilt from its settings: pass the "
                         "pair (train(..., program=pair))")

    def start(self, model: object, config: Any, data: Dataset) -> None:
        """What a fresh run sets before its first step: with --weight-init he, every linear layer's weights
        drawn He-normal (nets.he_init; a pair refuses the setting)."""
        if config.weight_init == "he":
            he_init(model)

    def prepare(self, model: object, config: Any, data: Dataset) -> None:
        """What a run sets on its model from the training data in every session, new or resumed (nothing
        a checkpoint holds): nothing."""

    def conditions(self, model: object, x: Tensor, labels: Tensor | None) -> tuple[Tensor, ...]:
        """What model and guide take after the images x besides a labelled kind's training labels: a
        conditional model's condition c (one row per example, made from x and their labels, None where the
        data have none); () for a model of x alone. Every trace of model and guide passes it (training,
        sites, checks, evaluation, figures)."""
        return ()

    def test_conditions(self, model: object, data: Dataset) -> tuple[Tensor, ...]:
        """`conditions` of data's test images (with their labels): what tracing and checks pass after them."""
        return self.conditions(model, data.test_x, data.test_y)

    # -- training ------------------------------------------------------------------------------------

    def objective(self, config: Any) -> ELBO:
        """The estimator whose differentiable loss is trained: --estimator with --particles."""
        return make_estimator(config.estimator, config.particles)

    def schedule(self, config: Any, step: int, total_steps: int) -> dict[str, float]:
        """Keyword arguments of model and guide at step `step` (from 0) of `total_steps`, also recorded in
        the metrics row (that of the epoch's last step): none."""
        return {}

    def test_metrics(self, program: Program, data: Dataset) -> dict[str, float | None]:
        """The metrics row's test measures: the ELBO per example (one draw of z) and its reconstruction
        term E_q[log p(x|z)]."""
        test = elbo_terms(program.model, program.guide, data.test_x)
        return {"test_elbo": float(test["elbo"].mean()), "test_recon": float(test["recon"].mean())}

    def validation_elbo(self, program: Program, data: Dataset) -> Tensor:
        """The ELBO per example on the validation set data.val_x (one draw of z; unweighted KL), as a
        0-dim tensor: what early stopping watches."""
        return elbo_terms(program.model, program.guide, data.val_x)["elbo"].mean()

    def validation_metrics(self, program: Program, data: Dataset) -> dict[str, Tensor]:
        """The validation measures of the metrics row, as 0-dim tensors: the validation ELBO where the
        kind has a latent (validation_elbo); early stopping watches early_stop_metric among them."""
        return {"validation_elbo": self.validation_elbo(program, data)} if self.latent else {}

    def epoch_line(self, row: dict) -> str:
        """What the progress shows after an epoch."""
        return f"test ELBO {row['test_elbo']:.2f} nats"

    def training_record(self, data: Dataset) -> dict:
        """What summary.json adds about the training data (e.g. the number of labels): nothing."""
        return {}

    # -- evaluation ----------------------------------------------------------------------------------

    def per_example(self, program: Program, x: Tensor, k: int = 5000, elbo_samples: int = 10,
                    progress: bool = False) -> dict[str, Tensor]:
        """Per-example values, shape (N,), nats: "elbo" = "recon" - "kl" (elbo_samples draws) and
        "log_px" (IWAE with k draws)."""
        terms = elbo_terms(program.model, program.guide, x, samples=elbo_samples)
        return {**terms, "log_px": iwae_log_px(program.model, program.guide, x, k, progress=progress)}

    def summarize(self, program: Program, x: Tensor, values: dict[str, Tensor], k: int) -> dict:
        """The means of per_example's values with standard errors sd/sqrt(N), the active units, the
        number of examples and k."""
        result: dict[str, float | int | str | None] = {}
        for name, key in (("test_elbo", "elbo"), ("log_px", "log_px"), ("kl", "kl"), ("recon", "recon")):
            result[name], result[f"{name}_se"] = mean_se(values[key])
        result.update(active_units=active_units(program, x), n_examples=int(x.shape[0]), k=k)
        return result

    def evaluate(self, program: Program, data: Dataset, k: int, progress: bool = False,
                 elbo_samples: int = 10) -> tuple[dict, dict[str, Tensor]]:
        """The evaluation on data.test_x: (summary, per-example values)."""
        values = self.per_example(program, data.test_x, k, elbo_samples, progress)
        return self.summarize(program, data.test_x, values, k), values

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        """(key, label) of the rows `pyro-vae evaluate` prints (each with its standard error)."""
        return (("test_elbo", "test ELBO"), ("log_px", f"log p(x), k={k}"), ("recon", "E_q log p(x|z)"),
                ("kl", "KL(q(z|x) || p(z))"))

    def evaluation_notes(self, result: dict, config: Any) -> list[str]:
        """The lines `pyro-vae evaluate` prints under the table."""
        return [f"active units {result['active_units']} of {config.z_dim}; {result['n_examples']} test "
                "examples"]

    def result_line(self, summary: dict) -> str:
        """What `pyro-vae train` prints of the final evaluation."""
        return (f"test ELBO {summary['test_elbo']:.2f} nats, log p(x) {summary['log_px']:.2f} nats "
                f"(k={summary['k']})")

    # -- figures -------------------------------------------------------------------------------------

    def figure_names(self, model: object) -> tuple[str, ...]:
        """The figures train and sample draw for `model` (plots.save_figures): the kind's `figures`."""
        return self.figures

    def pictures(self, model: object, data: Dataset, seed: int) -> dict[str, Picture]:
        """The figures this kind makes itself, by file name (plots.save_figures draws them): none."""
        return {}

    def class_picture(self, model: object, label: int, n: int, seed: int,
                      class_names: list[str] | None) -> Picture:
        """`pyro-vae sample RUN --class K`: n samples of class `label`; a kind without a class condition
        refuses (an InputError)."""
        raise InputError(f"--class draws samples of one class from a class-conditional model, and --model "
                         f"{self.name} takes no class: train --model cvae --condition class, or drop --class")

    # -- what other commands can do with it ----------------------------------------------------------

    def refusal(self, command: str, what: str) -> str | None:
        """Why `command` ('sample', 'compare', 'compare-config', 'diagnose') cannot take `what` (a run or
        a model of this kind), in one line; None where it can."""
        return None

    def refuse(self, command: str, what: str) -> None:
        """Raise InputError with refusal(command, what), if there is one."""
        reason = self.refusal(command, what)
        if reason is not None:
            raise InputError(reason)


PAIR = ModelKind()


class KindRegistry(Registry):
    """The model kinds by name: a Registry whose entries are ModelKind objects (not factories)."""

    def __init__(self):
        super().__init__("model", {}, ModelKind)

    def builtin(self, kind: ModelKind) -> ModelKind:
        """Register one of pyro-vae's own kinds under kind.name (a built-in name)."""
        self._add(kind.name, kind)
        self.builtins = self.builtins | {kind.name}
        return kind

    def _check_callable(self, name: str, factory: Callable) -> None:
        if not isinstance(factory, ModelKind):
            raise InputError(f"model kind {name!r} must be a pyro_vae.models.ModelKind (an instance of a "
                             f"subclass), not {type(factory).__name__}")

    @staticmethod
    def _origin(kind: object) -> str:
        """'module.qualname' of a kind's class, for messages (a re-registered kind of the same class may
        replace the old one)."""
        return f"{type(kind).__module__}.{type(kind).__qualname__}"


MODEL_KINDS = KindRegistry()


def register_model(name: str, kind: ModelKind) -> ModelKind:
    """Add the model kind `kind` (an instance of a ModelKind subclass) under `name`, so that
    `--model NAME` (or Config(model=NAME)) trains, evaluates, samples, compares and reports it; a name
    taken by another kind is an InputError. Returns the kind."""
    MODEL_KINDS.register(name, kind)
    return kind


def model_kind(name: str | ModelKind) -> ModelKind:
    """The kind registered as `name` (or named "module:attribute"), or `name` itself if it is a kind."""
    if isinstance(name, ModelKind):
        return name
    if name not in MODEL_KINDS and ":" in name:
        kind = load_factory(name)
        MODEL_KINDS._check_callable(name, kind)
        return kind
    return MODEL_KINDS.lookup(name)


def binarization(config: Config) -> str:
    """How the data are binarized: config.binarize, or where that is None (the default) as the
    likelihood asks: 'dynamic' for a probability mass function, else 'none'."""
    if config.binarize is not None:
        return config.binarize
    return "dynamic" if discrete_likelihood(config) else "none"


def check_config(config: Config) -> Config:
    """The config a run uses, checked where a Config becomes a run (train, evaluate, resume, grid, the
    command line): its binarization settled (`binarization`), then its own checks (Config.validate),
    then those of the kind `config.model` names (ModelKind.check); InputError (one line) for what is
    refused. A copy: the caller's Config is left as it was."""
    config = replace(config, binarize=binarization(config))
    config.validate()
    model_kind(config.model).check(config)
    return config


def kind_of(model: object) -> ModelKind:
    """The kind of a built model: its `model_kind` attribute (a kind or a registered name), else that of
    an object offering is_autoencoder=True (the autoencoder's), else the pair's."""
    owner = Program.of(model).owner
    named = getattr(owner, "model_kind", None)
    if named is not None:
        return model_kind(named)
    if getattr(owner, "is_autoencoder", False):
        return MODEL_KINDS["ae"]
    return PAIR


# -- the checks of the built-in kinds, one helper per rule -----------------------------------------------

def check_parts(config: Any) -> None:
    """The settings of the parts (prior, likelihood, estimator, guide, networks): known names, and only
    together with the parts they apply to."""
    for registry, name in ((PRIORS, config.prior), (LIKELIHOODS, config.likelihood),
                           (ESTIMATORS, config.estimator), (GUIDES, config.guide)):
        registry.lookup(name)  # an unknown name, or a MODULE:FACTORY that cannot be loaded, raises
    for name, allowed in (("encoder", tuple(NETWORKS)), ("sigma_mode", SIGMA_MODES), ("discrete", DISCRETE),
                          ("weight_init", WEIGHT_INITS), ("encoder_scale", tuple(ENCODER_SCALES)),
                          ("pseudo_inputs", PSEUDO_INPUTS)):
        if getattr(config, name) not in allowed:
            raise InputError(f"unknown {name} {getattr(config, name)!r}: choose one of {', '.join(allowed)}")
    if binarization(config) != "none" and not discrete_likelihood(config):
        raise InputError(
            f"--binarize {config.binarize} makes binary data, but likelihood {config.likelihood!r} is a "
            "density for continuous values (on 0/1 data it grows without bound); use --binarize none "
            "with it, or --likelihood bernoulli for binary data")
    if (config.sigma_mode != "shared" and config.likelihood in LIKELIHOODS.builtins
            and not config.likelihood.endswith("-learned")):
        raise InputError(f"--sigma-mode {config.sigma_mode} applies to a learned scale; use it with "
                         "--likelihood gaussian-learned or laplace-learned")
    if (config.prior_components is not None and config.prior in PRIORS.builtins
            and config.prior not in MIXTURE_PRIORS):
        raise InputError(f"--prior-components applies to the mixture priors "
                         f"({', '.join(MIXTURE_PRIORS)}), not to --prior {config.prior}")
    if config.prior_init != "noise" and config.prior != "vamp":
        raise InputError(f"--prior-init {config.prior_init} sets the VampPrior's pseudo-inputs; use it "
                         "with --prior vamp")
    if config.pseudo_inputs != "free" and config.prior != "vamp":
        raise InputError(f"--pseudo-inputs {config.pseudo_inputs} clamps the VampPrior's pseudo-inputs; "
                         "use it with --prior vamp")
    check_guide(config)


def check_guide(config: Any) -> None:
    """--flows only with the iaf guide, --guide-rank only with lowrank and below z_dim (a user's own
    guide may take either)."""
    builtin = config.guide in GUIDES.builtins
    if config.flows is not None and builtin and config.guide != "iaf":
        raise InputError(f"--flows sets the number of IAF steps; use it with --guide iaf, not --guide "
                         f"{config.guide}")
    if config.guide_rank is not None and builtin and config.guide != "lowrank":
        raise InputError(f"--guide-rank sets the rank of the lowrank guide; use it with --guide lowrank, "
                         f"not --guide {config.guide}")
    if config.guide == "lowrank" and config.guide_rank is not None and config.guide_rank >= config.z_dim:
        raise InputError(f"--guide-rank must be below --z-dim ({config.z_dim}), got {config.guide_rank}; "
                         "for a full covariance use --guide fullrank")


def check_labels(config: Any, kind: ModelKind) -> None:
    """--labels N with a kind that learns from labels (required), and --labels, --classes with no other."""
    if kind.labelled and config.labels is None:
        raise InputError(f"--model {kind.name} learns from labelled examples: say how many "
                         "with --labels N (balanced over the classes; the rest are unlabelled)")
    if not kind.labelled and (config.labels is not None or config.classes is not None):
        labelled = " or ".join(name for name, other in MODEL_KINDS.items() if other.labelled)
        raise InputError(f"--labels and --classes apply to --model {labelled}, not --model {kind.name}")


def check_no_condition(config: Any, kind: ModelKind) -> None:
    """--condition only with a kind whose model and guide take a condition."""
    if config.condition is not None:
        takers = " or ".join(name for name, other in MODEL_KINDS.items()
                             if other.conditional and name in MODEL_KINDS.builtins)
        raise InputError(f"--condition {config.condition} applies to --model {takers}; --model {kind.name} "
                         "takes no condition: drop --condition")


def check_discrete(config: Any, kind: ModelKind, discrete_latent: bool = False) -> None:
    """The settings of a discrete latent (--discrete, --aux-loss, the temperature) only with a kind that
    has one, and the temperature only with --discrete relaxed."""
    if config.aux_loss < 0:
        raise InputError(f"--aux-loss must be a weight >= 0, got {config.aux_loss}")
    wrong = changed(config, DISCRETE_SETTINGS)
    if wrong and not discrete_latent:
        raise InputError(f"{flags(wrong)} set(s) how M2's discrete latent y is handled or trained, and "
                         f"--model {kind.name} has no discrete latent: use --model m2")
    relaxed_only = changed(config, {k: DISCRETE_SETTINGS[k] for k in ("temperature", "temperature_final")})
    if relaxed_only and config.discrete != "relaxed":
        raise InputError(f"--{relaxed_only[0].replace('_', '-')} is the Gumbel-softmax temperature of "
                         f"--discrete relaxed; --discrete {config.discrete} does not relax y")


def check_exemplar(config: Any, kind: ModelKind) -> None:
    """--exemplar-subset and --exemplar-k with --prior exemplar only; the exemplar prior only with a kind
    that takes it (it is built from the training images of an unlabelled run held in memory: not with
    --workers), and not in a CUDA graph (each step draws its own subset of exemplars)."""
    given = [name for name in EXEMPLAR_SETTINGS if getattr(config, name) is not None]
    if given and config.prior != "exemplar":
        raise InputError(f"--{given[0].replace('_', '-')} sets which exemplars the exemplar prior uses "
                         f"per step; use it with --prior exemplar, not --prior {config.prior}")
    if config.prior != "exemplar":
        return
    if not kind.exemplar_prior or config.workers:
        what = f"--workers {config.workers}" if config.workers else f"--model {kind.name}"
        takers = " or ".join(name for name, other in MODEL_KINDS.items()
                             if other.exemplar_prior and name in MODEL_KINDS.builtins)
        raise InputError(f"--prior exemplar builds its prior from the training images held in memory "
                         f"and works with --model {takers} and --workers 0; {what} cannot use it")
    if config.cuda_graph == "on":
        raise InputError("--prior exemplar draws a new subset of exemplars at every step, which a CUDA "
                         "graph would freeze: leave --cuda-graph at auto or off")


def check_encoder_scale(config: Any, kind: ModelKind) -> None:
    """--encoder-scale only with a kind whose encoder is the VAE's (nets.py): another kind's networks
    would silently not take it."""
    if config.encoder_scale != "softplus":
        raise InputError(f"--encoder-scale {config.encoder_scale} applies to the VAE's encoder; --model "
                         f"{kind.name} keeps its own: leave --encoder-scale at softplus")


def check_kl_weight(config: Any) -> None:
    """--beta and --kl-anneal weight an ELBO's KL term, which the importance-weighted bound has not."""
    if (config.beta != 1.0 or config.kl_anneal) and config.estimator.startswith("iwae"):
        raise InputError(f"--beta and --kl-anneal weight the KL term of an ELBO; the importance-"
                         f"weighted bound ({config.estimator}) has no separate KL term; use --estimator "
                         "mc, analytic or stl")


def refuse_at_defaults(config: Any, defaults: Mapping[str, Any], message: Callable[[list[str]], str]) -> None:
    """InputError(message(names)) if any setting of `defaults` differs from the value given there."""
    wrong = changed(config, defaults)
    if wrong:
        raise InputError(message(wrong))


# -- what the kinds that learn from labels share -----------------------------------------------------

class LabelledKind(ModelKind):
    """A kind trained on a labelled subset: --labels N examples balanced over the classes; model and
    guide take (x, y); accuracy on the test labels is part of its metrics and evaluation, and accuracy on
    the validation labels is what early stopping watches (as Kingma et al.'s and Pyro's M2 select)."""

    labelled = True
    eager = True
    early_stop_metric = "validation_accuracy"
    # settings that do not apply to a labelled kind, at their defaults
    refused = {"estimator": "mc", "particles": 1, "guide": "diagonal", "workers": 0}

    def check_labelled(self, config: Any) -> None:
        """The VAE's estimator, guide, encoder scale and streamed data, and a condition, do not apply."""
        check_encoder_scale(config, self)
        check_no_condition(config, self)
        refuse_at_defaults(config, self.refused, lambda wrong: (
            f"{', '.join('--' + k for k in wrong)} do(es) not apply to --model {self.name} (--discrete "
            "chooses M2's estimator; labels are read with the images in memory): leave them at their "
            "defaults"))

    def derive(self, config: Any, data: Dataset) -> dict:
        """The number of classes, if not given: one more than the largest label."""
        if config.classes is not None:
            return {}
        return {"classes": int(max(int(y.max()) for y in (data.train_y, data.test_y)
                                   if y is not None and y.numel())) + 1}

    def training_data(self, config: Any, data: Dataset) -> Dataset:
        """The training set with config.labels examples labelled (discrete.choose_labelled, seeded with
        config.seed, from the training set only); label_rest says what becomes of the others."""
        if data.train_y is None or data.test_y is None:
            raise InputError(f"--model {self.name} needs class labels, and dataset {data.name!r} has none "
                             f"(for {'training' if data.train_y is None else 'testing'}); use digits, mnist, "
                             "fashion-mnist, a folder of images in one subfolder per class, or an .npz with "
                             "y_train and y_test")
        return self.label_rest(data, choose_labelled(data.train_y, config.labels, config.seed))

    def label_rest(self, data: Dataset, labelled: Tensor) -> Dataset:
        """Every other label replaced by UNLABELLED (M2 learns from the unlabelled examples too)."""
        return Dataset(data.name, data.train_x, data.test_x, mask_labels(data.train_y, labelled),
                       data.test_y, data.val_x, data.val_y)

    def training_record(self, data: Dataset) -> dict:
        """The number of labelled training examples."""
        return {"labels": int((data.train_y != UNLABELLED).sum())}

    def accuracy(self, program: Program, data: Dataset) -> dict[str, Tensor]:
        """"correct" per test example (1.0 where the most likely class is the label), if there are labels."""
        if data.test_y is None:
            return {}
        return {"correct": labelled_correct(program.owner, data.test_x, data.test_y)}

    def test_metrics(self, program: Program, data: Dataset) -> dict[str, float | None]:
        return {**super().test_metrics(program, data),
                "test_accuracy": mean_se(self.accuracy(program, data)["correct"])[0]}

    def validation_metrics(self, program: Program, data: Dataset) -> dict[str, Tensor]:
        """Besides the validation ELBO (where there is a latent), the accuracy of the most likely class on
        the validation images' labels, where they have them (validation_accuracy, a fraction)."""
        measures = super().validation_metrics(program, data)
        if data.val_y is not None:
            measures["validation_accuracy"] = labelled_correct(program.owner, data.val_x, data.val_y).mean()
        return measures

    def evaluate(self, program: Program, data: Dataset, k: int, progress: bool = False,
                 elbo_samples: int = 10) -> tuple[dict, dict[str, Tensor]]:
        result, values = super().evaluate(program, data, k, progress, elbo_samples)
        values.update(self.accuracy(program, data))
        if "correct" in values:
            result["test_accuracy"], result["test_accuracy_se"] = mean_se(values["correct"])
        return result, values

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        return (("test_accuracy", "test accuracy"), *super().evaluation_rows(k))

    def result_line(self, summary: dict) -> str:
        accuracy = f"test accuracy {summary['test_accuracy']:.4f} ± {summary['test_accuracy_se']:.4f}"
        return ", ".join([accuracy, super().result_line(summary)])

