"""`Head`: one query head of one layer, printed and parsed as `L{layer}H{head}` (zero-indexed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from study.core.errors import UsageError

_LABEL = re.compile(r"^L(\d+)H(\d+)$")


@dataclass(frozen=True, order=True)
class Head:
    layer: int
    head: int

    def __post_init__(self) -> None:
        if self.layer < 0 or self.head < 0:
            raise UsageError(f"head indices must be >= 0, got layer={self.layer} head={self.head}")

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str) -> "Head":
        m = _LABEL.match(text.strip())
        if not m:
            raise UsageError(f"bad head label {text!r}: expected L<layer>H<head> (zero-based), e.g. L18H8")
        return cls(int(m.group(1)), int(m.group(2)))

    def check(self, n_layers: int, n_heads: int) -> "Head":
        """Raise a `UsageError` unless the head exists in a model of this shape."""
        if self.layer >= n_layers or self.head >= n_heads:
            raise UsageError(
                f"head {self.label} is out of range: the model has layers 0..{n_layers - 1} "
                f"and heads 0..{n_heads - 1}"
            )
        return self


def parse_heads(text: str) -> tuple[Head, ...]:
    """Parse `L2H26,L3H8` (commas and/or spaces) into sorted unique heads."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise UsageError("empty head list: expected labels like L18H8,L7H2")
    return tuple(sorted({Head.parse(p) for p in parts}))


def all_heads(n_layers: int, n_heads: int) -> list[Head]:
    return [Head(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def labels(heads: Iterable[Head]) -> list[str]:
    return [h.label for h in heads]
