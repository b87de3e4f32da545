"""Jobs: one experiment on one model, as a state machine the runner advances in rounds.

A job says which shards it needs next (`pending`), takes their results back (`absorb`) and, when done,
builds its tables. Ships needs one round; Sahara one round per greedy step. The runner gathers the pending
shards of every job (every model) into one round, so the pools of several models work at the same time,
and a resumed run reads each round's finished shards back from the run folder. Light: no torch at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from study import __version__
from study.ablation import Ablation
from study.config import ModelConfig, SaharaConfig, ScanConfig, ShipsConfig, SurgeryConfig
from study.errors import UsageError
from study.executor import Outcome, WorkerOptions
from study.family import training_ids
from study.heads import Head, all_heads
from study.models import SCREEN_DTYPES, ModelShape, check_model_name, model_fingerprint, model_id, model_shape
from study.prompts import PromptSet, load_prompts
from study.ranking import rank_desc, top_union
from study.schema import make_table
from study.search import GreedySearch, Step
from study.shards import ModelRef, PromptBlock, Shard, blocks
from study.store import model_slug

log = logging.getLogger(__name__)


class Job(ABC):
    """One experiment on one model: validated and planned without loading the model."""

    experiment: str

    def __init__(self, cfg: ModelConfig, out: Path) -> None:
        check_model_name(cfg.model)
        self.cfg = cfg
        self.shape: ModelShape = model_shape(cfg.model, cfg.revision)
        self.model = ModelRef(name=cfg.model, revision=cfg.revision, dtype=cfg.dtype)

    @property
    def round_label(self) -> str:
        """What the progress bar calls this job's current round."""
        return self.experiment

    @property
    @abstractmethod
    def done(self) -> bool:
        """True when no shard round is left."""

    def link(self, jobs: Sequence["Job"]) -> None:
        """Find the jobs of this study whose results this one needs (its heads' source); most need none."""

    def pending(self) -> list[Shard]:
        """The shards of the next round (empty when done)."""
        return []

    def absorb(self, outcome: Outcome) -> None:
        """Take the results of this round's shards."""

    def finish(self) -> None:
        """Work done after the rounds, in the driver (a checkpoint to save)."""

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        return {}

    @property
    def part(self) -> str:
        """The file name stem of this job's rows in each table: a rerun of the same condition replaces them,
        another condition (dataset, operator, format...) of the same experiment and model adds its own."""
        return self.experiment

    def summary(self) -> dict[str, Any]:
        return {}

    def record(self) -> dict[str, Any]:
        """What the manifest says about this job's inputs."""
        return {"model_fingerprint": model_fingerprint(self.cfg.model, self.cfg.revision)}


class ScanJob(Job):
    """A job that scores ablations on a prompt set, in shards."""

    cfg: ScanConfig

    def __init__(self, cfg: ScanConfig, out: Path) -> None:
        super().__init__(cfg, out)
        self.prompts: PromptSet = load_prompts(cfg.prompts, data_dir=cfg.data_dir, limit=cfg.limit)
        self.options = WorkerOptions(device=cfg.device, token_budget=cfg.token_budget)
        self.heads: list[Head] = all_heads(self.shape.n_layers, self.shape.n_heads)
        trained = training_ids(cfg.model)
        self.trained_on = sum(p.id in trained for p in self.prompts)
        if self.trained_on:
            log.warning("%d of the %d prompts of %s trained %s (its card lists them): scores on them are not "
                        "held out", self.trained_on, len(self.prompts), self.prompts.name, cfg.model)

    def block(self, index: slice = slice(None)) -> PromptBlock:
        return PromptBlock.of(self.prompts, self.cfg.format, self.cfg.system_prompt, index)

    def meta(self, run_id: str, n: int) -> dict[str, list]:
        """The run metadata columns every table row carries, for n rows."""
        values = dict(run_id=run_id, model=model_id(self.cfg.model), model_revision=self.cfg.revision,
                      dataset=self.prompts.name, prompt_format=self.cfg.format.value, code_version=__version__)
        return {k: [v] * n for k, v in values.items()}

    def ablation(self, heads: tuple[Head, ...] = ()) -> Ablation:
        return Ablation(heads=heads, op=self.cfg.op, eps=self.cfg.eps)

    @property
    def screen_model(self) -> ModelRef:
        """The low-precision copy a screened round runs on (a `ScreenedScanConfig`'s `screen`): another dtype,
        so its own shard ids and workers."""
        return self.model.model_copy(update={"dtype": SCREEN_DTYPES[self.cfg.screen]})

    @property
    def condition(self) -> dict[str, Any]:
        """What makes two jobs of one experiment and model different results (not their sizes)."""
        c = self.cfg
        return dict(prompts=self.prompts.name, op=c.op.value, eps=c.eps, format=c.format.value,
                    system_prompt=c.system_prompt)

    @property
    def part(self) -> str:
        digest = hashlib.sha256(json.dumps(self.condition, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.experiment}-{digest}"

    def record(self) -> dict[str, Any]:
        return {**super().record(), "prompts": {"set": self.prompts.name, "limit": self.cfg.limit,
                                                "count": len(self.prompts), "ids_sha256": self.prompts.digest,
                                                "file_sha256": self.prompts.source_sha256,
                                                "trained_on": self.trained_on}}


def find_source(jobs: Sequence[Job], experiment: str, cfg: ScanConfig) -> Job | None:
    """This run's `experiment` job of the same model whose heads another job uses: the one with the same
    operator and prompts where the study sweeps them, else the closest."""
    same = [j for j in jobs if j.experiment == experiment and j.cfg.model == cfg.model]
    if not same:
        return None
    return max(same, key=lambda j: 2 * (j.cfg.op == cfg.op) + (j.cfg.prompts == cfg.prompts))


def require_source(jobs: Sequence[Job], experiment: str, cfg: ScanConfig, missing: str) -> Job:
    """`find_source`, or one line saying what the spec lacks (`missing`, after `<experiment> on <model>`)."""
    source = find_source(jobs, experiment, cfg)
    if source is None:
        raise UsageError(missing)
    return source


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
        kl, exact = self.kl_matrix()
        rank = rank_desc(kl)  # (prompts, heads), 1 = largest KL
        heads, prompts = self.heads, list(self.prompts.prompts)
        n = kl.size
        cols = self.meta(run_id, n)
        cols.update(prompt_id=[p.id for p in prompts for _ in heads], prompt=[p.text for p in prompts for _ in heads],
                    layer=[h.layer for _ in prompts for h in heads], head=[h.head for _ in prompts for h in heads],
                    head_label=[h.label for _ in prompts for h in heads], op=[self.cfg.op.value] * n,
                    eps=[self.cfg.eps] * n, kl=kl.flatten().tolist(), rank=rank.flatten().tolist(),
                    exact=exact.flatten().tolist())
        return {"ships": make_table("ships", cols)}


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
        rows: dict[str, list] = {}
        for st in self.steps:
            m = len(st.candidates)
            part = self.meta(run_id, m)
            part.update(self._subspace_columns(m), step=[st.step] * m, layer=[h.layer for h in st.candidates],
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


class SpecificityJob(ShipsJob):
    """Ships on benign prompts: rows of the `ships` table the analysis sets against the harmful ones."""

    experiment = "specificity"


class GeneralizedShipsJob(SaharaJob):
    """Generalized Ships of every head (Sahara's first step) without the search: the `head_scores` table."""

    experiment = "generalized_ships"

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        return {"head_scores": super().tables(run_id)["head_scores"]}

    def summary(self) -> dict[str, Any]:
        return {}


class SurgeryJob(Job):
    """Save the model with an ablation written into its weights (no shards: a load, an edit, a save)."""

    experiment = "surgery"
    cfg: SurgeryConfig

    def __init__(self, cfg: SurgeryConfig, out: Path) -> None:
        super().__init__(cfg, out)
        cfg.ablation.check(self.shape)  # heads against the config, before any weight loads
        self.checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else out / "checkpoints" / model_slug(
            model_id(cfg.model))
        if self.checkpoint.exists() and (not self.checkpoint.is_dir() or any(
                p.name not in _RUN_FILES for p in self.checkpoint.iterdir())):
            raise UsageError(f"checkpoint folder {str(self.checkpoint)!r} exists and is not empty: "
                             f"choose a new --out")
        self.saved: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return True  # no shard rounds

    def finish(self) -> None:
        from study.models import load_model
        from study.surgery import save_ablated

        lm = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype, revision=self.cfg.revision)
        self.saved = save_ablated(lm, self.cfg.ablation, self.checkpoint)

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), **self.saved}


_RUN_FILES = ("manifest.json", "manifests")  # a run folder's own files may already sit in the checkpoint folder
