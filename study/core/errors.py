"""The one exception type for bad user input.

A `UsageError` (deliberately not a ValueError, so pydantic validators let it through unwrapped) message is a single line naming the bad value and what would be valid; the CLI prints it
and exits with code 2. Anything else escaping is a bug, not a user mistake.
"""


class UsageError(Exception):
    """Bad user input (model, prompts, column, head label, operator, eps, config key)."""
