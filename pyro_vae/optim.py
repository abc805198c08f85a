"""The optimizers a run can step with (--optimizer): Adam, and the VampPrior authors' AdamNormGrad.

Both are torch.optim.Adam underneath, so they take the trainer's fused and capturable Adam, its
on-device `found_inf` check and its CUDA-graph step, and their state_dict has Adam's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .errors import InputError

OPTIMIZERS = ("adam", "adam-normgrad")


class AdamNormGrad(torch.optim.Adam):
    """Adam on normalized gradients, as in the VampPrior authors' code (jmtomczak/vae_vampprior,
    utils/optimizer.py; also used by the Exemplar VAE's code): before Adam's update each parameter
    tensor's gradient g becomes g / (||g||_2 + 1e-7), the 2-norm taken over that tensor alone. The
    update is then torch's Adam (their Adam adds eps to sqrt(v) before the bias correction, torch's
    after: with the default eps 1e-8 the two differ by under 1e-8 relative per step). The
    normalization runs on the device with foreach kernels (no host sync), so a CUDA graph can capture
    it; a non-finite gradient stays non-finite, and the fused step's `found_inf` skips it as before."""

    NORM_EPS = 1e-7

    @torch.no_grad()
    def normalize_gradients(self) -> None:
        """g <- g / (||g||_2 + NORM_EPS) for every parameter's gradient, in place."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(norms, self.NORM_EPS)
        torch._foreach_div_(grads, norms)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Run `closure` (if given), normalize the gradients, then take Adam's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.normalize_gradients()
        super().step()
        return loss


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, **adam_options) -> torch.optim.Adam:
    """The optimizer `name` ('adam' or 'adam-normgrad') over `params` with learning rate `lr`;
    `adam_options` (fused, capturable, ...) go to torch.optim.Adam."""
    if name not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    cls = AdamNormGrad if name == "adam-normgrad" else torch.optim.Adam
    return cls(params, lr=lr, **adam_options)
