"""Every setting of a run as plain data: one dataclass, read from YAML/JSON and flags, checked once.

The resolved config is what RUN/config.json records, and it is enough to rebuild the model. Config is
plain data and knows no model (it imports nothing from models/): `validate` checks the values that mean
the same for every kind. Where a Config becomes a run (train, evaluate, resume, grid, the command
line), models/kind.py's `check_config` fills in what depends on the registered parts (the binarization
a likelihood asks for) and asks the kind that `model` names to check the rest, so a new kind brings its
own rules.
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
from .optim import OPTIMIZERS
from .registry import load_plugins

__all__ = ["ADDED_SETTINGS", "RESUMABLE", "Config", "load_config_file"]
PRIOR_INITS = ("noise", "data", "authors")
HELDOUT_MODES = ("seeded", "authors")  # --heldout: how validation and test are held out and binarized
EARLY_STOP_RULES = ("plain", "authors")  # --early-stop-rule: how the patience counts
CUDA_GRAPH_MODES = ("auto", "off", "on")
AUX_LOSS_SCALES = ("fixed", "data")  # --aux-loss-scale: M2's alpha as given, or alpha * N / N_labelled
# settings that may change when a run is resumed: they do not change the model or the data
RESUMABLE = {"epochs", "time_budget", "device", "lr", "clip_grad", "checkpoint_every", "eval_k", "data_dir",
             "workers", "cuda_graph", "plugins", "threads"}
# settings added since runs were first written, each with the value under which an older run ran: a
# config.json without one reads as that value (a missing setting not listed here is refused)
ADDED_SETTINGS = {"time_budget": None, "exemplar_subset": None, "exemplar_k": None, "weight_init": "default",
                  "optimizer": "adam", "heldout": "seeded", "early_stop_rule": "plain",
                  "encoder_scale": "softplus", "pseudo_inputs": "free", "condition": None,
                  "aux_loss_scale": "fixed", "labelled_per_batch": None}


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
    binarize: str | None = None  # None: the likelihood's, 'dynamic' if discrete, else 'none' (check_config)
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
    aux_loss_scale: str = "fixed"  # --model m2: data: the weight is alpha * N / N_labelled (Kingma et al.)
    labelled_per_batch: int | None = None  # --model m2: M labelled examples in every batch (None: uniform)
    temperature: float = 1.0  # --discrete relaxed: the Gumbel-softmax temperature at the first step
    temperature_final: float | None = None  # --discrete relaxed: annealed geometrically to this by the end
    # the VampPrior authors' protocol, each difference an option (presets.py: the -authors presets)
    weight_init: str = "default"  # he: every linear layer's weights ~ N(0, 2/fan_in) (nets.he_init)
    optimizer: str = "adam"  # adam-normgrad: each tensor's gradient divided by its norm first (optim.py)
    heldout: str = "seeded"  # authors: validation = the last N training images, NumPy seed 777 binarizes
    early_stop_rule: str = "plain"  # authors: the patience count is reset during the KL warm-up
    encoder_scale: str = "softplus"  # clamped-logvar: sigma = exp(hardtanh(raw, -6, 2) / 2)
    pseudo_inputs: str = "free"  # hardtanh: the VampPrior's pseudo-inputs pass through Hardtanh(0, 1)
    condition: str | None = None  # --model cvae, nn-baseline: quadrants:N (N given) or class (conditions.py)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A Config from a mapping of setting names to values (unknown keys refused), checked by
        `validate` (the kind's own rules are checked where it becomes a run: check_config): the edge
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
        """Raise InputError for values outside their allowed set or range, whatever the model kind (what
        the kind `model` names does not take is refused by models/kind.py's check_config, at the run)."""
        choices = {"binarize": BINARIZE_MODES, "device": DEVICES, "prior_init": PRIOR_INITS,
                   "cuda_graph": CUDA_GRAPH_MODES, "optimizer": OPTIMIZERS, "heldout": HELDOUT_MODES,
                   "early_stop_rule": EARLY_STOP_RULES, "aux_loss_scale": AUX_LOSS_SCALES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed and not (name == "binarize" and self.binarize is None):
                raise InputError(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        for name in ("z_dim", "particles", "epochs", "batch_size", "eval_k", "channels", "threads",
                     "image_size", "train_size", "test_size", "prior_components", "validation_size",
                     "early_stop", "guide_rank", "flows", "labels", "classes", "exemplar_subset",
                     "exemplar_k", "labelled_per_batch"):
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
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        """Raise InputError for a validation split or early stopping that cannot work."""
        if self.validation_size is not None and self.train_size is not None \
                and self.validation_size >= self.train_size:
            raise InputError(f"--validation-size {self.validation_size} holds out that many of the "
                             f"--train-size {self.train_size} training examples and leaves none to train on; "
                             "make it smaller than the training set")
        if self.early_stop is not None and self.validation_size is None:
            raise InputError(f"--early-stop {self.early_stop} stops on a validation measure (the ELBO; the "
                             "accuracy for --model m2 and classifier); hold out a validation set with "
                             "--validation-size N too")
        if self.heldout == "authors" and self.validation_size is None:
            raise InputError("--heldout authors binarizes the validation set, then the test set, as the "
                             "authors' code does; hold out a validation set with --validation-size N too")
        if self.early_stop_rule != "plain" and self.early_stop is None:
            raise InputError(f"--early-stop-rule {self.early_stop_rule} says how early stopping counts its "
                             "patience; use it with --early-stop PATIENCE")

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
