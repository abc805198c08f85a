"""Every setting of a run as plain data: one dataclass, read from YAML/JSON and flags, checked once.

The resolved config is what RUN/config.json records, and it is enough to rebuild the model.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .data import BINARIZE_MODES
from .device import DEVICES
from .errors import InputError
from .estimators import ESTIMATORS
from .guides import GUIDES
from .likelihoods import LIKELIHOODS, SIGMA_MODES, make_likelihood
from .m2 import DISCRETE
from .model import MODELS as VAE_MODELS
from .models.hvae import HVAE_MODELS
from .nets import ENCODER_SCALES, NETWORKS, WEIGHT_INITS
from .optim import OPTIMIZERS
from .priors import PRIORS, PSEUDO_INPUTS
from .registry import load_plugins

LABELLED_MODELS = ("m2", "classifier")  # semi-supervised M2 and its classifier-only baseline (m2.py)
MODELS = VAE_MODELS + LABELLED_MODELS + HVAE_MODELS
PRIOR_INITS = ("noise", "data", "authors")
HELDOUT_MODES = ("seeded", "authors")  # --heldout: how validation and test are held out and binarized
EARLY_STOP_RULES = ("plain", "authors")  # --early-stop-rule: how the patience counts
MIXTURE_PRIORS = ("mog", "vamp")  # the priors that take --prior-components
CUDA_GRAPH_MODES = ("auto", "off", "on")
# the settings of the latent z and the model of x: without them (--model classifier) they mean nothing
LATENT_SETTINGS = ("z_dim", "prior", "prior_components", "prior_init", "likelihood", "sigma", "sigma_mode",
                   "beta", "kl_anneal", "eval_k", "exemplar_subset", "exemplar_k")
# settings that may change when a run is resumed: they do not change the model or the data
RESUMABLE = {"epochs", "time_budget", "device", "lr", "clip_grad", "checkpoint_every", "eval_k", "data_dir",
             "workers", "cuda_graph", "plugins", "threads"}
# settings added since runs were first written, each with the value under which an older run ran: a
# config.json without one reads as that value (a missing setting not listed here is refused)
ADDED_SETTINGS = {"time_budget": None, "exemplar_subset": None, "exemplar_k": None, "weight_init": "default",
                  "optimizer": "adam", "heldout": "seeded", "early_stop_rule": "plain",
                  "encoder_scale": "softplus", "pseudo_inputs": "free"}
# the settings that build pyro-vae's own VAE; a user's own model/guide pair brings its own networks
MODEL_SETTINGS = ("model", "encoder", "hidden", "z_dim", "prior", "prior_components", "prior_init",
                  "guide", "guide_rank", "flows", "labels", "classes", "discrete", "aux_loss", "temperature",
                  "temperature_final", "exemplar_subset", "exemplar_k", "weight_init", "encoder_scale",
                  "pseudo_inputs")


@dataclass
class Config:
    """All settings of a training run (the CLI flags are these names with - for _; `plugins` is
    --plugin MODULE, repeated)."""

    dataset: str = "digits"
    data_dir: str = "data"
    image_size: int | None = None
    channels: int = 1
    train_size: int | None = None
    test_size: int | None = None
    validation_size: int | None = None  # held out of the training set (seeded split), scored each epoch
    binarize: str | None = None  # None: 'dynamic' for a discrete likelihood, else 'none'
    model: str = "vae"
    encoder: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [400])
    z_dim: int = 20
    prior: str = "normal"
    prior_components: int | None = None
    prior_init: str = "noise"
    exemplar_subset: int | None = None  # --prior exemplar: exemplars per training step (None: all)
    exemplar_k: int | None = None  # --prior exemplar: keep each example's k nearest of them (retrieval)
    guide: str = "diagonal"
    guide_rank: int | None = None
    flows: int | None = None
    likelihood: str = "bernoulli"
    sigma: float = 0.1
    sigma_mode: str = "shared"
    estimator: str = "mc"
    particles: int = 1
    beta: float = 1.0
    kl_anneal: int = 0
    epochs: int = 30
    early_stop: int | None = None  # patience: stop after this many epochs without a better validation ELBO
    time_budget: float | None = None  # wall-time minutes, all sessions: stop at the first epoch end past it
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    eval_k: int = 100
    checkpoint_every: float = 10.0
    clip_grad: float | None = None
    workers: int = 0
    cuda_graph: str = "auto"
    threads: int = 1  # torch threads the CLI gives a run (docs/usage.md: one is fastest on a shared CPU)
    plugins: list[str] = field(default_factory=list)  # modules that register priors, likelihoods, estimators
    labels: int | None = None  # --model m2/classifier: labelled training examples, balanced over classes
    classes: int | None = None  # --model m2/classifier: the number of classes (None: those of the data)
    discrete: str = "enum"  # --model m2: how the sum over the class y is estimated (discrete.py)
    aux_loss: float = 0.0  # --model m2: alpha, weight of the classifier's log-likelihood of the labels
    temperature: float = 1.0  # --discrete relaxed: the Gumbel-softmax temperature at the first step
    temperature_final: float | None = None  # --discrete relaxed: annealed geometrically to this by the end
    # the VampPrior authors' protocol, each difference an option (presets.py: the -authors presets)
    weight_init: str = "default"  # he: every linear layer's weights ~ N(0, 2/fan_in) (nets.he_init)
    optimizer: str = "adam"  # adam-normgrad: each tensor's gradient divided by its norm first (optim.py)
    heldout: str = "seeded"  # authors: validation = the last N training images, NumPy seed 777 binarizes
    early_stop_rule: str = "plain"  # authors: the patience count is reset during the KL warm-up
    encoder_scale: str = "softplus"  # clamped-logvar: sigma = exp(hardtanh(raw, -6, 2) / 2)
    pseudo_inputs: str = "free"  # hardtanh: the VampPrior's pseudo-inputs pass through Hardtanh(0, 1)

    def __post_init__(self) -> None:
        if self.binarize is None:
            self.binarize = "dynamic" if self._discrete() else "none"

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A checked Config from a mapping of setting names to values (unknown keys refused): the edge
        where settings from outside Python (a config file, flags, a run's config.json) come in, so it
        first imports the plugin modules they name, which may register the names the settings use.
        Constructing a Config directly imports nothing: in Python, import your plugin yourself."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}"
            )
        hints = typing.get_type_hints(cls)
        checked = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
        load_plugins(checked.get("plugins", []))
        config = cls(**checked)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise InputError for values outside their allowed set or range."""
        choices = {
            "binarize": BINARIZE_MODES, "encoder": tuple(NETWORKS), "sigma_mode": SIGMA_MODES,
            "device": DEVICES, "model": MODELS, "prior_init": PRIOR_INITS, "cuda_graph": CUDA_GRAPH_MODES,
            "discrete": DISCRETE, "weight_init": WEIGHT_INITS, "optimizer": OPTIMIZERS,
            "heldout": HELDOUT_MODES, "early_stop_rule": EARLY_STOP_RULES,
            "encoder_scale": tuple(ENCODER_SCALES), "pseudo_inputs": PSEUDO_INPUTS,
        }
        for registry, name in ((PRIORS, self.prior), (LIKELIHOODS, self.likelihood),
                               (ESTIMATORS, self.estimator), (GUIDES, self.guide)):
            registry.lookup(name)  # an unknown name, or a MODULE:FACTORY that cannot be loaded, raises
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        for name in ("z_dim", "particles", "epochs", "batch_size", "eval_k", "channels", "threads",
                     "image_size", "train_size", "test_size", "prior_components", "validation_size",
                     "early_stop", "guide_rank", "flows", "labels", "classes", "exemplar_subset",
                     "exemplar_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not self.hidden or min(self.hidden) < 1:
            raise InputError(f"--hidden needs one or more positive layer sizes, got {self.hidden}")
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise InputError(f"--time-budget must be a positive number of minutes, got {self.time_budget}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise InputError(f"--clip-grad must be a positive gradient norm, got {self.clip_grad}")
        if not self.checkpoint_every >= 0:
            raise InputError(f"--checkpoint-every must be >= 0 minutes (0: only at epoch ends), "
                             f"got {self.checkpoint_every}")
        for name in ("lr", "sigma", "beta", "temperature", "temperature_final"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise InputError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if self.kl_anneal < 0:
            raise InputError(f"--kl-anneal must be a number of epochs >= 0, got {self.kl_anneal}")
        if self.workers < 0:
            raise InputError(f"--workers must be a number of processes >= 0, got {self.workers}")
        if self.cuda_graph == "on" and self.device == "cpu":
            raise InputError("--cuda-graph on captures the step for a CUDA GPU; use it with --device cuda "
                             "(or auto on a machine with a GPU), or leave it off")
        self._validate_combination()

    def _validate_combination(self) -> None:
        """Raise InputError for settings that are valid alone but make no sense together."""
        if self.model == "classifier":
            given = self._changed(LATENT_SETTINGS)
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise InputError(f"--model classifier learns q(y|x) alone and has no latent z, no prior, no "
                                 f"likelihood of x and no ELBO, so {flags} cannot apply; drop "
                                 f"{'it' if len(given) == 1 else 'them'} or use --model m2")
        if self.binarize != "none" and not self._discrete():
            raise InputError(
                f"--binarize {self.binarize} makes binary data, but likelihood {self.likelihood!r} is a "
                "density for continuous values (on 0/1 data it grows without bound); use --binarize none "
                "with it, or --likelihood bernoulli for binary data")
        if (self.sigma_mode != "shared" and self.likelihood in LIKELIHOODS.builtins
                and not self.likelihood.endswith("-learned")):
            raise InputError(f"--sigma-mode {self.sigma_mode} applies to a learned scale; use it with "
                             "--likelihood gaussian-learned or laplace-learned")
        if (self.prior_components is not None and self.prior in PRIORS.builtins
                and self.prior not in MIXTURE_PRIORS):
            raise InputError(f"--prior-components applies to the mixture priors "
                             f"({', '.join(MIXTURE_PRIORS)}), not to --prior {self.prior}")
        if self.prior_init != "noise" and self.prior != "vamp":
            raise InputError(f"--prior-init {self.prior_init} sets the VampPrior's pseudo-inputs; use it "
                             "with --prior vamp")
        if self.pseudo_inputs != "free" and self.prior != "vamp":
            raise InputError(f"--pseudo-inputs {self.pseudo_inputs} clamps the VampPrior's pseudo-inputs; "
                             "use it with --prior vamp")
        if self.encoder_scale != "softplus" and self.model not in VAE_MODELS:
            raise InputError(f"--encoder-scale {self.encoder_scale} applies to the VAE's encoder; --model "
                             f"{self.model} keeps its own: leave --encoder-scale at softplus")
        self._validate_exemplar()
        self._validate_protocol()
        self._validate_guide()
        self._validate_hvae()
        self._validate_labelled()
        if self.model == "ae":
            vae_only = {"guide": "diagonal", "prior": "normal", "estimator": "mc", "particles": 1,
                        "beta": 1.0, "kl_anneal": 0}
            changed = [k for k, v in vae_only.items() if getattr(self, k) != v]
            if changed:
                raise InputError(
                    f"--model ae is a deterministic autoencoder: it has no prior, no KL and no ELBO, so "
                    f"{', '.join('--' + k.replace('_', '-') for k in changed)} cannot apply; drop "
                    f"{'it' if len(changed) == 1 else 'them'} or use --model vae")
        if (self.beta != 1.0 or self.kl_anneal) and self.estimator.startswith("iwae"):
            raise InputError(f"--beta and --kl-anneal weight the KL term of an ELBO; the importance-"
                             f"weighted bound ({self.estimator}) has no separate KL term; use --estimator "
                             "mc, analytic or stl")

    def _validate_hvae(self) -> None:
        """--model hvae (models/hvae.py): its two guides are diagonal Gaussians from its own networks."""
        if self.model in HVAE_MODELS and self.guide != "diagonal":
            raise InputError(f"--guide {self.guide} is a family for --model vae's single latent; "
                             "--model hvae has its own guide q(z2|x) q(z1|x, z2) (diagonal Gaussians): "
                             "drop --guide")

    def _validate_protocol(self) -> None:
        """Raise InputError for a validation split or early stopping that cannot work."""
        if self.validation_size is not None and self.train_size is not None \
                and self.validation_size >= self.train_size:
            raise InputError(f"--validation-size {self.validation_size} holds out that many of the "
                             f"--train-size {self.train_size} training examples and leaves none to train on; "
                             "make it smaller than the training set")
        if self.early_stop is not None and self.validation_size is None:
            raise InputError(f"--early-stop {self.early_stop} stops on the validation ELBO; hold out a "
                             "validation set with --validation-size N too")
        if self.heldout == "authors" and self.validation_size is None:
            raise InputError("--heldout authors binarizes the validation set, then the test set, as the "
                             "authors' code does; hold out a validation set with --validation-size N too")
        if self.early_stop_rule != "plain" and self.early_stop is None:
            raise InputError(f"--early-stop-rule {self.early_stop_rule} says how early stopping counts its "
                             "patience; use it with --early-stop PATIENCE")
        if self.early_stop is not None and self.model == "ae":
            raise InputError("--early-stop watches the validation ELBO, and --model ae has no ELBO; "
                             "use it with --model vae")

    def _validate_labelled(self) -> None:
        """The settings of the semi-supervised models: --labels with them only, --discrete, --aux-loss
        and the temperature with M2 only (the only model with a discrete latent), and none of the VAE's
        continuous-ELBO settings."""
        labelled = self.model in LABELLED_MODELS
        if labelled and self.labels is None:
            raise InputError(f"--model {self.model} learns from labelled examples: say how many "
                             "with --labels N (balanced over the classes; the rest are unlabelled)")
        if not labelled and (self.labels is not None or self.classes is not None):
            raise InputError("--labels and --classes apply to --model m2 or classifier, not "
                             f"--model {self.model}")
        if self.aux_loss < 0:
            raise InputError(f"--aux-loss must be a weight >= 0, got {self.aux_loss}")
        m2_only = {"discrete": "enum", "aux_loss": 0.0, "temperature": 1.0, "temperature_final": None}
        changed = [k for k, v in m2_only.items() if getattr(self, k) != v]
        if changed and self.model != "m2":
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise InputError(f"{flags} set(s) how M2's discrete "
                             f"latent y is handled, and --model {self.model} has no discrete latent: use "
                             "--model m2")
        relaxed_only = [k for k in ("temperature", "temperature_final") if getattr(self, k) != m2_only[k]]
        if relaxed_only and self.discrete != "relaxed":
            raise InputError(f"--{relaxed_only[0].replace('_', '-')} is the Gumbel-softmax temperature of "
                             f"--discrete relaxed; --discrete {self.discrete} does not relax y")
        if labelled:
            vae_only = {"estimator": "mc", "particles": 1, "guide": "diagonal", "workers": 0}
            wrong = [k for k, v in vae_only.items() if getattr(self, k) != v]
            if wrong:
                flags = ", ".join("--" + k for k in wrong)
                raise InputError(f"{flags} do(es) not apply to --model {self.model} "
                                 "(--discrete chooses M2's estimator; labels are read with the images in "
                                 "memory): leave them at their defaults")
        if self.model == "classifier" and self.early_stop is not None:
            raise InputError("--early-stop watches the validation ELBO, and --model classifier has none; "
                             "drop --early-stop")

    def _validate_exemplar(self) -> None:
        """--exemplar-subset with --prior exemplar only; the exemplar prior with --model vae or hvae (on
        z2) only (it needs the training images of an unlabelled run in memory), and not in a CUDA graph
        (each step draws its own subset of exemplars)."""
        given = [k for k in ("exemplar_subset", "exemplar_k") if getattr(self, k) is not None]
        if given and self.prior != "exemplar":
            raise InputError(f"--{given[0].replace('_', '-')} sets which exemplars the exemplar prior uses "
                             f"per step; use it with --prior exemplar, not --prior {self.prior}")
        if self.prior != "exemplar":
            return
        if self.model not in ("vae", *HVAE_MODELS) or self.workers:
            what = f"--workers {self.workers}" if self.workers else f"--model {self.model}"
            raise InputError(f"--prior exemplar builds its prior from the training images held in memory "
                             f"and works with --model vae or hvae and --workers 0; {what} cannot use it")
        if self.cuda_graph == "on":
            raise InputError("--prior exemplar draws a new subset of exemplars at every step, which a CUDA "
                             "graph would freeze: leave --cuda-graph at auto or off")

    def _validate_guide(self) -> None:
        """--flows only with the iaf guide, --guide-rank only with lowrank and below z_dim (a user's
        own guide may take either)."""
        builtin = self.guide in GUIDES.builtins
        if self.flows is not None and builtin and self.guide != "iaf":
            raise InputError(f"--flows sets the number of IAF steps; use it with --guide iaf, not --guide "
                             f"{self.guide}")
        if self.guide_rank is not None and builtin and self.guide != "lowrank":
            raise InputError(f"--guide-rank sets the rank of the lowrank guide; use it with --guide lowrank, "
                             f"not --guide {self.guide}")
        if self.guide == "lowrank" and self.guide_rank is not None and self.guide_rank >= self.z_dim:
            raise InputError(f"--guide-rank must be below --z-dim ({self.z_dim}), got {self.guide_rank}; "
                             "for a full covariance use --guide fullrank")

    def _changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of the settings `names` whose value is not the default: set by a flag, a config file
        or a preset (a default given explicitly is the default)."""
        defaults = {f.name: f.default for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def _discrete(self) -> bool:
        """Whether the likelihood is a probability mass function (False where it cannot be made:
        validate() then says why)."""
        try:
            return make_likelihood(self.likelihood, sigma=self.sigma, sigma_mode=self.sigma_mode).discrete
        except InputError:
            return False

    def check_for_pair(self) -> None:
        """Raise InputError if a setting that builds pyro-vae's own VAE differs from its default: with a
        user's own model/guide pair it would silently not apply."""
        changed = [k for k in MODEL_SETTINGS if getattr(self, k) != getattr(Config(), k)]
        if changed:
            raise InputError(f"setting(s) {', '.join(changed)} build pyro-vae's own VAE and do not apply to "
                             "your own model/guide pair: leave them at their defaults")

    def to_dict(self) -> dict:
        return asdict(self)


def load_config_file(path: str | Path) -> dict:
    """Settings from a YAML or JSON file (a mapping of setting names to values)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise InputError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _coerce(name: str, value, hint) -> object:
    """Check `value` against the type hint of setting `name`; ints are accepted where floats are."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise InputError(f"setting {name!r} needs a value, got null")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in items):
            raise InputError(f"setting {name!r} needs a list of {item.__name__} values, got {value!r}")
        return list(items)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise InputError(
            f"setting {name!r} needs a value of type {base.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value
