"""The one base of every frozen, typed configuration (`extra="forbid"`), and `build`, which turns a
pydantic error into one `UsageError` line naming the bad key and the valid ones.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from study.core.errors import UsageError


class Frozen(BaseModel):
    """Immutable (hashable, safe to share between jobs and shards) and strict: an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def build(cls: type[Frozen], values: dict[str, Any], where: str = "") -> Any:
    """Construct a config, turning a pydantic error into one `UsageError` line naming key and valid keys."""
    prefix = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise UsageError(f"{prefix}expected a mapping of keys, got {type(values).__name__}")
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            raise UsageError(f"{prefix}unknown config key {key!r}: valid keys are {valid}") from None
        raise UsageError(f"{prefix}bad value for {key!r} ({first.get('input')!r}): {first['msg']}") from None
