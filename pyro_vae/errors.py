"""The one exception type for bad user input: the CLI turns it into one line on stderr and exit 2."""


class InputError(ValueError):
    """Bad input from the user (a flag, a config file, a dataset, a run directory).

    The message says what was wrong and what to do; it is printed as one line, without a traceback.
    """


class TrainingError(RuntimeError):
    """Training could not go on (interrupted, or a numerical fault); the run directory keeps the
    last good checkpoint and the message says how to continue."""
