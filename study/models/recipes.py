"""Base-weight swap recipes as values: which model is loaded, which part comes from the other.

Light (no torch): a `Swap` travels inside a shard's `ModelRef`, so a mixed model has its own shard ids and the
experiments that score or generate need no swap code. A whole-module recipe is one more model to the executors (its
own pool); a head recipe runs on the worker of the model it writes into (`ModelRef.host`), as a scoped edit.
The weights are mixed by `study.models.mixing` in the worker.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, field_validator

from study.core.errors import UsageError
from study.core.heads import Head


class Recipe(str, enum.Enum):
    """What the mixed model takes from where (`aligned` and `base` are the two unmixed references)."""

    ALIGNED = "aligned"
    BASE = "base"
    ATTN_FROM_BASE = "attn-from-base"  # the paper's Fig. 6a: every attention module from the base
    MLP_FROM_BASE = "mlp-from-base"
    HEADS_FROM_BASE = "heads-from-base"  # only the safety heads' q/k/v/o slices from the base
    HEADS_INTO_BASE = "heads-into-base"  # the aligned model's safety heads transplanted into the base

    @property
    def mixed(self) -> bool:
        return self not in (Recipe.ALIGNED, Recipe.BASE)

    @property
    def needs_heads(self) -> bool:
        return self in (Recipe.HEADS_FROM_BASE, Recipe.HEADS_INTO_BASE)

    @property
    def target_is_base(self) -> bool:
        """Whether the loaded model (the one receiving weights) is the base."""
        return self is Recipe.HEADS_INTO_BASE


MIXED_RECIPES = tuple(r for r in Recipe if r.mixed)


def parse_recipe(name: str) -> Recipe:
    try:
        return Recipe(name)
    except ValueError:
        raise UsageError(f"unknown swap recipe {name!r}: valid recipes are "
                         f"{', '.join(r.value for r in MIXED_RECIPES)}") from None


class Swap(BaseModel):
    """A mixed model: `recipe` applied between `aligned` and `base` (names as the user gave them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: Recipe
    aligned: str
    base: str
    base_revision: str | None = None
    heads: tuple[Head, ...] = ()
    base_fingerprint: str | None = None  # the base's content identity (study.models.fingerprint)

    @field_validator("heads")
    @classmethod
    def _sorted_unique(cls, heads: tuple[Head, ...]) -> tuple[Head, ...]:
        return tuple(sorted(set(heads)))

    def model_post_init(self, _: object) -> None:
        if not self.recipe.mixed:
            raise ValueError(f"recipe {self.recipe.value} is an unmixed model, not a swap")
        if self.recipe.needs_heads and not self.heads:
            raise UsageError(f"swap recipe {self.recipe.value} needs the safety heads to move")

    @property
    def label(self) -> str:
        heads = f"[{','.join(h.label for h in self.heads)}]" if self.recipe.needs_heads else ""
        return f"{self.recipe.value}{heads}"
