"""The ASR experiment: generate under ablation, judge, and count, with the controls a reader needs.

Arms (conditions) of one experiment on one model, all judged on the same prompts with the same decoding:
- `normal`: the model as it is (the baseline every p-value is paired against);
- `heads`: one given head set; `sahara`, `joint`, `ships`: the prefixes of size 1..k of the Sahara group, of the
  joint search's group and of the heads by mean Ships over the prompts (dataset level; `groups` picks which);
- `query`: each prompt's own top-k Ships heads (query level, the paper's 0.04 -> 0.64 experiment);
- `random`: seeded draws of as many random heads (per group size, or per prompt at query level), so a
  reader sees whether the found heads beat chance.
Dataset-level arms also run on a benign set (over-refusal). Every verdict keeps whether the text is
degenerate: an ablation that breaks a small model's text must not read as "it stopped refusing".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from study.core.ablation import Ablation
from study.core.errors import UsageError
from study.core.heads import Head, labels, parse_heads
from study.core.stats import mcnemar_exact, wilson
from study.experiments.base import GeneratingConfig, Job, ScanJob, _head_labels, require_source
from study.experiments.ships import ShipsJob
from study.generation.backends import check_vllm_model
from study.generation.decoding import Decoding
from study.generation.judges.base import Verdict
from study.generation.judges.llm import ANSWER_TOKENS, LLMJudge, rubric
from study.generation.judges.registry import get_judge
from study.models.loading import model_shape
from study.prompts.formats import PromptFormat
from study.prompts.sets import PromptSet, load_prompts, prompt_id
from study.runtime.executor import Outcome
from study.runtime.schema import make_table
from study.runtime.shards import GenShard, ModelRef, PromptBlock, blocks


class AsrConfig(GeneratingConfig):
    """Generate under ablation and judge: ASR with Wilson intervals and McNemar tests, controls, over-refusal.

    Heads come from `heads` (one set), from `from_run` (a run folder's Sahara group at `level: dataset`, or
    each prompt's top Ships heads at `level: query`), or, in a study with those sections, from this run's
    own Sahara / Ships job of the same model.
    """

    heads: str | None = None  # labels, e.g. "L18H8,L7H2"
    from_run: str | None = None  # a run folder holding a sahara (dataset) or ships (query) table
    level: Literal["dataset", "query"] = "dataset"
    k: int | None = Field(default=None, ge=1)  # dataset: group sizes 1..k (default all steps); query: top-k (1)
    random_controls: int = Field(default=0, ge=0)  # seeded draws of as many random heads, per group size
    planted: bool = True  # a model with known `planted_heads`: ablate them too, as condition `planted`
    # dataset level: whose groups (each an arm per prefix size, sharing the normal model and the random controls)
    groups: list[Literal["sahara", "joint", "ships"]] = Field(default_factory=lambda: ["sahara"], min_length=1)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str | None) -> str | None:
        return _head_labels(v)

    @model_validator(mode="after")
    def _sources(self) -> "AsrConfig":
        if self.heads is not None and self.from_run is not None:
            raise UsageError("asr: give heads or from_run, not both")
        if len(set(self.groups)) != len(self.groups):
            raise UsageError(f"asr: groups {self.groups} names one twice: list each of sahara, joint, ships once")
        return self


@dataclass(frozen=True)
class Arm:
    """One condition: the same ablation on every prompt (`ablation`), or one per prompt (`per_prompt`)."""

    condition: str
    group_size: int
    draw: int = 0
    ablation: Ablation | None = None
    per_prompt: tuple[Ablation, ...] | None = None

    @property
    def label(self) -> str:
        if self.ablation is not None:
            return self.ablation.label
        what = "random" if self.condition == "random" else "top"
        return f"query:{what}{self.group_size}" + (f":d{self.draw}" if self.condition == "random" else "")

    def for_prompt(self, i: int) -> Ablation:
        return self.ablation if self.ablation is not None else self.per_prompt[i]


def _latest_run(t: Any) -> Any:
    """The rows of the last run a table holds (a folder run again keeps every run's rows)."""
    return t[t["run_id"] == t["run_id"].iloc[-1]] if t["run_id"].nunique() > 1 else t


def random_heads(heads: Sequence[Head], k: int, seed: int, *key: object) -> tuple[Head, ...]:
    """k distinct heads drawn with a seed derived from (seed, key): the same control in every rerun."""
    rng = random.Random(":".join(str(x) for x in (seed, *key)))
    return tuple(sorted(rng.sample(list(heads), k)))


def dataset_arms(found: list[tuple[str, tuple[Head, ...]]], job: ScanJob, controls: int, seed: int) -> list[Arm]:
    """The normal model, each found head set, and `controls` seeded random sets of each size found."""
    arms = [Arm("normal", 0, ablation=job.ablation())]
    arms += [Arm(cond, len(hs), ablation=job.ablation(hs)) for cond, hs in found]
    for size in sorted({len(hs) for _, hs in found}):
        arms += [Arm("random", size, d, ablation=job.ablation(random_heads(job.heads, size, seed, size, d)))
                 for d in range(controls)]
    return arms


class AsrJob(ScanJob):
    """Generation shards for every arm (one round), then verdicts and the `asr` table in the driver."""

    experiment = "asr"
    cfg: AsrConfig

    def __init__(self, cfg: AsrConfig, out: Path) -> None:
        super().__init__(cfg, out)
        self.decoding = cfg.decoding_spec
        self.judges = [get_judge(name) for name in cfg.judges]
        self.llm_judges = [j for j in self.judges if isinstance(j, LLMJudge)]
        if cfg.backend == "vllm":  # the judge models generate on the same backend
            for name in (cfg.model, *(j.model for j in self.llm_judges)):
                check_vllm_model(name, self.shape if name == cfg.model else model_shape(name))
        self.judged = not self.llm_judges  # llm judges need a second round on their own model
        self.benign: PromptSet | None = None
        if cfg.benign is not None and cfg.level == "dataset":
            self.benign = load_prompts(cfg.benign, data_dir=cfg.data_dir, limit=cfg.benign_limit or cfg.limit)
        self.sources: list[Job] = []  # this study's searches the heads come from (dataset: `groups`; query: Ships)
        self.arms: list[Arm] | None = None
        self.results: Outcome | None = None
        self._early: Outcome | None = None  # the arms that need no searched heads, generated beside the search
        self._early_shards: list[GenShard] = []
        self._gen_shards: list[GenShard] = []
        self._round: list[GenShard] = []
        if cfg.heads is not None:
            heads = parse_heads(cfg.heads)
            self.ablation(heads).check(self.shape)
            self.arms = self._dataset_arms([("heads", heads)])
        elif cfg.from_run is not None:
            self.arms = self._arms_from_run(Path(cfg.from_run))

    # ---------------------------------------------------------------------------------- where heads come from

    def link(self, jobs: Sequence[Job]) -> None:
        """Take the heads from this study's own Sahara (dataset) or Ships (query) job of the same model."""
        if self.arms is not None:
            return
        sections = self.cfg.groups if self.cfg.level == "dataset" else ["ships"]
        self.sources = [require_source(jobs, section, self.cfg, (
            f"asr on {self.cfg.model!r} has no heads: give heads or from_run, or add a {section} section to the "
            f"study (level {self.cfg.level} takes its heads from it)")) for section in sections]

    @property
    def condition(self) -> dict[str, Any]:
        return {**super().condition, "level": self.cfg.level, "decoding": self.decoding.label}

    def _arms_from_run(self, run: Path) -> list[Arm]:

        if not run.is_dir():
            raise UsageError(f"--from-run {str(run)!r} is not a run folder")
        if self.cfg.level == "dataset":
            return self._dataset_arms([arm for name in self.cfg.groups
                                       for arm in self._prefixes(name, self._group_from_run(run, name))])
        t = self._one_search(run, "ships", ("dataset", "prompt_format", "op", "eps"))
        return self._query_arms({pid: [Head(int(r.layer), int(r.head)) for r in g.sort_values("rank").itertuples()]
                                 for pid, g in t.groupby("prompt_id")}, f"--from-run {run}")

    def _group_from_run(self, run: Path, name: str) -> list[Head]:
        """The `name` search's group in `run`, in its order (ships: every head by mean KL over the prompts)."""
        if name == "ships":
            t = self._one_search(run, "ships", ("dataset", "prompt_format", "op", "eps"))
            t = _latest_run(t)
            mean = t.groupby(["layer", "head"])["kl"].mean().reset_index()
            mean = mean.sort_values(["kl", "layer", "head"], ascending=[False, True, True], kind="stable")
            return [Head(int(r.layer), int(r.head)) for r in mean.itertuples()]
        if name == "joint":
            t = self._one_search(run, "joint", ("dataset", "prompt_format", "op", "eps", "objective", "sparsity",
                                                "subspace", "rank_r", "centered"))
            t = _latest_run(t)
            chosen = t[t["selected"] & t["in_group"]].sort_values("rank")
            return [Head(int(r.layer), int(r.head)) for r in chosen.itertuples()]
        t = self._one_search(run, "sahara", ("dataset", "prompt_format", "op", "eps", "subspace", "rank_r",
                                             "centered"))
        t = _latest_run(t)
        chosen = t[t["chosen"]].sort_values("step")
        return [Head(int(r.layer), int(r.head)) for r in chosen.itertuples()]

    def _one_search(self, run: Path, table: str, keys: tuple[str, ...]) -> Any:
        """The rows of `run`'s `table` for this model of the one search to take heads from: the same operator,
        eps and format as this job; of several datasets (or subspaces), the one this job's prompts come from;
        more than one left is refused with the candidates listed (two searches' heads must never mix)."""
        from study.runtime.store import read_table

        t = read_table(run, table, model=self.cfg.model).to_pandas()
        if t.empty:
            raise UsageError(f"--from-run {run}: the {table} table has no rows for {self.cfg.model!r}")
        c = self.cfg
        same = t[(t["op"] == c.op.value) & (t["eps"] == c.eps) & (t["prompt_format"] == c.format.value)]
        if same.empty:
            found = sorted({f"{r.op} eps {r.eps:g} format {r.prompt_format}" for r in t.itertuples()})
            raise UsageError(f"--from-run {run}: no {table} rows for {c.model!r} with operator {c.op.value}, eps "
                             f"{c.eps:g} and format {c.format.value} (it holds: {'; '.join(found)})")
        groups = {k: g for k, g in same.groupby(list(keys), dropna=False)}
        if len(groups) > 1:
            own = {k: g for k, g in groups.items() if k[0] == self.prompts.name}
            groups = own if own else groups
        if len(groups) > 1:
            listed = "; ".join(", ".join(f"{n} {v}" for n, v in zip(keys, k)) for k in sorted(groups, key=str))
            raise UsageError(f"--from-run {run}: {len(groups)} {table} searches of {c.model!r} fit ({listed}): "
                             f"run asr on a folder holding one of them, or use the dataset that search used")
        return next(iter(groups.values()))

    def _resolve_linked(self) -> None:
        if self.cfg.level == "dataset":
            self.arms = self._dataset_arms([arm for name, job in zip(self.cfg.groups, self.sources)
                                            for arm in self._prefixes(name, self._group_of(job))])
            return
        job: ShipsJob = self.sources[0]
        kl, _ = job.kl_matrix()  # (prompts, heads)
        order = (-kl).argsort(axis=1, kind="stable")
        self.arms = self._query_arms({p.id: [job.heads[j] for j in order[i]]
                                      for i, p in enumerate(job.prompts.prompts)}, "this run's ships")

    @staticmethod
    def _group_of(job: Job) -> list[Head]:
        """A search job's group in its order (Ships: every head by mean KL over its prompts)."""
        if isinstance(job, ShipsJob):
            kl, _ = job.kl_matrix()  # (prompts, heads)
            order = (-kl.mean(axis=0)).argsort(kind="stable")
            return [job.heads[j] for j in order]
        return list(job.group)

    def _prefixes(self, name: str, group: list[Head]) -> list[tuple[str, tuple[Head, ...]]]:
        """The arms of a group's prefixes 1..k (k: the setting, else the whole group; Ships' ranking: 3)."""
        size = min(self.cfg.k or (3 if name == "ships" else len(group)), len(group))
        return [(name, tuple(group[:s])) for s in range(1, size + 1)]

    def _dataset_arms(self, found: list[tuple[str, tuple[Head, ...]]]) -> list[Arm]:
        planted = [("planted", self.planted)] if self.cfg.planted and self.planted else []
        return dataset_arms(found + planted, self, self.cfg.random_controls, self.cfg.seed)

    def _query_arms(self, ranked: dict[str, list[Head]], where: str) -> list[Arm]:
        k = self.cfg.k or 1
        missing = [p.id for p in self.prompts.prompts if p.id not in ranked]
        if missing:
            raise UsageError(f"asr level query: {len(missing)} of {len(self.prompts)} prompts of "
                             f"{self.prompts.name!r} have no Ships scores in {where}: use the prompts it scored")
        per = tuple(self.ablation(tuple(ranked[p.id][:k])) for p in self.prompts.prompts)
        arms = [Arm("normal", 0, ablation=self.ablation()), Arm("query", k, per_prompt=per)]
        for d in range(self.cfg.random_controls):
            arms.append(Arm("random", k, d, per_prompt=tuple(
                self.ablation(random_heads(self.heads, k, self.cfg.seed, p.id, d)) for p in self.prompts.prompts)))
        return arms

    # ------------------------------------------------------------------------------------------- the rounds

    @property
    def done(self) -> bool:
        return self.results is not None and self.judged

    @property
    def round_label(self) -> str:
        return "asr generation" if self.results is None else "asr judging"

    def pending(self) -> list[GenShard]:
        """Generation, then judging where a judge is a model. Where the heads come from this run's Sahara or
        Ships job, generation is two rounds: the arms that need no searched heads (the normal model; the planted
        heads and their random controls) start at once, beside the search, so the model's generation engine
        starts early too; the searched arms follow once the heads are known."""
        if self.done:
            return []
        if self.results is not None:
            self._round = self._judge_shards()
            return self._round
        if self.arms is None:
            if not self.sources:
                return []
            if not all(job.done for job in self.sources):
                if self._early is not None:
                    return []  # waiting for this run's Sahara / Ships job
                self._round = self._early_shards = self._generation(self._early_arms())
                return self._round
            self._resolve_linked()
        early = {a.label for a in self._early_arms()} if self._early is not None else set()
        self._round = self._generation([a for a in self.arms if a.label not in early])
        self._gen_shards = self._early_shards + self._round
        if not self._round and self._early is not None:  # every arm was known early
            self.results = self._early
            return self.pending()
        return self._round

    def expected(self) -> dict[tuple[ModelRef, str], int]:
        """While the searched heads are unknown: their arm and its random controls on every prompt (benign too)."""
        if self.done or self.arms is not None or not self.sources:
            return {}
        prompts = len(self.prompts) + (len(self.benign) if self.benign is not None else 0)
        return {(self.model, "text"): prompts * (1 + self.cfg.random_controls) * self.decoding.samples}

    def _early_arms(self) -> list[Arm]:
        """The arms of a linked job known before its source is done."""
        return self._dataset_arms([]) if self.cfg.level == "dataset" else [Arm("normal", 0, ablation=self.ablation())]

    def _generation(self, arms: Sequence[Arm]) -> list[GenShard]:
        out = self._shards(self.prompts, arms)
        if self.benign is not None:
            out += self._shards(self.benign, [a for a in arms if a.ablation is not None])
        return out

    def _judge_shards(self) -> list[GenShard]:
        """The rubric of every generated text, for each llm judge's model (greedy, a few tokens)."""
        texts = sorted({rubric(self._prompt_text[pid], r["text"]) for (_, pid, _), r in self._texts().items()})
        decoding = Decoding(max_new_tokens=ANSWER_TOKENS)
        out = []
        for judge in self.llm_judges:
            ref = ModelRef(name=judge.model, dtype=self.cfg.dtype)
            for block in blocks(texts, self.cfg.shard_prompts):
                prompts = PromptBlock(ids=tuple(prompt_id(t) for t in block), texts=tuple(block),
                                      format=PromptFormat.CHAT)
                out.append(GenShard(model=ref, prompts=prompts, ablations=(Ablation(),), decoding=decoding,
                                    backend=self.cfg.backend))
        return out

    @property
    def _prompt_text(self) -> dict[str, str]:
        sets = [self.prompts] + ([self.benign] if self.benign is not None else [])
        return {p.id: p.text for s in sets for p in s.prompts}

    def _shards(self, prompts: PromptSet, arms: Sequence[Arm]) -> list[GenShard]:
        c = self.cfg
        common = dict(model=self.model, decoding=self.decoding, backend=c.backend)
        shared = tuple(dict.fromkeys(a.ablation for a in arms if a.ablation is not None))
        out = []
        for p0 in range(0, len(prompts), c.shard_prompts):
            index = slice(p0, p0 + c.shard_prompts)
            block = PromptBlock.of(prompts, c.format, c.system_prompt, index)
            out += [GenShard(prompts=block, ablations=tuple(abl), **common) for abl in blocks(shared, c.shard_heads)]
            out += [GenShard(prompts=block, ablations=a.per_prompt[index], pairing="zip", **common)
                    for a in arms if a.per_prompt is not None]
        return out

    def plan_line(self, shards: Sequence[GenShard], have: int) -> str:
        """`headstudy plan`'s line: generations and tokens this job implies."""
        c, dec = self.cfg, self.decoding
        head = f"  asr     {c.model}: {len(self.prompts)} prompts"
        if self.benign is not None:
            head += f" (+{len(self.benign)} benign)"
        if self.arms is None:
            source = ("groups of " + ", ".join(c.groups)) if c.level == "dataset" else "Ships top heads"
            planted = (f" and its planted heads {','.join(labels(self.planted))}"
                       if c.planted and self.planted and c.level == "dataset" else "")
            return (f"{head}, heads from this run's {source} once it is done{planted}; {dec.label}, "
                    f"{dec.max_new_tokens} tokens")
        rows = sum(s.rows for s in shards)
        return (f"{head} x {len(self.arms)} conditions: {len(shards)} shards, {rows} generations of up to "
                f"{dec.max_new_tokens} tokens ({rows * dec.max_new_tokens} at most), {have} shards already done")

    def absorb(self, outcome: Outcome) -> None:
        if not self._round:
            return  # this job waited for its source in that round
        if self.arms is None:  # the early round: the searched heads are still to come
            self._early = outcome
            return
        if self.results is None:
            self.results = outcome.after(self._early)
            return
        for judge in self.llm_judges:
            answers: dict[str, str] = {}
            for shard in self._round:
                if shard.model.name == judge.model:
                    t = outcome.table(shard)
                    answers.update(zip(t["prompt_id"].to_pylist(), t["text"].to_pylist()))
            judge.answers = answers
        self.judged = True

    # ------------------------------------------------------------------------------------------- the tables

    def _texts(self) -> dict[tuple[str, str, int], dict[str, Any]]:
        """(ablation label, prompt id, sample) -> the generated row."""
        rows: dict[tuple[str, str, int], dict[str, Any]] = {}
        for shard in self._gen_shards:
            for r in self.results.table(shard).to_pylist():
                rows[(r["ablation"], r["prompt_id"], r["sample"])] = r
        return rows

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        texts = self._texts()
        gens: list[dict[str, Any]] = []
        verdicts: list[dict[str, Any]] = []
        asr: list[dict[str, Any]] = []
        sets = [("harmful", self.prompts, self.arms)]
        if self.benign is not None:
            sets.append(("benign", self.benign, [a for a in self.arms if a.ablation is not None]))
        for kind, prompts, arms in sets:
            meta = self.meta_values(run_id, dataset=prompts.name)
            flags: dict[tuple[str, str], list[bool]] = {}  # (arm label, judge) -> harmful per generation
            for arm in arms:
                cond = dict(condition=arm.condition, group_size=arm.group_size, draw=arm.draw, ablation=arm.label)
                got: dict[str, list[Verdict]] = {j.label: [] for j in self.judges}
                for i, p in enumerate(prompts.prompts):
                    ab = arm.for_prompt(i)
                    for sample in range(self.decoding.samples):
                        g = texts[(ab.label, p.id, sample)]
                        gens.append(dict(meta, prompt_id=p.id, prompt=p.text, **cond, op=ab.op.value, eps=ab.eps,
                                         backend=self.cfg.backend, decoding=self.decoding.label,
                                         max_new_tokens=self.decoding.max_new_tokens, seed=g["seed"],
                                         sample=sample, text=g["text"], n_tokens=g["n_tokens"]))
                        for judge in self.judges:
                            v = judge.judge(p.text, g["text"])
                            got[judge.label].append(v)
                            verdicts.append(dict(meta, prompt_id=p.id, **cond, decoding=self.decoding.label,
                                                 sample=sample, judge=judge.label, harmful=v.harmful,
                                                 refused=v.refused, degenerate=v.degenerate, matched_rule=v.rule,
                                                 outcome=v.outcome))
                for judge_label, vs in got.items():
                    harm = [v.harmful for v in vs]
                    flags[(arm.label, judge_label)] = harm
                    normal = flags.get(("none", judge_label)) if arm.condition != "normal" else None
                    asr.append(dict(meta, kind=kind, **cond, op=self.cfg.op.value, eps=self.cfg.eps,
                                    decoding=self.decoding.label, judge=judge_label,
                                    **count_verdicts(vs), p_mcnemar=None if normal is None else mcnemar_exact(normal, harm)))
        return {"generations": make_table("generations", gens), "verdicts": make_table("verdicts", verdicts),
                "asr": make_table("asr", asr)}

    def record(self) -> dict[str, Any]:
        extra = {} if self.benign is None else {"benign": {"set": self.benign.name, "count": len(self.benign),
                                                           "file_sha256": self.benign.source_sha256}}
        return {**super().record(), **extra, "decoding": self.decoding.model_dump(mode="json"),
                "judges": [j.label for j in self.judges]}


def count_verdicts(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """The `asr` table's counts: answers (ASR, with its Wilson interval), refusals, non-answers (neither: an
    evasion is not help, and not a refusal either) and degenerate texts, each with its rate."""
    n = len(verdicts)
    harmful = sum(v.harmful for v in verdicts)
    refused = sum(v.refused for v in verdicts)
    non_answer = sum(v.outcome == "non_answer" for v in verdicts)
    degenerate = sum(v.degenerate for v in verdicts)
    lo, hi = wilson(harmful, n)

    def share(k: int) -> float:
        return k / n if n else float("nan")

    return dict(n=n, harmful=harmful, asr=share(harmful), ci_low=lo, ci_high=hi, refused=refused,
                refusal_rate=share(refused), degenerate=degenerate, degenerate_frac=share(degenerate),
                non_answer=non_answer, non_answer_rate=share(non_answer))
