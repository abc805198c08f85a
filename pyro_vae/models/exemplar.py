"""The Exemplar VAE prior (Norouzi, Fleet & Norouzi 2020): a Parzen window over the training set in
latent space,

    p(z) = 1/N sum_n r(z | x_n),   r(z | x_n) = N(z; mu(x_n), sigma^2 I),

with mu the guide's own encoder mean (the same module: prior and guide are trained together) and one
scalar log-variance log sigma^2 shared by every exemplar and dimension, learned (the authors' code,
sajadn/Exemplar-VAE: `prior_log_variance`, one number). What we chose, and why:

(a) Exemplars. The training images as training sees them before any per-epoch draw (the grey values
    under --binarize dynamic, as the authors' TensorDataset holds them). They are the prior's state: a
    buffer in its state_dict, so checkpoints carry them (about 160 MB for Fashion-MNIST's 50,000) and
    `load_model`, evaluate, sample, compare and diagnose rebuild the prior from the run alone. The
    trainer hands them over once, right after building the model: `use_training_set(model, x)`.
(b) Leave-one-out. In training, example b's prior leaves out its own exemplar (else the optimum puts
    sigma -> 0 and memorizes). model(x) sees x only, so the trainer names the rows of the batch in the
    training set around each step: `with leave_out(model, idx): ...`. Inside, the prior's
    distribution has batch shape (B,): row b's mixture skips exemplar idx[b] and divides by the number
    of exemplars it keeps. Outside (no indices given), nothing is left out.
(c) Test time (eval mode): the exact mixture over all N exemplars. Their means are encoded once per
    parameter state (no gradient) in chunks and kept until a parameter changes (compared by value);
    log_prob runs over (rows x exemplars) blocks of at most `max_elements`, so memory stays bounded at
    any N.
(d) Training at large N (train mode): each step draws a random subset of M = --exemplar-subset
    exemplars (without replacement; the authors draw with replacement) and uses their mixture,
    log p(z_b) ~ log 1/(M - m_b) sum_{e in S, e != b} r(z_b | x_e) with m_b = 1 if b's own exemplar was
    drawn, else 0: in expectation over S the mixture is the leave-one-out mixture over N - 1. This is
    the authors' exemplar subsampling (approximate_prior=False; their dynamic-MNIST run and README use
    M = 25,000 for the 50,000 (Fashion-)MNIST training images). Without --exemplar-subset (or M >= N)
    every exemplar is used: the exact leave-one-out mixture. With --exemplar-k K, their retrieval-
    augmented training (approximate_prior=True, approximate_k=10 by default): of the subset, only each
    example's K nearest exemplars in latent space (by means cached once per epoch's worth of examples,
    updated as they are re-encoded), their union over the batch, are encoded and kept; the dropped
    terms make it a lower bound on the subset's mixture (ExemplarPrior._retrieve).
(e) Encodings. In training the subset's (or the retrieved) means are recomputed each step through the
    encoder with gradient (as the authors do: `q_z(exemplars, prior=True)` inside the loss), so the
    encoder learns from the prior's side as well; retrieval's distances use means cached without
    gradient; at test time all N are cached, without gradient (their `cache_z`).

Densities are computed in float64 (|z|^2 - 2 z.mu + |mu|^2 cancels near a narrow kernel, as in
priors.DiagonalNormalMixture; the authors' pairwise_distance is in double too). There is no closed-form
KL(q || p): `analytic` estimators fall back to Monte Carlo on this site.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from ..errors import InputError

EAGER_PRIORS = ("exemplar",)  # priors whose step draws at random on its own: never captured in a CUDA graph
MAX_ELEMENTS = 2**22  # rows x exemplars per block of log_prob (float64: 32 MB a block)
ENCODE_CHUNK = 10_000  # exemplars encoded at once for the test-time mixture


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mixture_log_density(z: Tensor, loc: Tensor, log_variance: Tensor, index: Tensor | None = None,
                        left_out: Tensor | None = None, max_elements: int = MAX_ELEMENTS,
                        size: int | None = None) -> Tensor:
    """log 1/(S - m_r) sum_{e in E_r} N(z_r; loc_e, exp(log_variance) I) for each row r of z (R, D), where
    E_r is every row of loc (M, D), except, with `left_out` (R,), the m_r rows whose `index` (M,) equals
    left_out[r]; S = `size` (default M: the mixture's weights are over the M rows; a larger S weights
    retrieved rows as members of a larger set whose other terms are dropped). Computed in float64 over
    blocks of at most max_elements rows x exemplars: the squared distance as |z|^2 - 2 z.loc + |loc|^2
    (matrix products). Shape (R,), z's dtype."""
    wide = torch.float64
    d = z.shape[-1]
    log_var = log_variance.to(wide)
    log_norm = -0.5 * d * (math.log(2 * math.pi) + log_var)
    z64, loc64 = z.to(wide), loc.to(wide)
    zz, mm = z64.pow(2).sum(-1), loc64.pow(2).sum(-1)
    cols = _blocks(loc.shape[0], max(1, min(loc.shape[0], max_elements)))
    rows = _blocks(z.shape[0], max(1, max_elements // (cols[0].stop - cols[0].start)))
    out = []
    for r in rows:
        parts = []
        kept = torch.full((r.stop - r.start,), float(size or loc.shape[0]), dtype=wide, device=z.device)
        for c in cols:
            quad = zz[r, None] - 2 * z64[r] @ loc64[c].T + mm[None, c]
            log_r = log_norm - 0.5 * quad / log_var.exp()
            if left_out is not None:
                mask = left_out[r, None] == index[None, c]
                log_r = log_r.masked_fill(mask, -math.inf)
                kept = kept - mask.sum(-1)
            parts.append(log_r.logsumexp(-1))
        out.append(torch.stack(parts, -1).logsumexp(-1) - kept.log())
    return torch.cat(out).to(z.dtype)


class ExemplarMixture(TorchDistribution):
    """p(z) = 1/|E| sum_{e in E} N(z; loc_e, exp(log_variance) I) over the exemplar means `loc` (M, D);
    with `left_out` (batch shape), element b of the batch leaves out the exemplars whose `index` (M,)
    equals left_out[b] (mixture_log_density). Expanding it (as a plate does) keeps the (M, D) means.
    `size` (default M) is the number the weights divide by (mixture_log_density). `sample` draws an
    exemplar uniformly from all M (nothing left out), then z ~ N(loc_e, sigma^2 I)."""

    arg_constraints = {"log_variance": constraints.real}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, loc: Tensor, log_variance: Tensor, index: Tensor | None = None,
                 left_out: Tensor | None = None, batch_shape: Sequence[int] | None = None,
                 max_elements: int = MAX_ELEMENTS, size: int | None = None,
                 validate_args: bool | None = None):
        if (index is None) != (left_out is None):
            raise ValueError("index and left_out are given together (leave-one-out) or not at all")
        self.loc, self.log_variance, self.index, self.left_out = loc, log_variance, index, left_out
        self.max_elements, self.size = max_elements, size
        if batch_shape is None:
            batch_shape = () if left_out is None else left_out.shape
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> ExemplarMixture:
        return ExemplarMixture(self.loc, self.log_variance, self.index, self.left_out, batch_shape,
                               self.max_elements, self.size, validate_args=self._validate_args)

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            e = torch.randint(self.loc.shape[0], shape, device=self.loc.device)
            eps = torch.randn(shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc[e] + (0.5 * self.log_variance).exp() * eps

    def log_prob(self, z: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(z)
        shape = torch.broadcast_shapes(z.shape[:-1], self.batch_shape)
        rows = z.expand(shape + self.event_shape).reshape(-1, self.event_shape[0])
        left = None if self.left_out is None else self.left_out.expand(shape).reshape(-1)
        return mixture_log_density(rows, self.loc, self.log_variance, self.index, left,
                                   self.max_elements, self.size).reshape(shape)


class ExemplarPrior(nn.Module):
    """The Exemplar VAE prior (this module's docstring says what it computes and what we chose):
    r(z | x_n) = N(z; mu(x_n), sigma^2 I) with mu the `encoder`'s loc (it returns (loc, scale)) and
    log sigma^2 one learned scalar (starts at 0, sigma = 1; the authors start it at a N(0, 1) draw).
    `subset`: exemplars per training step (None: all). Train mode: the mixture over a fresh random
    subset, encoded with gradient, leaving out the rows named by `leave_out`; with `k`, only the k
    nearest of the subset to each example of the batch (retrieval, `_retrieve`); eval mode: the exact
    mixture over all N, means cached without gradient."""

    def __init__(self, encoder: nn.Module, x_shape: Sequence[int], subset: int | None = None,
                 k: int | None = None, max_elements: int = MAX_ELEMENTS):
        super().__init__()
        if subset is not None and subset < 2:
            raise InputError(f"--exemplar-subset must be at least 2 (one exemplar may be left out), "
                             f"got {subset}")
        if k is not None and k < 1:
            raise InputError(f"--exemplar-k must be a positive number of nearest exemplars, got {k}")
        self.encoder, self.subset, self.k, self.max_elements = encoder, subset, k, max_elements
        self.log_variance = nn.Parameter(torch.zeros(()))
        self.register_buffer("exemplars", torch.empty(0, *x_shape))
        # retrieval (k): every exemplar's mean as last computed (N, D), and the examples trained on since
        # it was computed whole; in the state, so that a resumed run retrieves as an uninterrupted one
        self.register_buffer("retrieval_means", torch.empty(0))
        self.register_buffer("retrieval_age", torch.zeros((), dtype=torch.long))
        self.left_out: Tensor | None = None  # the batch's rows in the training set (leave_out)
        self._cache: tuple[tuple, Tensor] | None = None  # ((encoder copy, exemplars), all N means): eval

    def set_exemplars(self, x: Tensor) -> None:
        """Use the images x (N, C, H, W) as the exemplars (kept as they are, not copied)."""
        if x.shape[1:] != self.exemplars.shape[1:]:
            raise InputError(f"exemplars have shape {tuple(self.exemplars.shape[1:])}, these images "
                             f"{tuple(x.shape[1:])}")
        if x.shape[0] < 2:
            raise InputError(f"--prior exemplar leaves each training example's own exemplar out, so it needs "
                             f"at least 2 training examples; this training set has {x.shape[0]}")
        self.exemplars = x.detach()
        self.retrieval_means = self.retrieval_means.new_empty(0)
        self._cache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint's exemplars (and retrieval means) replace the buffers whatever their number (a
        model built from a config starts with none)."""
        saved = state_dict.get(prefix + "exemplars")
        if isinstance(saved, Tensor) and saved.shape[1:] == self.exemplars.shape[1:]:
            self.exemplars = self.exemplars.new_empty(saved.shape)
            self._cache = None
        saved = state_dict.get(prefix + "retrieval_means")
        if isinstance(saved, Tensor):
            self.retrieval_means = self.retrieval_means.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> ExemplarMixture:
        n = self.exemplars.shape[0]
        if n == 0:
            raise InputError("the exemplar prior has no exemplars yet: give it the training images first "
                             "(exemplar.use_training_set(model, train_x); pyro-vae train does)")
        if not self.training:
            return ExemplarMixture(self.all_means(), self.log_variance, max_elements=self.max_elements)
        index = (torch.randperm(n, device=self.exemplars.device)[:self.subset]
                 if self.subset is not None and self.subset < n else None)
        if self.k is not None and self.left_out is not None:
            return self._retrieve(torch.arange(n, device=self.exemplars.device) if index is None else index)
        loc = self.encoder(self.exemplars if index is None else self.exemplars[index])[0]
        if self.left_out is None:
            return ExemplarMixture(loc, self.log_variance, max_elements=self.max_elements)
        if index is None:
            index = torch.arange(n, device=self.exemplars.device)
        return ExemplarMixture(loc, self.log_variance, index, self.left_out, max_elements=self.max_elements)

    def _retrieve(self, subset: Tensor) -> ExemplarMixture:
        """Retrieval-augmented training (the authors' approximate_prior=True, approximate_k): the union
        E over the batch of each example's k nearest exemplars of the subset S (M of them), by the
        distance of their last computed means to the example's own (its exemplar's mean, encoded now
        without gradient: the authors use the mean of the binarized batch image); E is encoded with
        gradient and its terms kept, the others of S dropped: log 1/(M - m_b) sum_{e in E, e != b}
        r(z_b | x_e), a lower bound on the subset's mixture (the authors' code divides by |E| - m_b,
        which differs by a constant: the same gradients). The last computed means are refreshed whole
        (without gradient) once per N examples trained on, as the authors do at each epoch's start, and
        row by row with every mean encoded in between (the batch's own and E's)."""
        rows, n = self.left_out, self.exemplars.shape[0]
        with torch.no_grad():
            if self.retrieval_means.shape[0] != n or int(self.retrieval_age) >= n:
                self.retrieval_means = self._encode_all()
                self.retrieval_age.zero_()
            self.retrieval_age += rows.numel()
            self.retrieval_means[rows] = self.encoder(self.exemplars[rows])[0]
            candidates = self.retrieval_means[subset]
            distance = torch.cdist(self.retrieval_means[rows].double(), candidates.double())
            nearest = distance.topk(min(self.k, subset.numel()), largest=False).indices.unique()
        index = subset[nearest]
        loc = self.encoder(self.exemplars[index])[0]
        with torch.no_grad():
            self.retrieval_means[index] = loc
        return ExemplarMixture(loc, self.log_variance, index, rows, max_elements=self.max_elements,
                               size=subset.numel())

    def _encode_all(self) -> Tensor:
        """mu(x_n) for all N exemplars (N, D), without gradient, ENCODE_CHUNK at a time."""
        with torch.no_grad():
            return torch.cat([self.encoder(self.exemplars[c])[0]
                              for c in _blocks(self.exemplars.shape[0], ENCODE_CHUNK)])

    def all_means(self) -> Tensor:
        """mu(x_n) for all N exemplars (N, D), without gradient; encoded in chunks, and again only when
        the encoder's parameters and buffers differ from the copy kept with the means (compared by value:
        fused Adam updates parameters in place without bumping their version counters) or the exemplars
        were replaced or written to."""
        encoder = [t.detach() for t in (*self.encoder.parameters(), *self.encoder.buffers())]
        images = (self.exemplars.data_ptr(), self.exemplars.shape, self.exemplars._version)
        if self._cache is not None:
            (kept, kept_images), means = self._cache
            if kept_images == images and len(kept) == len(encoder) and all(
                    a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
                    for a, b in zip(kept, encoder, strict=True)):
                return means
        self._cache = (([t.clone() for t in encoder], images), self._encode_all())
        return self._cache[1]


def _exemplar_priors(model: object) -> Iterator[ExemplarPrior]:
    return (m for m in model.modules() if isinstance(m, ExemplarPrior)) if isinstance(model, nn.Module) \
        else iter(())


def use_training_set(model: object, train_x: Tensor) -> None:
    """Give every exemplar prior inside `model` the training images `train_x` as its exemplars (the
    trainer's one hand-over, right after building the model); nothing for a model without one."""
    for prior in _exemplar_priors(model):
        prior.set_exemplars(train_x)


@contextmanager
def leave_out(model: object, rows: Tensor) -> Iterator[None]:
    """Inside: every exemplar prior of `model` leaves out, for example b of the batch, the exemplar
    rows[b] (the example's own position in the training set). The trainer wraps each step in it."""
    priors = list(_exemplar_priors(model))
    for prior in priors:
        prior.left_out = rows
    try:
        yield
    finally:
        for prior in priors:
            prior.left_out = None
