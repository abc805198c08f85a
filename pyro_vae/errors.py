"""The one exception type for bad user input: the CLI turns it into one line on stderr and exit 2."""

import sys
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user (a flag, a config file, a dataset, a run directory).

    The message says what was wrong and what to do; it is printed as one line, without a traceback.
    """


class TrainingError(RuntimeError):
    """Training could not go on (interrupted, or a numerical fault); the run directory keeps the
    last good checkpoint and the message says how to continue."""


def exit_if_command_interrupted() -> None:
    """Ctrl-C arrived while the package was being imported (torch and Pyro take seconds): in the
    `pyro-vae` command (its console script, or python -m pyro_vae) end as the command ends on Ctrl-C,
    one line and exit code 130; anywhere else return, and the caller re-raises the KeyboardInterrupt."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    if Path(sys.argv[0]).stem == "pyro-vae" or module == "pyro_vae":
        print("pyro-vae: interrupted", file=sys.stderr)
        raise SystemExit(130)
