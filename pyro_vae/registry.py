"""One registry mechanism for priors, likelihoods and estimators: name -> factory, extended at run
time by the user's own entries.

An entry is added with `register(name, factory)` (a name clash or a factory that is not callable is
an InputError), or named directly as "module:factory": looking that name up imports `module` and
takes its attribute `factory`, so a run that records the name can be rebuilt in another process.
`load_plugin(module)` imports a module that registers entries when it is imported (what
`--plugin MODULE` does). Every failure is an InputError that names the module and what to do.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping

from .errors import InputError

PLUGIN_HINT = "put its folder on PYTHONPATH or install it"


class Registry(Mapping[str, Callable]):
    """A read-only mapping name -> factory of one kind (`kind`: 'prior', 'likelihood', 'estimator'),
    plus `register`. `build(name, **options)` calls the factory with keyword options only and checks
    that what it returns is a `returns`."""

    def __init__(self, kind: str, entries: Mapping[str, Callable], returns: type):
        self.kind, self.returns = kind, returns
        self._entries = dict(entries)
        self.builtins = frozenset(self._entries)

    def __getitem__(self, name: str) -> Callable:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, name: str, factory: Callable) -> Callable:
        """Add `factory` under `name` and return it. Registering the same definition again (the same
        module and qualified name: a re-run notebook cell, a reloaded module) replaces it; a name taken
        by another factory, or by a built-in one, is an InputError."""
        if not isinstance(name, str) or not name or ":" in name:
            raise InputError(f"a {self.kind} name must be a non-empty string without ':' (the form "
                             f"MODULE:FACTORY names a factory directly), got {name!r}")
        self._add(name, factory)
        return factory

    def unregister(self, name: str) -> None:
        """Remove a user's entry (the built-in ones stay)."""
        if name in self.builtins:
            raise InputError(f"{self.kind} {name!r} is built in and cannot be removed")
        self._entries.pop(name, None)

    def lookup(self, name: str) -> Callable:
        """The factory registered as `name`, or for a name "module:factory" that attribute of the
        module (imported if need be; the registry itself is left as it is)."""
        if name not in self._entries and ":" in name:
            factory = load_factory(name)
            self._check_callable(name, factory)
            return factory
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._entries)}, "
                             f"or add your own (register_{self.kind}, --plugin MODULE, or MODULE:FACTORY)")
        return self._entries[name]

    def build(self, name: str, **options):
        """factory(**options) for the entry `name`, checked to be a `self.returns`."""
        factory = self.lookup(name)
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as err:
            raise InputError(f"the {self.kind} factory {name!r} cannot take the options pyro-vae passes "
                             f"({', '.join(options)}): {err}; take the ones it needs by keyword and the "
                             "rest with **options") from None
        except ValueError:  # no signature to inspect (a builtin): let the call tell
            pass
        made = factory(**options)
        if not isinstance(made, self.returns):
            raise InputError(f"the {self.kind} factory {name!r} returned a value of type "
                             f"{type(made).__name__}, not an instance of {self.returns.__name__}; see the "
                             f"contract in register_{self.kind}'s docstring")
        return made

    def _check_callable(self, name: str, factory: Callable) -> None:
        if not callable(factory):
            raise InputError(f"the {self.kind} factory for {name!r} is not callable (it is of type "
                             f"{type(factory).__name__}); register a function or class")

    def _add(self, name: str, factory: Callable) -> None:
        self._check_callable(name, factory)
        taken_by = self._entries.get(name, factory)
        origin = self._origin
        if taken_by is not factory and (name in self.builtins or origin(taken_by) != origin(factory)):
            taken = "built in" if name in self.builtins else f"by {origin(taken_by)}"
            raise InputError(f"{self.kind} name {name!r} is already taken ({taken}); register yours "
                             "under another name")
        self._entries[name] = factory

    @staticmethod
    def _origin(factory: Callable) -> str:
        """'module.qualname' of a factory, for messages (the same definition registered again may
        replace the old one)."""
        return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def load_plugin(module: str):
    """Import the module `module` (dotted name), which registers its entries as it is imported;
    a module imported before is not run again."""
    try:
        return importlib.import_module(module)
    except InputError as err:
        raise InputError(f"plugin module {module!r}: {err}") from None
    except ModuleNotFoundError as err:
        if err.name is not None and (module == err.name or module.startswith(err.name + ".")):
            raise InputError(f"cannot import plugin module {module!r} (no module named {err.name!r}); "
                             f"{PLUGIN_HINT}") from None
        raise InputError(f"plugin module {module!r} failed to import: {_first_line(err)}; fix the module "
                         "or install what it needs") from None
    except Exception as err:  # noqa: BLE001 - the user's module may fail in any way while it runs
        raise InputError(f"plugin module {module!r} failed to import: {_first_line(err)}; fix the module"
                         ) from None


def load_plugins(modules: Iterable[str]) -> None:
    """load_plugin for each module, in order."""
    for module in modules:
        load_plugin(module)


def load_factory(spec: str) -> Callable:
    """The attribute `factory` (dotted for a nested one) of module `module`, from "module:factory"."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise InputError(f"{spec!r} is not of the form MODULE:FACTORY (e.g. my_priors:make_prior)")
    value = load_plugin(module)
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise InputError(f"plugin module {module!r} has no attribute {attribute!r}; check the name "
                             f"after ':' in {spec!r}")
        value = getattr(value, part)
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
