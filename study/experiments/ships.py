"""Query-level Ships: KL(normal || head ablated) for every prompt and head, and its benign counterpart
(`specificity`). Config and job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from study.core.ablation import Ablation
from study.core.ranking import rank_desc, top_union
from study.experiments.base import ScanJob, ScreenedScanConfig
from study.runtime.columns import constant, pick
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import ModelRef, Shard, blocks

log = logging.getLogger(__name__)


class ShipsConfig(ScreenedScanConfig):
    """Query-level Ships: KL(normal || head ablated) per prompt and head."""

    top: int = Field(default=5, ge=1)  # heads printed per prompt


class SpecificityConfig(ShipsConfig):
    """Ships on benign prompts in the same format, so each head's harmful score can be set against it."""

    prompts: str = "builtin:benign"


class ShipsJob(ScanJob):
    """Query-level Ships: every head on every prompt, in shards of heads x prompts.

    Screened (`screen`): a first round scores every head on a low-precision copy of the model (another
    `ModelRef` dtype, so its own shards, ids and workers), a second re-scores the union of each prompt's top
    `verify_top` heads at the model's own dtype; the table marks which rows are exact."""

    experiment = "ships"
    cfg: ShipsConfig

    def __init__(self, cfg: ShipsConfig, out: Path) -> None:
        super().__init__(cfg, out)
        self.results: Outcome | None = None
        self.screened: Outcome | None = None
        ablations = [self.ablation((h,)) for h in self.heads]
        if cfg.screen:
            self.screen_shards = self._shards(self.screen_model, ablations)
            self.shards: list[Shard] = []  # the exact round, once the screen says which heads
        else:
            self.screen_shards = []
            self.shards = self._shards(self.model, ablations)

    def _shards(self, model: ModelRef, ablations: Sequence[Ablation]) -> list[Shard]:
        n, c = len(self.prompts), self.cfg
        return [Shard(model=model, prompts=self.block(slice(p0, p0 + c.shard_prompts)), ablations=tuple(abl),
                      measure="kl")
                for p0 in range(0, n, c.shard_prompts) for abl in blocks(ablations, c.shard_heads)]

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def round_label(self) -> str:
        screening = self.cfg.screen and self.screened is None
        return self.experiment + (f" ({self.cfg.screen} screen)" if screening else "")

    def pending(self) -> list[Shard]:
        if self.done:
            return []
        return self.screen_shards if self.cfg.screen and self.screened is None else self.shards

    def absorb(self, outcome: Outcome) -> None:
        if self.cfg.screen and self.screened is None:
            self.screened = outcome
            screen_kl = self._matrix(self.screen_shards, outcome)  # (prompts, heads)
            verified = top_union(screen_kl, self.cfg.verify_top).tolist()  # head indices
            self.shards = self._shards(self.model, [self.ablation((self.heads[i],)) for i in verified])
            log.info("%s %s: screened %d heads in %s, re-scoring %d exactly", self.experiment, self.model.label,
                     len(self.heads), self.cfg.screen, len(verified))
            return
        self.results = outcome

    def _matrix(self, shards: Sequence[Shard], outcome: Outcome) -> np.ndarray:
        """(prompts, heads) float64 KL from the shards' rows; NaN where no shard scored the pair."""
        p_index = {p.id: i for i, p in enumerate(self.prompts.prompts)}
        h_index = {self.ablation((h,)).label: i for i, h in enumerate(self.heads)}
        kl = np.full((len(self.prompts), len(self.heads)), np.nan)
        for shard in shards:
            t = outcome.table(shard)
            rows = [p_index[p] for p in t["prompt_id"].to_pylist()]
            cols = [h_index[a] for a in t["ablation"].to_pylist()]
            kl[rows, cols] = t["kl"].to_numpy()
        return kl

    def kl_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompts, heads) float64 KL in prompt and head order, and (prompts, heads) bool: which are exact."""
        kl = self._matrix(self.shards, self.results)
        exact = ~np.isnan(kl)
        if self.cfg.screen:
            kl = np.where(exact, kl, self._matrix(self.screen_shards, self.screened))
        if np.isnan(kl).any():
            raise RuntimeError("ships: some (prompt, head) scores are missing from the shards")
        return kl, exact

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        kl, exact = self.kl_matrix()  # (prompts, heads)
        rank = rank_desc(kl)  # (prompts, heads), 1 = largest KL
        heads, prompts = self.heads, list(self.prompts.prompts)
        n_p, n_h = kl.shape
        n = kl.size
        by_prompt = np.repeat(np.arange(n_p), n_h)  # (prompts * heads,) row -> its prompt
        by_head = np.tile(np.arange(n_h), n_p)  # (prompts * heads,) row -> its head
        cols = self.meta(run_id, n)
        cols.update(prompt_id=pick([p.id for p in prompts], by_prompt),
                    prompt=pick([p.text for p in prompts], by_prompt),
                    layer=np.array([h.layer for h in heads], np.int32)[by_head],
                    head=np.array([h.head for h in heads], np.int32)[by_head],
                    head_label=pick([h.label for h in heads], by_head), op=constant(self.cfg.op.value, n),
                    eps=np.full(n, self.cfg.eps), kl=kl.reshape(-1), rank=rank.reshape(-1).astype(np.int32),
                    exact=exact.reshape(-1))
        return {"ships": make_table("ships", cols)}


class SpecificityJob(ShipsJob):
    """Ships on benign prompts: rows of the `ships` table the analysis sets against the harmful ones."""

    experiment = "specificity"
