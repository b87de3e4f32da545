"""Decoding settings (greedy, top-k sampling), their presets, per-sample seeds and the token choice itself."""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from study.core.errors import UsageError

if TYPE_CHECKING:
    import torch


DEFAULT_MAX_NEW_TOKENS = 128  # the paper's setting


class Strategy(str, enum.Enum):
    GREEDY = "greedy"
    TOPK = "topk"


class Decoding(BaseModel):
    """How tokens are chosen; stored with every generation (a generation is reproducible from it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = Strategy.GREEDY
    top_k: int = Field(default=5, ge=1)  # topk only
    temperature: float = Field(default=1.0, gt=0)  # topk only
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    samples: int = Field(default=1, ge=1)  # generations per (prompt, ablation); greedy needs only one
    seed: int = 0

    @property
    def label(self) -> str:
        """What the tables' `decoding` column says: `greedy` or `topk5-t1`."""
        if self.strategy is Strategy.GREEDY:
            return "greedy"
        return f"topk{self.top_k}-t{self.temperature:g}"

    @property
    def sampled(self) -> bool:
        return self.strategy is not Strategy.GREEDY


PRESETS = {"greedy": Decoding(), "topk": Decoding(strategy=Strategy.TOPK, top_k=5, temperature=1.0)}


def parse_decoding(name: str, **settings: Any) -> Decoding:
    """A preset by name (`greedy`, `topk`: k = 5, temperature 1) with settings (max_new_tokens, samples...)."""
    if name not in PRESETS:
        raise UsageError(f"unknown decoding {name!r}: valid decodings are {', '.join(PRESETS)}")
    values = {**PRESETS[name].model_dump(), **{k: v for k, v in settings.items() if v is not None}}
    if values["strategy"] == Strategy.GREEDY and values["samples"] > 1:
        raise UsageError(f"greedy decoding gives one text per prompt: samples {values['samples']} needs --decoding topk")
    return Decoding(**values)


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one (prompt, sample): stable across shard layouts, batch sizes and backends."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def choose_tokens(logits: "torch.Tensor", decoding: Decoding, generators: Sequence["torch.Generator"]) -> "torch.Tensor":
    """(rows,) next tokens from (rows, vocab) logits: argmax, or top-k sampling with each row's generator."""
    import torch

    if not decoding.sampled:
        return logits.argmax(dim=-1)
    values, index = (logits.float() / decoding.temperature).topk(decoding.top_k, dim=-1)  # (rows, k)
    probs = torch.softmax(values, dim=-1).cpu()
    picks = [int(torch.multinomial(probs[r], 1, generator=generators[r])) for r in range(len(generators))]
    return index.gather(1, torch.tensor(picks, device=index.device)[:, None])[:, 0]
