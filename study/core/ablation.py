"""The ablation value: which heads, which operator, which eps. Light (no torch), so specs and plans can be
validated and hashed anywhere; the torch side (hooks, weight edits) lives in `study.core.interventions`.
"""

from __future__ import annotations

import enum
import math

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from study.core.errors import UsageError
from study.core.heads import Head
from study.core.shape import ModelShape, Site


class Op(str, enum.Enum):
    UNDIFF_Q = "undiff_q"  # scale the head's queries: attention becomes uniform (the paper's main operator)
    UNDIFF_K = "undiff_k"  # scale the head's keys (a whole KV group under GQA, so refused there)
    SCALE_V = "scale_v"  # scale the head's output (softmax . V), i.e. its o_proj input slice
    MEAN = "mean"  # replace the head's queries by the mean over the layer's heads


SITE_OF = {Op.UNDIFF_Q: Site.Q, Op.UNDIFF_K: Site.K, Op.SCALE_V: Site.O_IN, Op.MEAN: Site.Q}
SCALING_OPS = (Op.UNDIFF_Q, Op.UNDIFF_K, Op.SCALE_V)
DEFAULT_OP = Op.UNDIFF_Q
SCORING_EPS = 1e-5  # the paper's eps for Ships and Sahara
SURGERY_EPS = 1e-10  # the paper's eps for a saved ablated checkpoint


def parse_op(name: str) -> Op:
    try:
        return Op(name)
    except ValueError:
        raise UsageError(f"unknown operator {name!r}: valid operators are {', '.join(o.value for o in Op)}") from None


def check_eps(op: Op, eps: float) -> float:
    if op in SCALING_OPS and not (0.0 < eps < 1.0 and math.isfinite(eps)):
        raise UsageError(f"eps {eps!r} is invalid for {op.value}: scaling operators need 0 < eps < 1")
    return float(eps)


class Ablation(BaseModel):
    """A set of heads and one operator with its eps. The empty set is the normal model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    heads: tuple[Head, ...] = ()
    op: Op = DEFAULT_OP
    eps: float = SCORING_EPS

    @field_validator("heads")
    @classmethod
    def _sorted_unique(cls, heads: tuple[Head, ...]) -> tuple[Head, ...]:
        return tuple(sorted(set(heads)))

    @model_validator(mode="after")
    def _eps_valid(self) -> "Ablation":
        check_eps(self.op, self.eps)
        return self

    @property
    def site(self) -> Site:
        return SITE_OF[self.op]

    @property
    def label(self) -> str:
        if not self.heads:
            return "none"
        return f"{self.op.value}:{self.eps:g}:{','.join(h.label for h in self.heads)}"

    def with_head(self, head: Head) -> "Ablation":
        return Ablation(heads=self.heads + (head,), op=self.op, eps=self.eps)

    def check(self, shape: ModelShape) -> "Ablation":
        """Validate against a model's shape: heads in range, and no silent GQA group ablation for keys."""
        s = shape
        for h in self.heads:
            h.check(s.n_layers, s.n_heads)
        if self.op is Op.UNDIFF_K and self.heads and s.n_kv_heads != s.n_heads:
            group = s.n_heads // s.n_kv_heads
            raise UsageError(
                f"undiff_k is ambiguous under GQA: this model shares each key head among {group} query heads "
                f"({s.n_heads} query heads, {s.n_kv_heads} key heads); use undiff_q, scale_v or mean"
            )
        return self
