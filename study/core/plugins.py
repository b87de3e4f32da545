"""Implementations found by name through entry points (`pyproject.toml`), so that a layer can use what a
higher one or another package provides (the Ray executor, the vLLM backend) without importing it.

Listing names reads installed metadata only; an implementation is imported when it is first asked for.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any

from study.core.errors import UsageError

EXECUTORS = "headstudy.executors"
GENERATION_BACKENDS = "headstudy.generation_backends"


@cache
def _entries(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(group: str) -> tuple[str, ...]:
    """The names installed for `group` (sorted)."""
    return tuple(sorted(_entries(group)))


def check(group: str, name: str, what: str) -> str:
    """`name` when something is installed under it, else one line naming the installed ones."""
    if name not in _entries(group):
        valid = ", ".join(names(group)) or "none (is headstudy installed? pip install -e . registers them)"
        raise UsageError(f"unknown {what} {name!r}: valid {what}s are {valid}")
    return name


def module_of(group: str, name: str) -> str:
    """The module an entry point names (read from metadata, nothing imported)."""
    return _entries(group)[name].module


def load(group: str, name: str, what: str, hint: str = "") -> Any:
    """The object registered as `name`, imported now; a missing dependency is one line with `hint`."""
    check(group, name, what)
    try:
        return _entries(group)[name].load()
    except ImportError as err:
        raise UsageError(f"{what} {name!r} is not installed ({err}){': ' + hint if hint else ''}") from err
