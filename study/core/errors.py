"""The exception types the CLI turns into one line: bad user input (exit code 2), a run that could not finish (1).

A `UsageError` (deliberately not a ValueError, so pydantic validators let it through unwrapped) message is a single line naming the bad value and what would be valid; the CLI prints it
and exits with code 2. Anything else escaping is a bug, not a user mistake.
"""


class UsageError(Exception):
    """Bad user input (model, prompts, column, head label, operator, eps, config key)."""


class DonorError(RuntimeError):
    """A hosted head recipe's donor slices could not be read: that recipe's model fails, not the model hosting it."""


class RunFailed(Exception):
    """A run that ended without some of its results (a model that could not be loaded); the others were written.
    One line naming what failed and why; the CLI exits with code 1."""


def one_line(err: BaseException) -> str:
    """`Type: first line of the message` (or the type alone): how a caught failure is named in one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
