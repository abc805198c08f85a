"""How the library's models reach Pyro's param store: `register_named`, which model() and guide()
call, as Pyro's own examples call `pyro.module`, so that `pyro.infer.SVI` with a `pyro.optim`
optimizer finds and steps their parameters; and `param_sites(False)`, for a training loop that steps
the parameters with its own optimizer and so needs no param sites (step.SVIStep)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import pyro
from pyro.nn import PyroModule
from pyro.params import param_with_module_name
from torch import nn

_PARAM_SITES: ContextVar[bool] = ContextVar("pyro_vae_param_sites", default=True)


@contextmanager
def param_sites(enabled: bool) -> Iterator[None]:
    """Within the block, register_named registers (True, the default outside) or does nothing (False):
    no param sites in the traces, the param store untouched. Each site costs about 10 µs of Python,
    some 2-3% of a CPU training step of the MLP VAE; a loop that optimizes vae.parameters() itself
    saves that. Pyro's SVI needs the sites. Scoped to this thread (and asyncio task)."""
    token = _PARAM_SITES.set(enabled)
    try:
        yield
    finally:
        _PARAM_SITES.reset(token)


def param_sites_enabled() -> bool:
    """Whether register_named registers here (False inside param_sites(False))."""
    return _PARAM_SITES.get()


def register_named(prefix: str, params: dict[str, nn.Parameter]) -> None:
    """What pyro.module does, for parameters named "module_name.parameter_name": a param site for each
    trainable one, named "prefix$$$module_name.parameter_name", so that SVI finds it and its pyro.optim
    optimizer steps it. The param store holds these very tensors: where it holds another tensor under
    one of the names (a model built earlier in this process with the same names, or a param store
    loaded from a file), this one takes its place (pyro.module would keep the other tensor and put it
    in the param site, and SVI would step the other model's tensors, silently). A tensor must have one
    name only: the store maps each tensor back to its name, and a tensor under two names breaks that
    map once one of them is replaced (a model that reaches a shared module by two paths, as the
    VampPrior reaches the encoder, passes each tensor once, under its canonical name)."""
    if not _PARAM_SITES.get():
        return
    store = pyro.get_param_store()
    stored = store.named_parameters().mapping  # a read-only view: name -> the tensor the store holds
    for name, param in params.items():
        if not param.requires_grad:
            continue
        name = param_with_module_name(prefix, name)
        if stored.get(name) is not param:
            if name in store:
                del store[name]
            store[name] = param
            if stored[name] is not param:  # the store keeps a contiguous copy
                raise ValueError(f"parameter {name!r} is not contiguous, so Pyro's param store would "
                                 "hold a copy of it; make it contiguous (p.data = p.data.contiguous())")
        pyro.param(name, param)


class RegisteringModule(PyroModule):
    """A PyroModule whose model() and guide() register the parameters of the submodules they use, by
    `register_parts`, each under its name in the whole module prefixed "<param_prefix>$$$" (a tensor
    reached by two paths, as the VampPrior reaches the encoder, keeps the one name it has in
    self.named_parameters(): one name per tensor in model and guide)."""

    param_prefix = "module"

    def register_parts(self, *parts: str) -> None:
        """register_named for the parameters of the submodules named `parts` (nothing inside
        param_sites(False))."""
        if not param_sites_enabled():
            return
        names = {param: name for name, param in self.named_parameters()}
        register_named(self.param_prefix,
                       {names[p]: p for part in parts for p in self._modules[part].parameters()})
