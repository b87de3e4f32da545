"""The joint head-group search's settings: a light, frozen value (no torch) that configs and shards carry before
anything heavy is imported. The search itself is `study.core.joint`."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field, model_validator

from study.core.ablation import DEFAULT_OP, SCORING_EPS, Op, check_eps
from study.core.frozen import Frozen
from study.core.subspace import SubspaceSpec


class Objective(str, enum.Enum):
    SUBSPACE = "subspace"  # Sahara's: the change of the hidden-state subspace (generalized Ships)
    REFUSAL = "refusal"  # the drop of the model's probability of its own refusals' openings


class JointSettings(Frozen):
    """One optimisation of every head's gate: what it maximises, how the gates are penalised, how it moves."""

    objective: Objective = Objective.REFUSAL
    op: Op = DEFAULT_OP
    eps: float = SCORING_EPS
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=0.1, gt=0)
    l1: float = Field(default=0.01, ge=0)  # per unit of gate (l1) or per expected open gate (hard_concrete)
    sparsity: Literal["l1", "hard_concrete"] = "l1"
    init: float = Field(default=0.1, gt=0, lt=1)  # every gate's start, before the seed's jitter
    jitter: float = Field(default=0.1, ge=0)  # std of the seed's noise on the gates' logits
    seed: int = 0
    subspace: SubspaceSpec = Field(default_factory=SubspaceSpec.paper)
    batch_prompts: int | None = Field(default=None, ge=1)  # prompts per forward pass (None: all); same gradient

    @model_validator(mode="after")
    def _checked(self) -> "JointSettings":
        check_eps(self.op, self.eps)
        return self


class JointState(Frozen):
    """Where a search stands after `step` steps: enough to go on from there and end bit for bit where one
    uninterrupted search would (the gates' logits, Adam's moments, the random generator's state), so a long search
    runs as a chain of shards that shows progress and resumes mid-way. `prompts` / `targets`: the refusal
    objective's kept prompts (indices into the block) and their answer openings, carried so that a later link
    neither generates nor judges again."""

    step: int = Field(ge=1)
    theta: tuple[float, ...]  # (layers * heads) the gates' logits
    adam_m: tuple[float, ...]  # (layers * heads) Adam's first moment
    adam_v: tuple[float, ...]  # (layers * heads) Adam's second moment
    rng: str  # base64 of the torch generator's state (hard-concrete noise draws from it)
    prompts: tuple[int, ...] | None = None
    targets: tuple[tuple[int, ...], ...] | None = None

    @model_validator(mode="after")
    def _shaped(self) -> "JointState":
        if not len(self.theta) == len(self.adam_m) == len(self.adam_v):
            raise ValueError("a joint search's state needs one logit and two moments per head")
        if (self.prompts is None) != (self.targets is None) or \
                (self.prompts is not None and len(self.prompts) != len(self.targets)):
            raise ValueError("a joint search's state carries its kept prompts and their targets together")
        return self
