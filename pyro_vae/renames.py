"""Old names that still work: command-line flags and keyword arguments renamed to one rule, each
accepted under its old name with one line saying the new one.

The rule for sample counts: `--particles` (`particles`) counts the samples of z per example inside an
objective being trained or compared; `--eval-k` (`eval_k`) counts the importance samples per example
that evaluate log p(x) (or log p(x | c)).
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: the function also takes each old keyword (`k="eval_k"`: k=... is eval_k=...), with a
    DeprecationWarning naming the new one; a TypeError if both names are given."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; pass {new}= only")
                warnings.warn(f"{fn.__name__}(): the keyword {old}= is renamed {new}=; {old}= will go",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


class RenamedFlag(argparse.Action):
    """An old flag that still works: it stores into the new flag's destination and says once, on stderr,
    that the flag is renamed (once per parser: `pyro-vae` builds one per call); `--help` does not list
    it (add_renamed_flag)."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.said = False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if not self.said:
            print(f"{parser.prog.split()[0]}: warning: {option_string} is renamed {self.new}; "
                  f"{option_string} will go", file=sys.stderr)
            self.said = True
        setattr(namespace, self.dest, values)


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept `old` as the flag `new` of `parser`, hidden from --help; `kwargs` (type, nargs) as `new`'s."""
    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), default=argparse.SUPPRESS,
                        action=RenamedFlag, new=new, help=argparse.SUPPRESS, **kwargs)
