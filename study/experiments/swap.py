"""The swap experiment: an aligned model, its base, and the mixed models between them, measured alike.

For each recipe (and the two unmixed references, `aligned` and `base`) the job generates on the harmful and
benign prompts and scores the safety heads' Ships on the harmful ones, all in one round of shards. A mixed
model is a `ModelRef` with a `Swap`: a whole-module recipe gets a pool like any model, a head recipe runs on its
host model's workers as a scoped edit (`ModelRef.host`, `study.models.mixing`). The safety heads come from the
spec or from this run's Sahara (or joint) group of the aligned model. The `swaps` table holds one row per (recipe,
prompt kind, metric, judge). Light: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from study.core.ablation import Ablation
from study.core.architectures import check_architecture
from study.core.errors import UsageError
from study.core.heads import Head, parse_heads
from study.core.stats import wilson
from study.experiments.asr import count_verdicts
from study.experiments.base import GeneratingConfig, Job, ScanJob, _head_labels, require_source
from study.generation.judges.registry import get_judge, is_llm_judge
from study.models.builtin import check_model_name, model_id
from study.models.fingerprint import model_identity
from study.models.loading import model_shape
from study.models.recipes import MIXED_RECIPES, Recipe, Swap, parse_recipe
from study.prompts.sets import PromptSet, load_prompts
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import AnyShard, GenShard, ModelRef, PromptBlock, Shard, blocks


class SwapConfig(GeneratingConfig):
    """Base-weight swaps between an aligned model (`model`) and its `base`: each recipe's mixed model is
    generated with and judged on the harmful and benign prompts, and its safety heads scored (Ships).

    The safety heads the head recipes move are `heads`, else the first `k` of this run's group of the aligned
    model from its `search` (Sahara's or the joint search's)."""

    base: str
    base_revision: str | None = None
    recipes: list[str] = Field(default_factory=lambda: [r.value for r in MIXED_RECIPES], min_length=1)
    heads: str | None = None
    k: int | None = Field(default=None, ge=1)
    search: Literal["sahara", "joint"] = "sahara"

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str | None) -> str | None:
        return _head_labels(v)

    @field_validator("recipes", mode="before")
    @classmethod
    def _recipes(cls, v: Any) -> list[str]:
        names = [r.strip() for r in v.split(",")] if isinstance(v, str) else list(v)
        return [parse_recipe(n).value for n in names]

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        check_model_name(v)
        return v

    @model_validator(mode="after")
    def _hf_only(self) -> "SwapConfig":
        if self.backend != "hf":
            raise UsageError("swap: a mixed model lives in memory only, so it generates with backend hf")
        if any(is_llm_judge(j) for j in self.judges):
            raise UsageError("swap: use offline judges (outcome, paper, paper-code, gcg, refusal); llm judges run in asr")
        if self.base == self.model and self.base_revision == self.revision:
            raise UsageError(f"swap: the base of {self.model!r} is itself: give the model it was fine-tuned from")
        return self

    @property
    def recipe_list(self) -> list[Recipe]:
        return [Recipe(r) for r in self.recipes]


RATES = ("asr", "refusal_rate", "non_answer_rate", "degenerate_frac")  # each a metric row, with its count


class SwapJob(ScanJob):
    """Generation and Ships shards for every recipe's model (one round, after the Sahara group if needed)."""

    experiment = "swap"
    cfg: SwapConfig

    def __init__(self, cfg: SwapConfig, out: Path) -> None:
        super().__init__(cfg, out)
        base_shape = model_shape(cfg.base, cfg.base_revision)
        check_architecture(cfg.base, base_shape)
        self.base_identity = model_identity(cfg.base, cfg.base_revision)
        if base_shape != self.shape:  # from the configs: before any weight loads (a vocabulary too)
            raise UsageError(f"swap: {cfg.model!r} and its base {cfg.base!r} differ ({self.shape.differences(base_shape)})"
                             f": a swap needs two models of one architecture and vocabulary")
        self.decoding = cfg.decoding_spec
        self.judges = [get_judge(n) for n in cfg.judges]
        self.benign: PromptSet | None = None
        if cfg.benign is not None:
            self.benign = load_prompts(cfg.benign, data_dir=cfg.data_dir, limit=cfg.benign_limit or cfg.limit)
        self.safety: tuple[Head, ...] | None = None
        if cfg.heads is not None:
            self.safety = parse_heads(cfg.heads)
            self.ablation(self.safety).check(self.shape)
        self.source: Job | None = None
        self.results: Outcome | None = None
        self._early: Outcome | None = None  # what needs no safety heads, run while the Sahara group is searched
        self._round: list[AnyShard] = []

    def link(self, jobs: Sequence[Job]) -> None:
        """Take the safety heads from this study's Sahara (or joint) job of the aligned model, unless given."""
        if self.safety is not None or not any(Recipe(r).needs_heads for r in self.cfg.recipes):
            return
        self.source = require_source(jobs, self.cfg.search, self.cfg, (
            f"swap on {self.cfg.model!r} has no safety heads: give heads, or add a {self.cfg.search} section (the "
            f"head recipes move its group)"))

    @property
    def condition(self) -> dict[str, Any]:
        return {**super().condition, "base": self.cfg.base, "base_revision": self.cfg.base_revision}

    # ---------------------------------------------------------------------------------------------- rounds

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def round_label(self) -> str:
        return "swaps"

    def variants(self) -> list[tuple[Recipe, ModelRef]]:
        """(recipe, the model it measures): the two references first, then every mixed recipe asked for (those that
        move safety heads only once the heads are known)."""
        c = self.cfg
        out = [(Recipe.ALIGNED, self.model),
               (Recipe.BASE, ModelRef(name=c.base, revision=self.base_identity.revision, dtype=c.dtype,
                                      fingerprint=self.base_identity.fingerprint))]
        for recipe in c.recipe_list:
            if recipe.needs_heads and self.safety is None:
                continue  # known once this run's Sahara group is
            out.append((recipe, self._mixed(recipe, self.safety if recipe.needs_heads else ())))
        return out

    def _mixed(self, recipe: Recipe, heads: tuple[Head, ...]) -> ModelRef:
        c = self.cfg
        swap = Swap(recipe=recipe, aligned=c.model, base=c.base, base_revision=self.base_identity.revision,
                    heads=heads, base_fingerprint=self.base_identity.fingerprint)
        return self.model.model_copy(update={"swap": swap})

    def _ships_ablations(self) -> tuple[Ablation, ...]:
        singles = [self.ablation((h,)) for h in self.safety or ()]
        group = [self.ablation(self.safety)] if self.safety and len(self.safety) > 1 else []
        return tuple(singles + group)

    def _shards(self, ref: ModelRef) -> list[AnyShard]:
        c = self.cfg
        out: list[AnyShard] = []
        for prompts in [self.prompts] + ([self.benign] if self.benign is not None else []):
            for p0 in range(0, len(prompts), c.shard_prompts):
                block = PromptBlock.of(prompts, c.format, c.system_prompt, slice(p0, p0 + c.shard_prompts))
                out.append(GenShard(model=ref, prompts=block, ablations=(self.ablation(),), decoding=self.decoding,
                                    backend=c.backend))
        ablations = self._ships_ablations()
        if ablations:
            for p0 in range(0, len(self.prompts), c.shard_prompts):
                block = self.block(slice(p0, p0 + c.shard_prompts))
                out += [Shard(model=ref, prompts=block, ablations=tuple(abl), measure="kl")
                        for abl in blocks(ablations, c.shard_heads)]
        return out

    def pending(self) -> list[AnyShard]:
        """Two rounds where the heads come from this run's Sahara job: the generations that need no heads (the
        references and the whole-module recipes, each its own model to load) start at once, beside the search;
        the head recipes and the Ships rows follow once the group is known. One round where the heads are given."""
        if self.done:
            return []
        if self.safety is None and self.source is not None:
            if not self.source.done:
                if self._early is not None:
                    return []  # waiting for this run's Sahara group
                self._round = [s for _, ref in self.variants() for s in self._shards(ref)]  # no heads: no Ships
                return self._round
            self.safety = tuple(self.source.group[:self.cfg.k or len(self.source.group)])
        early = self._early.tables if self._early is not None else {}
        self._round = [s for _, ref in self.variants() for s in self._shards(ref) if s.id not in early]
        return self._round

    def expected(self) -> dict[tuple[ModelRef, str], int]:
        """While the safety heads are unknown: each head recipe's generations (run by its host model) and the
        heads' Ships rows on every model measured."""
        if self.done or self.safety is not None or self.source is None:
            return {}
        k = self.cfg.k or getattr(self.source.cfg, "steps", 1)
        texts = (len(self.prompts) + (len(self.benign) if self.benign is not None else 0)) * self.decoding.samples
        ships = (k + (k > 1)) * len(self.prompts)  # each head alone, and the group
        refs = dict(self.variants())  # the references and whole-module recipes: the head recipes are not named yet
        stand_in = (Head(layer=0, head=0),)  # a recipe's host does not depend on which heads it moves
        hosted = [self._mixed(r, stand_in).host for r in self.cfg.recipe_list if r.needs_heads]
        out: dict[tuple[ModelRef, str], int] = {}
        for host in [ref.host for ref in refs.values()] + hosted:
            out[(host, "row")] = out.get((host, "row"), 0) + ships
        for host in hosted:
            out[(host, "text")] = out.get((host, "text"), 0) + texts
        return out

    def absorb(self, outcome: Outcome) -> None:
        if not self._round:
            return
        if self.safety is None and self.source is not None:  # the group is still to come
            self._early = outcome
        else:
            self.results = outcome.after(self._early)

    def plan_line(self, shards: Sequence[AnyShard], have: int) -> str:
        c = self.cfg
        head = (f"  swap    {c.model} <- base {c.base}: {len(c.recipes)} recipes + 2 references, "
                f"{len(self.prompts)} prompts")
        if self.benign is not None:
            head += f" (+{len(self.benign)} benign)"
        if self.safety is None and self.source is not None:
            search = "Sahara" if self.cfg.search == "sahara" else "joint-search"
            return (f"{head}; {len(shards)} shards of the references and whole-module recipes now, the head "
                    f"recipes once this run's {search} group is done")
        gens = sum(s.rows for s in shards if isinstance(s, GenShard))
        return (f"{head}: {len(shards)} shards, {gens} generations of up to {self.decoding.max_new_tokens} tokens, "
                f"{sum(s.rows for s in shards if isinstance(s, Shard))} Ships rows, {have} shards already done")

    # ---------------------------------------------------------------------------------------------- tables

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        c = self.cfg
        rows: list[dict[str, Any]] = []
        labels = [h.label for h in self.safety or ()]
        sets = [("harmful", self.prompts)] + ([("benign", self.benign)] if self.benign is not None else [])
        for recipe, ref in self.variants():
            texts: dict[tuple[str, int], str] = {}  # (prompt id, sample) -> text
            kl: dict[str, list[float]] = {}
            for shard in self._shards(ref):
                t = self.results.table(shard).to_pylist()
                if isinstance(shard, GenShard):
                    texts.update({(r["prompt_id"], r["sample"]): r["text"] for r in t})
                else:
                    for r in t:
                        kl.setdefault(r["ablation"], []).append(r["kl"])
            heads = labels if recipe.needs_heads else []

            def row(dataset: str, kind: str, metric: str, judge: str | None, n: int, value: float,
                    lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
                return dict(self.meta_values(run_id, dataset=dataset), aligned=model_id(c.model),
                            base=model_id(c.base), recipe=recipe.value, heads=heads, kind=kind, metric=metric,
                            judge=judge, n=n, value=value, ci_low=lo, ci_high=hi)

            for kind, prompts in sets:
                for judge in self.judges:
                    verdicts = [judge.judge(p.text, texts[(p.id, k)]) for p in prompts.prompts
                                for k in range(self.decoding.samples)]
                    counts = count_verdicts(verdicts)
                    for rate, count in zip(RATES, ("harmful", "refused", "non_answer", "degenerate")):
                        lo, hi = wilson(counts[count], counts["n"])
                        rows.append(row(prompts.name, kind, rate, judge.label, counts["n"], counts[rate], lo, hi))
            for ab in self._ships_ablations():
                metric = "ships:" + (ab.heads[0].label if len(ab.heads) == 1 else "group")
                values = kl[ab.label]
                rows.append(row(self.prompts.name, "ships", metric, None, len(values), sum(values) / len(values)))
        return {"swaps": make_table("swaps", rows)}

    def summary(self) -> dict[str, Any]:
        return {"safety_heads": [h.label for h in self.safety or ()], "recipes": list(self.cfg.recipes)}

    def record(self) -> dict[str, Any]:
        extra = {} if self.benign is None else {"benign": {"set": self.benign.name, "count": len(self.benign)}}
        return {**super().record(), **extra, "base": self.cfg.base,
                "base_fingerprint": self.base_identity.fingerprint,
                "decoding": self.decoding.model_dump(mode="json"), "judges": [j.label for j in self.judges]}
