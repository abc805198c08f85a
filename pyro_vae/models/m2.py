"""The semi-supervised M2 model (Kingma et al. 2014) as a Pyro program, the classifier baseline's
program (its kind: models/classifier.py), and M2's model kind ("m2").

Model p(y) p(z) p(x|y,z): y ~ Categorical(1/C) the class, z ~ the prior, x ~ likelihood(decoder(z, y)).
Guide q(y|x) q(z|x,y): q(y|x) = Categorical(classifier(x)), q(z|x,y) = N(encoder(x, y)).

Labels come as a LongTensor y of shape (N,) holding UNLABELLED (-1) where an example has no label.
One program serves both kinds of example, by masking (as `pyro.sample(..., obs_mask=...)` does): in
the model the site "y_label" observes the label where there is one (mask: labelled), and the latent
site "y" is sampled where there is none (mask: unlabelled); the guide samples "y" from q(y|x) under
the same mask, and q(z|x,y) and p(x|y,z) see the label or the sampled class. Without labels (y=None,
e.g. the test set) every example is unlabelled and "y" has no mask. The ELBO is then
L(x, y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)] for a labelled example and
U(x) = E_q(y|x)[L(x, y)] + H(q(y|x)) for an unlabelled one.

How the sum over y is estimated is `discrete` (discrete.py): 'enum' sums it exactly (parallel
enumeration, TraceEnum_ELBO), 'score' samples y and uses the score-function gradient with a learned
baseline b(x) (TraceGraph_ELBO's nn_baseline), 'relaxed' samples a relaxed one-hot y from the
Gumbel-softmax (Concrete) distribution at temperature `temperature` (model and guide also take it as a
keyword argument: the kind's schedule anneals it), reparameterized, in the model
and the guide alike (GumbelSoftmax: its log_prob is the categorical one of the soft draw, so 'relaxed'
trains on a surrogate, not a bound: discrete.py). The relaxation is a training device: in eval mode y is
categorical whatever `discrete` is, so every M2 is evaluated as the same discrete model.

With aux_loss = alpha > 0 the model also scores the labels under the classifier, alpha * log q(y|x) on
labelled examples (Kingma et al.'s J^alpha), as the masked, scaled observed site "y_aux". With
--aux-loss-scale data the run sets that weight to alpha * N / N_labelled (N training examples, aux_weight):
Kingma et al.'s code, whose J^alpha adds alpha * N * E_labelled[log q(y|x)] with alpha = 0.1, i.e. a
weight of 0.1 * N / N_labelled on each labelled example's log q(y|x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.nn import functional as F

from ..data import Dataset
from ..errors import InputError
from ..inference.discrete import DISCRETE, UNLABELLED, make_discrete_estimator, temperature
from ..param_store import RegisteringModule
from .kind import (
    FIGURES,
    MODEL_KINDS,
    LabelledKind,
    check_discrete,
    check_exemplar,
    check_kl_weight,
    check_labels,
    check_parts,
)
from .likelihoods import Likelihood, make_likelihood
from .nets import _gaussian_params, _mlp
from .priors import make_prior

M2_ENCODERS = ("mlp", "gated-mlp")


class GumbelSoftmax(dist.RelaxedOneHotCategorical):
    """The Concrete (Gumbel-softmax) relaxation of Categorical(logits) at temperature tau: draws
    y = softmax((log pi + g) / tau), g ~ Gumbel(0, 1), reparameterized. Its log_prob is the categorical
    log-mass of the soft draw, sum_k y_k log pi_k, which tends to log pi_y as tau -> 0 (the Concrete
    density itself does not give the categorical KL back as tau falls, and overflows float32 there), so
    that E[log p(y) - log q(y)] tends to -KL(q(y|x) || p(y)) and the surrogate to M2's ELBO. For tau > 0
    it is no density of the soft y: the ELBO it enters is a surrogate, a bound on no model."""

    def log_prob(self, value: Tensor) -> Tensor:
        return (value * self.logits).sum(-1)


def _join(a: Tensor, b: Tensor) -> Tensor:
    """a (..., m) and b (..., n) concatenated to (..., m + n), their leading dimensions broadcast
    (enumerated classes and particles add leading dimensions to one of them)."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], dim=-1)


class ClassEncoder(nn.Module):
    """(x, one-hot y) -> MLP(hidden) -> (loc, scale) of q(z|x,y)."""

    def __init__(self, x_shape: Sequence[int], n_classes: int, hidden: Sequence[int], z_dim: int,
                 gated: bool = False):
        super().__init__()
        self.net = _mlp([math.prod(x_shape) + n_classes, *hidden, 2 * z_dim], gated)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return _gaussian_params(self.net(_join(x.flatten(-3), y)))


class ClassDecoder(nn.Module):
    """(z, one-hot y) -> MLP(reversed hidden) -> raw likelihood parameters shaped `out_shape`."""

    def __init__(self, z_dim: int, n_classes: int, hidden: Sequence[int], out_shape: Sequence[int],
                 gated: bool = False):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = _mlp([z_dim + n_classes, *reversed(hidden), math.prod(out_shape)], gated)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.net(_join(z, y)).unflatten(-1, self.out_shape)


class Classifier(nn.Module):
    """x -> flatten -> MLP(hidden) -> C logits: q(y|x) in M2, and the whole of the baseline."""

    def __init__(self, x_shape: Sequence[int], n_classes: int, hidden: Sequence[int], gated: bool = False):
        super().__init__()
        self.net = _mlp([math.prod(x_shape), *hidden, n_classes], gated)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(-3))


class Baseline(nn.Module):
    """b(x), the score-function estimator's baseline for an unlabelled example: a linear function of
    the flattened image, fitted to the downstream cost by TraceGraph_ELBO's baseline loss."""

    def __init__(self, x_shape: Sequence[int]):
        super().__init__()
        self.net = nn.Linear(math.prod(x_shape), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(-3)).squeeze(-1)


def _labelled(y: Tensor | None) -> Tensor | None:
    """The mask of examples with a label, or None without labels."""
    return None if y is None else y != UNLABELLED


class M2(RegisteringModule):
    """The M2 model and guide (see the module's docstring). `discrete` ('enum', 'score', 'relaxed')
    says how y is handled while training, `temperature` is the relaxation's (the trainer anneals it),
    `aux_loss` Kingma et al.'s alpha."""

    is_autoencoder = False
    model_kind = "m2"
    param_prefix = "m2"

    def __init__(self, classifier: Classifier, encoder: ClassEncoder, decoder: ClassDecoder, prior: nn.Module,
                 likelihood: Likelihood, n_classes: int, discrete: str = "enum", aux_loss: float = 0.0,
                 temperature: float = 1.0, baseline: Baseline | None = None):
        super().__init__()
        if discrete not in DISCRETE:
            raise InputError(f"unknown --discrete {discrete!r}: choose one of {', '.join(DISCRETE)}")
        self.classifier, self.encoder, self.decoder = classifier, encoder, decoder
        self.prior, self.likelihood = prior, likelihood
        self.baseline = baseline
        self.n_classes, self.discrete, self.aux_loss = n_classes, discrete, aux_loss
        self.temperature = temperature

    @property
    def relaxed(self) -> bool:
        """Whether y is a relaxed one-hot vector now (training with discrete='relaxed')."""
        return self.training and self.discrete == "relaxed"

    def model(self, x: Tensor | None = None, y: Tensor | None = None, n: int | None = None,
              temperature: float | None = None) -> Tensor:
        """p(y) p(z) p(x|y,z) for a batch x (N, C, H, W) with labels y (UNLABELLED where none); with
        x=None it generates n examples. `temperature`: the relaxation's, this step (default: the model's)."""
        self.register_parts("decoder", "prior", "likelihood", *(("classifier",) if self.aux_loss else ()))
        labelled = _labelled(y)
        with pyro.plate("data", n if x is None else x.shape[0]):
            prior_y = self._class_prior(temperature)
            if labelled is not None:
                with poutine.mask(mask=labelled):
                    pyro.sample("y_label", dist.Categorical(logits=torch.zeros_like(prior_y.logits)),
                                obs=y.clamp(min=0))
            with poutine.mask(mask=True if labelled is None else ~labelled):
                sampled = pyro.sample("y", prior_y)
            onehot = self._onehot(sampled, y)
            z = pyro.sample("z", self.prior())
            out = pyro.sample("x", self.likelihood(self.decoder(z, onehot)), obs=x)
            if self.aux_loss and labelled is not None:
                with poutine.mask(mask=labelled), poutine.scale(scale=self.aux_loss):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=y.clamp(min=0))
            return out

    def guide(self, x: Tensor, y: Tensor | None = None, n: int | None = None,
              temperature: float | None = None) -> Tensor:
        """q(y|x) q(z|x,y): y drawn (or enumerated, or relaxed) where there is no label."""
        self.register_parts("classifier", "encoder", *(("baseline",) if self.baseline is not None else ()))
        labelled = _labelled(y)
        with pyro.plate("data", x.shape[0]):
            logits = self.classifier(x)
            with poutine.mask(mask=True if labelled is None else ~labelled):
                sampled = pyro.sample("y", self._class_posterior(self._at_labels(logits, y), temperature),
                                      infer=self._infer(x))
            onehot = self._onehot(sampled, y)
            return pyro.sample("z", dist.Normal(*self.encoder(x, onehot)).to_event(1))

    def _at_labels(self, logits: Tensor, y: Tensor | None) -> Tensor:
        """The guide's logits for y: q(y|x)'s, with a point mass at the label where there is one (unless
        relaxed). The mask of the site "y" zeroes log q(y|x) there, but not its score function, which
        weights the costs under enumeration and multiplies them under 'score': with q(y|x)'s logits a
        labelled example's L(x, y) would be weighted by q(y|x) over C draws of z, and would give the
        classifier a gradient it has no part in."""
        if y is None or self.relaxed:
            return logits
        point = torch.full_like(logits, -math.inf).scatter(-1, y.clamp(min=0).unsqueeze(-1), 0.0)
        return torch.where((y != UNLABELLED).unsqueeze(-1), point, logits)

    def _class_prior(self, temperature: float | None = None) -> dist.Distribution:
        """p(y): uniform over the classes (relaxed while training with discrete='relaxed')."""
        device = next(self.decoder.parameters()).device
        return self._class_posterior(torch.zeros(self.n_classes, device=device), temperature)

    def _class_posterior(self, logits: Tensor, temperature: float | None = None) -> dist.Distribution:
        """A class distribution with these logits: q(y|x) from the classifier's, p(y) from zeros; relaxed
        while training with discrete='relaxed', at `temperature` (default: the model's)."""
        if self.relaxed:
            tau = self.temperature if temperature is None else temperature
            return GumbelSoftmax(torch.tensor(tau, device=logits.device), logits=logits)
        return dist.Categorical(logits=logits)

    def _infer(self, x: Tensor) -> dict:
        """The infer options of the guide's y site: parallel enumeration, or the score function's
        baseline b(x) (its input detached, as Pyro's nn_baseline wants)."""
        if self.relaxed or not self.training:
            return {}
        if self.discrete == "enum":
            return {"enumerate": "parallel"}
        if self.discrete == "score":
            return {"baseline": {"nn_baseline": self.baseline, "nn_baseline_input": x}}
        return {}

    def _onehot(self, sampled: Tensor, y: Tensor | None) -> Tensor:
        """The class as the networks see it: the label where there is one, else the sampled class, one-hot
        (or relaxed one-hot) with the classes in the last dimension."""
        onehot = sampled if self.relaxed else F.one_hot(sampled, self.n_classes).to(torch.get_default_dtype())
        if y is None:
            return onehot
        label = F.one_hot(y.clamp(min=0), self.n_classes).to(onehot.dtype)
        return torch.where((y != UNLABELLED).unsqueeze(-1), label, onehot)

    # -- what figures and evaluation use -------------------------------------------------------------

    def posterior(self, x: Tensor) -> dist.Distribution:
        """q(z|x, y) at y = the classifier's most likely class: the code a picture of x shows."""
        onehot = F.one_hot(self.classifier(x).argmax(-1), self.n_classes).to(x.dtype)
        return dist.Normal(*self.encoder(x, onehot)).to_event(1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The class q(y|x) finds most likely, per example."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def class_samples(self, z: Tensor) -> Tensor:
        """The mean of p(x|y, z_j) for every class y and every row z_j of z (n, z_dim): shape
        (C, n, *x), one row per class ("style" z kept, class changed)."""
        classes = torch.eye(self.n_classes, device=z.device, dtype=z.dtype).unsqueeze(1)  # (C, 1, C)
        return self.likelihood.mean(self.decoder(z, classes))


class LabelClassifier(RegisteringModule):
    """The baseline: the classifier of M2 alone, trained on the labelled examples by maximum
    likelihood, as a Pyro program with no latent: the model observes y ~ Categorical(classifier(x)),
    masked to the labelled examples; the guide is empty. -ELBO is then -sum log q(y|x)."""

    is_autoencoder = False
    model_kind = "classifier"
    param_prefix = "classifier"

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def model(self, x: Tensor, y: Tensor | None = None, n: int | None = None) -> None:
        """log q(y|x) of the labels of the labelled examples of x."""
        self.register_parts("classifier")
        labelled = _labelled(y)
        if labelled is None:
            return
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=labelled):
            pyro.sample("y_label", dist.Categorical(logits=self.classifier(x)), obs=y.clamp(min=0))

    def guide(self, x: Tensor, y: Tensor | None = None, n: int | None = None) -> None:
        """Nothing is latent."""

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The most likely class, per example."""
        return self.classifier(x).argmax(-1)


def aux_weight(alpha: float, scale: str, n: int, n_labelled: int) -> float:
    """The weight of each labelled example's log q(y|x) in the training objective: alpha ('fixed'), or
    alpha * n / n_labelled ('data': Kingma et al.'s alpha * N * E_labelled[log q(y|x)])."""
    return alpha * n / n_labelled if scale == "data" else alpha


def check_labelled_per_batch(config) -> None:
    """--labelled-per-batch M must leave room for unlabelled examples in a batch (M < --batch-size), and
    --aux-loss-scale data must have an alpha to scale."""
    m = config.labelled_per_batch
    if m is not None and m >= config.batch_size:
        raise InputError(f"--labelled-per-batch {m} leaves no room for unlabelled examples in a batch of "
                         f"--batch-size {config.batch_size}; make it smaller than the batch size")
    if config.aux_loss_scale != "fixed" and config.aux_loss == 0:
        raise InputError(f"--aux-loss-scale {config.aux_loss_scale} scales alpha, and --aux-loss is 0 (no "
                         "auxiliary loss); give --aux-loss ALPHA (Kingma et al.: 0.1 with data), or drop "
                         "--aux-loss-scale")


def build_m2(
    x_shape: Sequence[int], n_classes: int, encoder: str = "mlp", hidden: Sequence[int] = (500,),
    z_dim: int = 50, prior: str = "normal", likelihood: str = "bernoulli", discrete: str = "enum",
    aux_loss: float = 0.0, temperature: float = 1.0, model: str = "m2", **options,
) -> M2 | LabelClassifier:
    """M2 (model='m2') or the classifier baseline (model='classifier') with MLP networks ('mlp' or
    'gated-mlp' hidden layers); `options` go to the likelihood and prior factories."""
    if encoder not in M2_ENCODERS:
        raise InputError(f"--model {model} builds MLP networks: use --encoder {' or '.join(M2_ENCODERS)}, "
                         f"not {encoder!r}")
    gated = encoder == "gated-mlp"
    classifier = Classifier(x_shape, n_classes, hidden, gated)
    if model == "classifier":
        return LabelClassifier(classifier)
    if prior == "vamp":
        raise InputError("--prior vamp builds p(z) from q(z|x), and M2's q(z|x,y) also needs y: use "
                         "--prior normal, mog or learned with --model m2")
    lik = make_likelihood(likelihood, **options)
    c, h, w = x_shape
    return M2(classifier, ClassEncoder(x_shape, n_classes, hidden, z_dim, gated),
              ClassDecoder(z_dim, n_classes, hidden, (c * lik.params_per_pixel, h, w), gated),
              make_prior(prior, z_dim, x_shape=tuple(x_shape), **options), lik, n_classes, discrete,
              aux_loss, temperature, Baseline(x_shape) if discrete == "score" else None)


class M2Kind(LabelledKind):
    """--model m2: a discrete latent y (the class) besides z, trained on labelled and unlabelled
    examples with the estimator --discrete chooses; its metrics add the test accuracy of q(y|x)."""

    name = "m2"
    comparison = "discrete"  # compare_discrete.py: the estimators of the sum over y
    figures = (*FIGURES, "class_samples.png")

    def check(self, config) -> None:
        check_parts(config)
        check_exemplar(config, self)
        check_labels(config, self)
        check_discrete(config, self, discrete_latent=True)
        check_labelled_per_batch(config)
        self.check_labelled(config)
        check_kl_weight(config)

    def build(self, config, x_shape: tuple[int, ...]) -> M2:
        return build_m2(
            x_shape, config.classes, encoder=config.encoder, hidden=config.hidden, z_dim=config.z_dim,
            prior=config.prior, likelihood=config.likelihood, discrete=config.discrete,
            aux_loss=config.aux_loss, temperature=config.temperature, model="m2",
            sigma=config.sigma, sigma_mode=config.sigma_mode, prior_components=config.prior_components,
        )

    def prepare(self, model: M2, config, data: Dataset) -> None:
        """The weight of the auxiliary loss from the training set: aux_weight(alpha, --aux-loss-scale, N,
        N_labelled)."""
        labelled = int((data.train_y != UNLABELLED).sum())
        model.aux_loss = aux_weight(config.aux_loss, config.aux_loss_scale, len(data.train_y), labelled)

    def objective(self, config):
        """The estimator of the sum over y that --discrete names (discrete.py)."""
        return make_discrete_estimator(config.discrete)

    def schedule(self, config, step: int, total_steps: int) -> dict[str, float]:
        """With --discrete relaxed, the Gumbel-softmax temperature of the step: geometric from
        --temperature to --temperature-final over the run (discrete.temperature)."""
        if config.discrete != "relaxed":
            return {}
        return {"temperature": temperature(config.temperature, config.temperature_final, step, total_steps)}

    def refusal(self, command: str, what: str) -> str | None:
        if command == "compare-config":
            return "compare measures a trained M2: give its run directory, not --config"
        return None


M2_KIND = MODEL_KINDS.builtin(M2Kind())
