"""The utility experiment: what removing the safety heads costs the model on ordinary text.

Perplexity on benign passages (the `utility` table) for the normal model, the heads studied (given, or this
run's Sahara group prefixes) and seeded random head sets of the same sizes, in shards like every other
measure. Over-refusal of the same ablations is in the `asr` table's benign rows. The paper also reports
lm-eval zero-shot accuracy (BoolQ, RTE, WinoGrande, ARC-Challenge, OpenBookQA): with `lm_eval_tasks` the job
adds an lm-eval shard per head set (study.generation.lm_eval), run by the model's worker and kept like every
shard, checked at plan time, each failure an error row.
Light at import (no torch).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from study.core.heads import parse_heads
from study.experiments.asr import Arm, dataset_arms
from study.experiments.base import Job, ScanConfig, ScanJob, _head_labels, require_source
from study.experiments.sahara import SaharaJob
from study.generation.lm_eval import LmEvalResult, check_tasks, tasks_digest
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import EvalShard, Shard, blocks

log = logging.getLogger(__name__)


class UtilityConfig(ScanConfig):
    """What the ablations studied cost: perplexity on benign text (default: the paragraphs shipped with the
    project; `prompts: FILE.txt` for your own, one passage per line) for the normal model, `heads` or this
    run's Sahara prefixes, and random controls; optionally the paper's lm-eval zero-shot tasks (built-in names,
    or tasks defined by the YAML files of `lm_eval_include`)."""

    prompts: str = "builtin:text"
    heads: str | None = None
    k: int | None = Field(default=None, ge=1)  # Sahara prefixes of size 1..k (default all steps)
    random_controls: int = Field(default=0, ge=0)
    seed: int = 0
    lm_eval_tasks: list[str] = Field(default_factory=list)  # e.g. boolq, rte, winogrande, arc_challenge, openbookqa
    lm_eval_include: str | None = None  # a folder of lm-eval task YAMLs (your own tasks, local data)
    lm_eval_limit: int | None = Field(default=None, ge=1)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str | None) -> str | None:
        return _head_labels(v)


class UtilityJob(ScanJob):
    """NLL shards for every arm (one round, after this run's Sahara group where the heads come from it)."""

    experiment = "utility"
    cfg: UtilityConfig

    def __init__(self, cfg: UtilityConfig, out: Path) -> None:
        super().__init__(cfg, out)
        self.arms: list[Arm] | None = None
        self.source: SaharaJob | None = None
        self.results: Outcome | None = None
        self.lm_eval = LmEvalResult()
        self._round: list[Shard | EvalShard] = []
        self._tasks_digest: str | None = None
        if cfg.lm_eval_tasks:
            check_tasks(cfg.lm_eval_tasks, cfg.lm_eval_include, f"utility on {cfg.model!r}")
            self._tasks_digest = tasks_digest(cfg.lm_eval_tasks, cfg.lm_eval_include)
        if cfg.heads is not None:
            heads = parse_heads(cfg.heads)
            self.ablation(heads).check(self.shape)
            self.arms = dataset_arms([("heads", heads)], self, cfg.random_controls, cfg.seed)

    def link(self, jobs: Sequence[Job]) -> None:
        if self.arms is not None:
            return
        self.source = require_source(jobs, "sahara", self.cfg, (
            f"utility on {self.cfg.model!r} has no heads to remove: give heads, or add a sahara section (its "
            f"group's prefixes are measured)"))

    @property
    def done(self) -> bool:
        return self.results is not None

    def pending(self) -> list[Shard | EvalShard]:
        if self.done:
            return []
        if self.arms is None:
            if not self.source.done:
                return []
            group = tuple(self.source.group)
            size = min(self.cfg.k or len(group), len(group))
            self.arms = dataset_arms([("sahara", group[:s]) for s in range(1, size + 1)], self,
                                     self.cfg.random_controls, self.cfg.seed)
        ablations = tuple(a.ablation for a in self.arms)
        self._round = [Shard(model=self.model, prompts=self.block(slice(p0, p0 + self.cfg.shard_prompts)),
                             ablations=tuple(abl), measure="nll")
                       for p0 in range(0, len(self.prompts), self.cfg.shard_prompts)
                       for abl in blocks(ablations, self.cfg.shard_heads)]
        if self.cfg.lm_eval_tasks:  # the normal model and each head set found (not the random controls)
            c = self.cfg
            self._round += [EvalShard(model=self.model, ablations=(a.ablation,), tasks=tuple(c.lm_eval_tasks),
                                      include=None if c.lm_eval_include is None
                                      else str(Path(c.lm_eval_include).resolve()),  # as an actor sees it
                                      tasks_digest=self._tasks_digest,
                                      limit=c.lm_eval_limit) for a in self.arms if a.condition != "random"]
        return self._round

    def absorb(self, outcome: Outcome) -> None:
        if self._round:
            self.results = outcome
            for shard in self._round:
                if isinstance(shard, EvalShard):
                    self.lm_eval.add(outcome.table(shard))

    def plan_line(self, shards: Sequence[Shard | EvalShard], have: int) -> str:
        head = f"  utility {self.cfg.model}: {len(self.prompts)} passages of {self.prompts.name}"
        if self.arms is None:
            return f"{head}, heads from this run's Sahara group once it is done"
        evals = [s for s in shards if isinstance(s, EvalShard)]
        tasks = f", {len(evals)} lm-eval shards ({len(self.cfg.lm_eval_tasks)} tasks each)" if evals else ""
        return (f"{head} x {len(self.arms)} conditions: {len(shards) - len(evals)} shards "
                f"({sum(s.rows for s in shards if isinstance(s, Shard))} passage forwards){tasks}, {have} already "
                f"done")

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        nll: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for shard in self._round:
            if isinstance(shard, EvalShard):
                continue
            for r in self.results.table(shard).to_pylist():
                nll[r["ablation"]] = nll.get(r["ablation"], 0.0) + r["nll"]
                tokens[r["ablation"]] = tokens.get(r["ablation"], 0) + r["n_tokens"]
        meta = self.meta_values(run_id)
        rows = []
        normal = {}
        for arm in self.arms:
            values = {"perplexity": (math.exp(nll[arm.label] / tokens[arm.label]), tokens[arm.label])}
            values.update(self.lm_eval.values.get(arm.label, {}))
            cells = [(metric, value, n, None) for metric, (value, n) in values.items()]
            cells += [(f"lm_eval:{task}", None, 0, msg) for task, msg in self.lm_eval.errors.get(arm.label, {}).items()]
            for metric, value, n, error in cells:
                if arm.condition == "normal" and value is not None:
                    normal[metric] = value
                base = normal.get(metric)
                rows.append(dict(meta, condition=arm.condition, group_size=arm.group_size, draw=arm.draw,
                                 ablation=arm.label, op=self.cfg.op.value, eps=self.cfg.eps, metric=metric,
                                 value=value, n=n, ratio=None if not base or value is None else value / base,
                                 error=error))
        return {"utility": make_table("utility", rows)}

    def record(self) -> dict[str, Any]:
        out = {**super().record(), "prompts_file_sha256": self.prompts.source_sha256}
        if self.cfg.lm_eval_tasks:
            out["lm_eval"] = self.lm_eval.record(self.cfg.lm_eval_tasks)
        return out

