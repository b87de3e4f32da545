"""Which subspace of the (prompts x d_model) hidden-state matrix generalized Ships compares: a light value
(no torch), so shards and configs carry it before anything heavy is imported."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from study.core.frozen import Frozen


class SubspaceSpec(Frozen):
    """Which subspace of the (prompts × d_model) hidden-state matrix generalized Ships compares.

    `left`: top-r left singular vectors (directions in prompt space, the paper's choice);
    `right`: top-r right singular vectors (directions in hidden space, a "refusal subspace").
    `center` subtracts the mean over prompts before the SVD.
    """

    rank: int = Field(default=1, ge=1)
    side: Literal["left", "right"] = "left"
    center: bool = False

    @classmethod
    def paper(cls) -> "SubspaceSpec":
        """The paper and authors' code: left singular space, r = 1, uncentred."""
        return cls(rank=1, side="left", center=False)
