"""Dataset-level attribution: generalized Ships for every head, then the Sahara greedy group search
(`generalized_ships` is its first step alone). Config and job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from study.core.errors import UsageError
from study.core.heads import Head
from study.core.ranking import rank_desc
from study.core.search import GreedySearch, Step
from study.core.subspace import SubspaceSpec
from study.experiments.base import ScanJob, ScreenedScanConfig
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import ModelRef, Shard, blocks

log = logging.getLogger(__name__)


class SaharaConfig(ScreenedScanConfig):
    """Dataset-level attribution: generalized Ships per head, then the greedy Sahara search."""

    steps: int = Field(default=3, ge=1)
    rank: int = Field(default=1, ge=1)
    subspace: Literal["left", "right"] = "left"
    center: bool = False
    min_gain: float | None = None  # stop when the best score gains less than this (degrees)

    @property
    def subspace_spec(self) -> SubspaceSpec:
        return SubspaceSpec(rank=self.rank, side=self.subspace, center=self.center)


class SaharaJob(ScanJob):
    """Generalized Ships per head (step 1) and the greedy Sahara search, one round per step."""

    experiment = "sahara"
    cfg: SaharaConfig

    def __init__(self, cfg: SaharaConfig, out: Path) -> None:
        super().__init__(cfg, out)
        if cfg.rank > len(self.prompts) and cfg.subspace == "left":
            raise UsageError(f"sahara: subspace rank {cfg.rank} needs at least {cfg.rank} prompts, "
                             f"got {len(self.prompts)} from {self.prompts.name!r}")
        self.search = GreedySearch(self.heads, cfg.steps, min_gain=cfg.min_gain)
        self._round: list[Shard] = []
        self._screened: dict[str, float] | None = None  # screening: this step's low-precision scores

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def steps(self) -> list[Step]:
        return self.search.steps

    @property
    def group(self) -> tuple[Head, ...]:
        return self.search.group

    @property
    def round_label(self) -> str:
        screening = self.cfg.screen and self._screened is None
        return f"sahara step {len(self.steps) + 1}" + (f" ({self.cfg.screen} screen)" if screening else "")

    def pending(self) -> list[Shard]:
        """This step's candidates; screened: first all of them on the low-precision copy, then the top
        `verify_top` by that screen at the model's own dtype."""
        if self.done:
            return []
        group, cands = self.search.request()
        base = self.ablation(group)
        ablations = [base.with_head(h) for h in cands]
        model = self.model
        if self.cfg.screen and self._screened is None:
            model = self.screen_model
        elif self.cfg.screen:
            order = np.argsort([-self._screened[a.label] for a in ablations], kind="stable")
            ablations = [ablations[i] for i in order[:self.cfg.verify_top]]
        self._round = [Shard(model=model, prompts=self.block(), ablations=tuple(abl), base=base, measure="angle",
                             subspace=self.cfg.subspace_spec)
                       for abl in blocks(ablations, self.cfg.shard_heads)]
        return self._round

    def expected(self) -> dict[tuple[ModelRef, str], int]:
        """The later steps' candidates (one fewer each step) on every prompt; the current step is queued."""
        n, first = len(self.heads), len(self.steps) + 1
        rows = sum((n - s) * len(self.prompts) for s in range(first, self.cfg.steps))
        return {(self.model, "row"): rows} if rows and not self.done else {}

    def absorb(self, outcome: Outcome) -> None:
        scores: dict[str, float] = {}
        for shard in self._round:
            t = outcome.table(shard)
            scores.update(zip(t["ablation"].to_pylist(), t["score"].to_pylist()))
        if self.cfg.screen and self._screened is None:
            self._screened = scores  # the exact round of this step comes next
            return
        group, cands = self.search.request()
        labels = [self.ablation(group).with_head(h).label for h in cands]
        if self.cfg.screen:
            merged = [scores.get(lab, self._screened[lab]) for lab in labels]
            step = self.search.submit(merged, [lab in scores for lab in labels])
            self._screened = None
        else:
            step = self.search.submit([scores[lab] for lab in labels])
        log.info("sahara %s step %d: + %s (%.4f deg)", self.cfg.model, step.step, step.chosen.label, step.best)

    def _subspace_columns(self, n: int) -> dict[str, list]:
        c = self.cfg
        return dict(op=[c.op.value] * n, eps=[c.eps] * n, subspace=[c.subspace] * n, rank_r=[c.rank] * n,
                    centered=[c.center] * n)

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        first = self.steps[0]
        n = len(first.candidates)
        rank = rank_desc(first.scores)
        cols = self.meta(run_id, n)
        cols.update(layer=[h.layer for h in first.candidates], head=[h.head for h in first.candidates],
                    head_label=[h.label for h in first.candidates], **self._subspace_columns(n),
                    angle_deg=list(first.scores), rank=rank.tolist(), exact=self._exact(first))
        rows: dict[str, Any] = self.meta(run_id, sum(len(st.candidates) for st in self.steps))
        for st in self.steps:
            m = len(st.candidates)
            part = dict(self._subspace_columns(m), step=[st.step] * m, layer=[h.layer for h in st.candidates],
                        head=[h.head for h in st.candidates], head_label=[h.label for h in st.candidates],
                        group=[[h.label for h in st.group]] * m, score=list(st.scores),
                        chosen=[h == st.chosen for h in st.candidates], exact=self._exact(st))
            for k, v in part.items():
                rows.setdefault(k, []).extend(v)
        return {"head_scores": make_table("head_scores", cols), "sahara": make_table("sahara", rows)}

    @staticmethod
    def _exact(step: Step) -> list[bool]:
        return [True] * len(step.scores) if step.exact is None else list(step.exact)

    def summary(self) -> dict[str, Any]:
        return {"sahara_group": [h.label for h in self.group],
                "sahara_scores": [round(s.best, 6) for s in self.steps]}


class GeneralizedShipsJob(SaharaJob):
    """Generalized Ships of every head (Sahara's first step) without the search: the `head_scores` table."""

    experiment = "generalized_ships"

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        return {"head_scores": super().tables(run_id)["head_scores"]}

    def summary(self) -> dict[str, Any]:
        return {}
