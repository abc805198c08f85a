"""How the library's models reach Pyro's param store: `register_named`, which model() and guide()
call, as Pyro's own examples call `pyro.module`, so that `pyro.infer.SVI` with a `pyro.optim`
optimizer finds and steps their parameters; and `param_sites(False)`, for a training loop that steps
the parameters with its own optimizer and so needs no param sites (step.SVIStep).

What a model finds in the store under one of its names, on each model()/guide() call:
* its own tensor: nothing to do;
* a value none of our models put there (`pyro.get_param_store().load(path)`, `pyro.param(name, v)`):
  the model adopts it, as `pyro.module(..., update_module_params=True)` would: the value is copied
  into the model's parameter, in place, and the model's tensor then stands in the store (so SVI
  steps it, and a later `save` writes it). A value of another shape is replaced, with a warning;
* a tensor another of our models put there: replaced by this model's, so that no model steps
  another's tensors; with a warning (once per model) when that model is still alive, silently when
  it is gone (its values are never copied into a new model: a checkpoint just loaded stays).
To tell these apart the module keeps weak references to our models and to the tensors they own
(nothing is kept alive by them)."""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import pyro
import torch
from pyro.nn import PyroModule
from pyro.params import param_with_module_name
from pyro.params.param_store import ParamStoreDict
from torch import Tensor, nn

_PARAM_SITES: ContextVar[bool] = ContextVar("pyro_vae_param_sites", default=True)
_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # our models alive now
_OURS: dict[int, weakref.ref[Tensor]] = {}  # id -> a tensor one of our models put in the store


@contextmanager
def param_sites(enabled: bool) -> Iterator[None]:
    """Within the block, register_named registers (True, the default outside) or does nothing (False):
    no param sites in the traces, the param store untouched. Each site costs about 10 µs of Python,
    some 2-3% of a CPU training step of the MLP VAE; a loop that optimizes vae.parameters() itself
    saves that. Pyro's SVI needs the sites. Values loaded into the store are still adopted (see the
    module's docstring), so such a loop trains from them too. Scoped to this thread (and asyncio
    task)."""
    token = _PARAM_SITES.set(enabled)
    try:
        yield
    finally:
        _PARAM_SITES.reset(token)


def param_sites_enabled() -> bool:
    """Whether register_named registers here (False inside param_sites(False))."""
    return _PARAM_SITES.get()


def register_named(prefix: str, params: dict[str, nn.Parameter], owner: nn.Module) -> None:
    """What pyro.module does, for parameters named "module_name.parameter_name" of the model `owner`:
    a param site for each trainable one, named "prefix$$$module_name.parameter_name", so that SVI
    finds it and its pyro.optim optimizer steps it. The param store holds these very tensors; what
    it held under one of the names before is adopted or replaced as the module's docstring says
    (pyro.module would keep a tensor already stored and put it in the param site, and SVI would step
    another model's tensors, silently). Inside param_sites(False): no site, a tensor of another of
    our models left in the store, a value loaded into the store still adopted. A tensor must have
    one name only: the store maps each tensor back to its name, and a tensor under two names breaks
    that map once one of them is replaced (a model that reaches a shared module by two paths, as the
    VampPrior reaches the encoder, passes each tensor once, under its canonical name)."""
    sites = _PARAM_SITES.get()
    store = pyro.get_param_store()
    stored = store.named_parameters().mapping  # a read-only view: name -> the tensor the store holds
    replaced: dict[str, list[str]] = {}
    displaced: list[tuple[str, Tensor]] = []  # other models' tensors this call took out of the store
    for name, param in params.items():
        if not param.requires_grad:
            continue
        name = param_with_module_name(prefix, name)
        held = stored.get(name)
        if held is param:
            _remember(param)  # pyro.module(prefix, owner) may have put it there
        elif held is None:
            _put(store, name, param, owner)
        elif _is_ours(held) or _alive_elsewhere(held, owner):  # another model's tensor
            if not sites:
                continue  # no site to make: left where it is
            displaced.append((name, held))
            _put(store, name, param, owner)
        else:  # a value no model of ours put there: loaded, or set with pyro.param
            value = store[name]
            if value.shape == param.shape:
                _copy_in(param, value)
            else:
                replaced["shape"] = [*replaced.get("shape", []),
                                     f"{name} {tuple(value.shape)} -> {tuple(param.shape)}"]
            _put(store, name, param, owner)
        if sites:
            pyro.param(name, param)
    if displaced and "live" not in _warned(owner):
        if any(_alive_elsewhere(held, owner) for _, held in displaced):
            gc.collect()  # a model gone but caught in a reference cycle is not alive
            replaced["live"] = [name for name, held in displaced if _alive_elsewhere(held, owner)]
    for reason, names in replaced.items():
        if names:
            _warn_once(owner, reason, names)


def _loaded_under(names: list[str]) -> bool:
    """Whether the store holds, under one of `names`, a value no model of ours put there."""
    store = pyro.get_param_store()
    if not store:
        return False
    stored = store.named_parameters().mapping
    return any((held := stored.get(name)) is not None and not _is_ours(held) for name in names)


def _put(store: ParamStoreDict, name: str, param: Tensor, owner: nn.Module) -> None:
    """Make `param` (a tensor of `owner`) the store's tensor under `name`, with constraint real."""
    if name in store:
        del store[name]
    store[name] = param
    if store.named_parameters().mapping[name] is not param:  # the store keeps a contiguous copy
        raise ValueError(f"parameter {name!r} is not contiguous, so Pyro's param store would "
                         "hold a copy of it; make it contiguous (p.data = p.data.contiguous())")
    _remember(param)
    _MODELS.add(owner)


def _remember(tensor: Tensor) -> None:
    """Note `tensor` as a tensor of one of our models, for as long as it lives."""
    key = id(tensor)
    if (ref := _OURS.get(key)) is None or ref() is not tensor:
        def forget(dead: weakref.ref[Tensor], key: int = key) -> None:
            if _OURS.get(key) is dead:
                del _OURS[key]
        _OURS[key] = weakref.ref(tensor, forget)


def _is_ours(tensor: Tensor) -> bool:
    """Whether one of our models put `tensor` in the store (it may be gone since)."""
    ref = _OURS.get(id(tensor))
    return ref is not None and ref() is tensor


def _alive_elsewhere(tensor: Tensor, owner: nn.Module) -> bool:
    """Whether `tensor` is a parameter of one of our models alive now, other than `owner`."""
    found = any(model is not owner and any(p is tensor for p in model.parameters())
                for model in list(_MODELS))
    if found:
        _remember(tensor)
    return found


@torch.no_grad()
def _copy_in(param: Tensor, value: Tensor) -> None:
    """param <- value (the stored value, constrained), in place: the module keeps its Parameter."""
    if (value.is_cuda or param.is_cuda) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("Pyro's param store holds values loaded for this model, and they would be "
                           "copied into it inside a CUDA graph: load the store before training starts")
    param.copy_(value)


def _warned(owner: nn.Module) -> set[str]:
    """The reasons `owner` has warned about."""
    return owner.__dict__.setdefault("_param_store_warned", set())


def _warn_once(owner: nn.Module, reason: str, names: list[str]) -> None:
    """One line, the first time `owner` replaces stored values for `reason` ("live" or "shape")."""
    warned = _warned(owner)
    if reason in warned:
        return
    warned.add(reason)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    kind = type(owner).__name__
    if reason == "live":
        message = (f"pyro-vae: this {kind} replaced another live model's tensors in Pyro's param store, "
                   f"under the names they share ({shown}): each model trains its own tensors; "
                   "pyro.clear_param_store() (or another param_prefix) keeps two models apart")
    else:
        message = (f"pyro-vae: Pyro's param store held values of another shape under this {kind}'s names "
                   f"({shown}): replaced by the model's own, not loaded")
    warnings.warn(message, UserWarning, stacklevel=4)


class RegisteringModule(PyroModule):
    """A PyroModule whose model() and guide() register the parameters of the submodules they use, by
    `register_parts`, each under its name in the whole module prefixed "<param_prefix>$$$" (a tensor
    reached by two paths, as the VampPrior reaches the encoder, keeps the one name it has in
    self.named_parameters(): one name per tensor in model and guide). Values loaded into Pyro's
    param store under those names are copied into the parameters, in place, by the first call that
    registers them (the module keeps its Parameter objects: state_dict, load_state_dict and an
    optimizer over parameters() are unaffected)."""

    param_prefix = "module"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _MODELS.add(self)

    def register_parts(self, *parts: str) -> None:
        """register_named for the parameters of the submodules named `parts`. Inside
        param_sites(False) only values loaded into the store are adopted, and the names are looked up
        from a cache, so a step with an empty store, or one holding our models' tensors, costs about
        a microsecond per parameter."""
        if not param_sites_enabled() and not _loaded_under(self._store_names(parts)):
            return
        names = {param: name for name, param in self.named_parameters()}
        register_named(self.param_prefix,
                       {names[p]: p for part in parts for p in self._modules[part].parameters()}, self)

    def _store_names(self, parts: tuple[str, ...]) -> list[str]:
        """The param-store names of the parameters of `parts` (cached per prefix and parts)."""
        cache = self.__dict__.setdefault("_param_store_names", {})
        key = (self.param_prefix, parts)
        if key not in cache:
            names = {param: name for name, param in self.named_parameters()}
            cache[key] = [param_with_module_name(self.param_prefix, names[p])
                          for part in parts for p in self._modules[part].parameters()]
        return cache[key]
