"""One SVI training step, fast: no host sync, fused Adam, non-finite steps caught on the device, and
optionally the whole step captured as one CUDA graph. `train.train` runs it; `scripts/bench.py` times
it against a hand-written PyTorch step."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro
import torch
from torch import Tensor

from ..param_store import param_sites
from .faults import is_validation_error


class SVIStep:
    """One SVI step with no host sync: loss = loss_fn(x, ...) (-ELBO per example), backward, optional
    gradient-norm clipping, fused Adam. A step whose loss or any gradient is not finite is not
    applied, and neither is any later one (Adam's on-device `found_inf`, which stays set), so the
    model stays as it was before the first bad step until `fault()` (one host sync, called every so
    often) reports it. Pyro's validation runs on the first step only (model/guide structure and
    distribution arguments); later steps skip it, and non-finite values are caught by the check.
    loss_fn must not wait for the device either: the registry's estimators do not (elbo.py, iwae.py);
    any other pyro.infer.ELBO works too, at the cost of its host syncs. The step optimizes `params`
    itself, so the library's models emit no param sites during it (param_store.param_sites(False)):
    Pyro's param store is left as it was, except that values loaded into it are copied into the
    model first (param_store.py)."""

    def __init__(self, loss_fn: Callable[..., Tensor], optimizer: torch.optim.Optimizer,
                 params: list[Tensor], clip_grad: float | None, device: torch.device):
        self.loss_fn, self.optimizer, self.params, self.clip_grad = loss_fn, optimizer, params, clip_grad
        self.skipped = torch.zeros((), device=device)  # steps not applied, from the first bad one on
        self.optimizer.found_inf = torch.zeros((), device=device)  # read by fused Adam's step
        self.one = torch.ones((), device=device)
        self.one_dtype = len({p.dtype for p in params}) <= 1  # AMP's check takes one dtype at a time
        self.validate = True

    def __call__(self, x: Tensor, *args, **options) -> Tensor:
        """Run the step on batch x (args and options go to loss_fn); returns the loss, detached, on the
        device."""
        with pyro.validation_enabled(self.validate), param_sites(False):
            try:
                loss = self.loss_fn(x, *args, **options)
            except ValueError as err:  # Pyro's check of distribution parameters (NaN/inf)
                if not is_validation_error(err):
                    raise
                loss = torch.full((), math.nan, device=x.device)
        self.validate = False
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        found_inf = self.optimizer.found_inf
        torch.maximum(found_inf, torch.isfinite(loss.detach()).logical_not_(), out=found_inf)
        if self.clip_grad or not self.one_dtype:
            grad_norm = torch.nn.utils.get_total_norm(grads)
            torch.maximum(found_inf, torch.isfinite(grad_norm).logical_not_(), out=found_inf)
            if self.clip_grad:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, grad_norm)
        elif grads:  # one pass over the gradients that sets found_inf on NaN or inf (times 1: unchanged)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.one)
        self.skipped.add_(found_inf)
        self.optimizer.step()
        return loss.detach()

    def fault(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> int:
        """The number of steps not applied, counting the first bad one (0: none); `reduce` combines
        it over processes (all call it together). Waits for the device."""
        return int(reduce(self.skipped))

    def gradients(self, x: Tensor, *args, **options) -> Tensor:
        """Run batch x again at the current parameters: the loss, and the gradients in .grad; no step."""
        self.optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False), param_sites(False):
            loss = self.loss_fn(x, *args, **options)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()


class CUDAGraphStep:
    """An SVIStep captured as one CUDA graph and replayed: a step is then one copy of the batch into
    the graph's input buffer and one graph launch, with no Python, no Pyro tracing and no per-kernel
    launch cost. The step is captured once the same batch shape and arguments have come WARMUP times
    in a row (eager steps before, on a side stream, as CUDA graph capture wants); a step the graph
    cannot stand for runs eagerly: a batch of another shape (an epoch's last, shorter batch) or other
    arguments (a KL weight still warming up; once it settles, the step is captured again). z is
    drawn by CUDA's graph-safe Philox generator: same distribution as eager mode, other draws. If
    capture fails, training goes on eagerly, with a warning."""

    WARMUP = 3

    def __init__(self, step: SVIStep):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key = self.last = None  # (shape, args) of the graph, and of the step before
        self.repeats, self.failed = 0, False
        self.side = torch.cuda.Stream()

    def __call__(self, x: Tensor, *args) -> Tensor:
        """SVIStep.__call__, replayed from the graph where it can be."""
        key = (tuple(x.shape), args)
        if self.graph is not None and key == self.key:
            self.x.copy_(x)
            self.graph.replay()
            return self.loss.clone()
        self.repeats = self.repeats + 1 if key == self.last else 1
        self.last = key
        if self.repeats > self.WARMUP and not self.failed:
            return self._capture(x, *args)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self.step(x, *args)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _capture(self, x: Tensor, *args) -> Tensor:
        """Capture the step on batch x (nothing runs during capture), then replay it once."""
        self.graph, self.x = None, x.clone()  # a graph captured before goes, with its buffers
        graph = torch.cuda.CUDAGraph()
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        try:
            with torch.cuda.graph(graph):
                self.loss = self.step(self.x, *args)
        except RuntimeError as err:
            self.failed = True
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.warn(f"--cuda-graph on: capturing the training step failed ({reason}); training goes "
                          "on without the graph", UserWarning, stacklevel=2)
            return self.step(x, *args)
        self.graph, self.key = graph, (tuple(x.shape), args)
        graph.replay()
        return self.loss.clone()

    def fault(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> int:
        """As SVIStep.fault (the graph updates the same counter)."""
        return self.step.fault(reduce)

    def gradients(self, x: Tensor, *args) -> Tensor:
        """As SVIStep.gradients, eagerly."""
        return self.step.gradients(x, *args)
