"""The joint head-group search as an experiment: every head's gate optimised at once (`study.core.joint`), a
chain of shards per seed on the model's worker, the group read from the top gates of the seed whose group does most.

Beside Sahara (one head at a time, a forward pass per candidate), on the same prompts with the same operator; the
group it writes is read like a Sahara group by `asr` and `swap` (their `search: joint`) and by the report.
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
from study.core.joint_spec import JointSettings, JointState, Objective
from study.core.subspace import SubspaceSpec
from study.experiments.base import ScanConfig, ScanJob
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import JointShard

log = logging.getLogger(__name__)


class JointConfig(ScanConfig):
    """Per-head gates optimised together for one objective, with a sparsity penalty; the group is the top k."""

    objective: Objective = Objective.REFUSAL
    k: int = Field(default=3, ge=1)  # the group's size (the report and asr read prefixes 1..k)
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=0.1, gt=0)
    l1: float = Field(default=0.01, ge=0)
    sparsity: Literal["l1", "hard_concrete"] = "l1"
    init: float = Field(default=0.1, gt=0, lt=1)
    jitter: float = Field(default=0.1, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    rank: int = Field(default=1, ge=1)  # subspace objective: Sahara's subspace
    subspace: Literal["left", "right"] = "left"
    center: bool = False
    opening_tokens: int = Field(default=4, ge=1)  # refusal objective: the openings' length
    answer_tokens: int = Field(default=24, ge=1)  # refusal objective: the greedy answer the judge reads
    batch_prompts: int | None = Field(default=None, ge=1)  # prompts per forward pass (a large model's memory)
    shard_steps: int = Field(default=25, ge=1)  # steps per shard: the unit of progress and resume (same numbers)

    @property
    def subspace_spec(self) -> SubspaceSpec:
        return SubspaceSpec(rank=self.rank, side=self.subspace, center=self.center)

    def settings(self, seed: int) -> JointSettings:
        return JointSettings(objective=self.objective, op=self.op, eps=self.eps, steps=self.steps, lr=self.lr,
                             l1=self.l1, sparsity=self.sparsity, init=self.init, jitter=self.jitter, seed=seed,
                             subspace=self.subspace_spec, batch_prompts=self.batch_prompts)


class JointJob(ScanJob):
    """A chain of shards per seed (`shard_steps` steps each, the seeds side by side); the group is the top-k gates
    of the seed whose group's exact objective is largest."""

    experiment = "joint"
    cfg: JointConfig

    def __init__(self, cfg: JointConfig, out: Path) -> None:
        super().__init__(cfg, out)
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise UsageError(f"joint: seeds {cfg.seeds} repeat a seed: list each once")
        if cfg.k > len(self.heads):
            raise UsageError(f"joint: k {cfg.k} is more than the model's {len(self.heads)} heads")
        if cfg.objective is Objective.SUBSPACE and cfg.subspace == "left" and cfg.rank > len(self.prompts):
            raise UsageError(f"joint: subspace rank {cfg.rank} needs at least {cfg.rank} prompts, got "
                             f"{len(self.prompts)} from {self.prompts.name!r}")
        self._next = {seed: JointShard(model=self.model, prompts=self.block(), settings=cfg.settings(seed), k=cfg.k,
                                       opening_tokens=cfg.opening_tokens, answer_tokens=cfg.answer_tokens,
                                       stop=min(cfg.shard_steps, cfg.steps))
                      for seed in cfg.seeds}  # seed -> its search's next link
        self._links: dict[int, list[pa.Table]] = {seed: [] for seed in cfg.seeds}
        self.runs: dict[int, pa.Table] = {}  # seed -> its steps

    @property
    def done(self) -> bool:
        return len(self.runs) == len(self.cfg.seeds)

    @property
    def round_label(self) -> str:
        ends = sorted({shard.end for seed, shard in self._next.items() if seed not in self.runs})
        return f"joint search to step {'/'.join(map(str, ends))} of {self.cfg.steps}"

    def pending(self) -> list[JointShard]:
        return [shard for seed, shard in self._next.items() if seed not in self.runs]

    def absorb(self, outcome: Outcome) -> None:
        """Each seed's link: the search's end, or the next link from where this one stands."""
        for seed, shard in self._next.items():
            if seed in self.runs:
                continue
            table = outcome.table(shard)
            self._links[seed].append(table)
            if shard.last:
                self.runs[seed] = pa.concat_tables(self._links[seed])
                continue
            state = JointState.model_validate_json(table["state"][-1].as_py())
            self._next[seed] = JointShard(**{**dict(shard), "start": shard.end, "state": state, "after": shard.id,
                                             "stop": min(shard.end + self.cfg.shard_steps, self.cfg.steps)})
        if self.done:
            log.info("joint %s: group %s (seed %d, objective %.4g)", self.cfg.model,
                     ", ".join(h.label for h in self.group), self.seed, self._exact(self.seed)[-1])

    # ------------------------------------------------------------------------------------------- results

    def _final_gates(self, seed: int) -> np.ndarray:
        return np.asarray(self.runs[seed]["gates"][-1].as_py(), dtype=np.float64)  # (layers * heads,)

    def _order(self, seed: int) -> np.ndarray:
        """Every head's index, largest final gate first (ties: the earlier head)."""
        return np.argsort(-self._final_gates(seed), kind="stable")

    def _exact(self, seed: int) -> list[float]:
        return list(self.runs[seed]["exact"][-1].as_py())

    def _group_of(self, seed: int) -> tuple[Head, ...]:
        return tuple(self.heads[i] for i in self._order(seed)[:self.cfg.k])

    @property
    def seed(self) -> int:
        """The seed whose k-group's exact objective is largest (ties: the first listed)."""
        return max(self.cfg.seeds, key=lambda s: (self._exact(s)[-1], -self.cfg.seeds.index(s)))

    @property
    def group(self) -> tuple[Head, ...]:
        return self._group_of(self.seed) if self.done else ()

    def _settings_columns(self, n: int) -> dict[str, list]:
        c = self.cfg
        return dict(op=[c.op.value] * n, eps=[c.eps] * n, subspace=[c.subspace] * n, rank_r=[c.rank] * n,
                    centered=[c.center] * n, objective=[c.objective.value] * n, sparsity=[c.sparsity] * n,
                    steps=[c.steps] * n, lr=[c.lr] * n, l1=[c.l1] * n)

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        chosen_seed = self.seed
        heads: dict[str, list] = {}
        steps: dict[str, list] = {}
        for seed in self.cfg.seeds:
            gates, order, exact = self._final_gates(seed), self._order(seed), self._exact(seed)
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(1, len(order) + 1)
            n = len(self.heads)
            group = [h.label for h in self._group_of(seed)]
            used = int(self.runs[seed]["prompts_used"][0].as_py())
            part = dict(self._settings_columns(n), seed=[seed] * n, layer=[h.layer for h in self.heads],
                        head=[h.head for h in self.heads], head_label=[h.label for h in self.heads],
                        gate=gates.tolist(), rank=rank.tolist(), group=[group] * n,
                        in_group=[bool(r <= self.cfg.k) for r in rank], selected=[seed == chosen_seed] * n,
                        score=[exact[r - 1] if r <= self.cfg.k else None for r in rank],
                        prompts_used=[used] * n)
            for k, v in part.items():
                heads.setdefault(k, []).extend(v)
            t = self.runs[seed]
            m = t.num_rows
            srow = dict(objective=[self.cfg.objective.value] * m, seed=[seed] * m, step=t["step"].to_pylist(),
                        loss=t["loss"].to_pylist(), value=t["objective"].to_pylist(),
                        penalty=t["penalty"].to_pylist(), open=t["open"].to_pylist())
            for k, v in srow.items():
                steps.setdefault(k, []).extend(v)
        n_heads, n_steps = len(heads["seed"]), len(steps["seed"])
        return {"joint": make_table("joint", {**self.meta(run_id, n_heads), **heads}),
                "joint_steps": make_table("joint_steps", {**self.meta(run_id, n_steps), **steps})}

    def summary(self) -> dict[str, Any]:
        return {"joint_group": [h.label for h in self.group], "joint_seed": self.seed,
                "joint_scores": [round(v, 6) for v in self._exact(self.seed)]}
