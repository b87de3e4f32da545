"""What every experiment shares: the configs of a model, an ablation, a scan and a generation, and `Job`,
one experiment on one model as a state machine the runner advances (plan, shards, absorb results, tables).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from functools import cache
from pathlib import Path
from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator
from pydantic_core import to_jsonable_python

from study import __version__
from study.core.ablation import DEFAULT_OP, SCORING_EPS, Ablation, Op, check_eps, parse_op
from study.core.architectures import check_architecture
from study.core.dtypes import AUTO, SCREEN_DTYPES, check_dtype
from study.core.errors import UsageError
from study.core.frozen import Frozen
from study.core.heads import Head, all_heads, labels, parse_heads
from study.core.shape import ModelShape
from study.generation.backends import VLLM_OPS, check_backend
from study.generation.decoding import DEFAULT_MAX_NEW_TOKENS, Decoding, parse_decoding
from study.generation.judges.base import LLM_PREFIX
from study.generation.judges.registry import DEFAULT_JUDGE, get_judge, is_llm_judge
from study.models.builtin import DEFAULT_MODEL, check_model_name, model_id, planted_heads, training_ids
from study.models.fingerprint import model_identity
from study.models.loading import check_device, model_shape
from study.prompts.formats import PromptFormat, check_system_prompt, parse_format
from study.prompts.sets import PromptSet, load_prompts
from study.runtime.columns import constant
from study.runtime.executor import ExecutionConfig, Outcome, WorkerOptions, resolve_dtype
from study.runtime.shards import ModelRef, PromptBlock, Shard

log = logging.getLogger(__name__)


class ModelConfig(Frozen):
    """Which model, and how a worker loads it."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"  # cuda where the worker holds a GPU, else cpu
    dtype: str = AUTO  # bfloat16 where the workers hold a GPU, else float32 (resolved when the study is planned)
    # the heads this model's safety is known to live in (a planted model): recorded in the manifest, ablated by
    # asr as condition `planted` and checked first in the report. A family member's card fills it in.
    planted_heads: str | None = None

    @field_validator("planted_heads")
    @classmethod
    def _planted(cls, v: str | None) -> str | None:
        return _head_labels(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return check_dtype(v, auto=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)


class AblatingConfig(ModelConfig):
    """A model and one operator with its eps (checked together)."""

    op: Op = DEFAULT_OP
    eps: float = SCORING_EPS

    @field_validator("op", mode="before")
    @classmethod
    def _op(cls, v: Any) -> Op:
        return v if isinstance(v, Op) else parse_op(str(v))

    @model_validator(mode="after")
    def _eps(self) -> "AblatingConfig":
        check_eps(self.op, self.eps)
        return self


class ScanConfig(AblatingConfig):
    """What every attribution shares: the model, the prompts, how they are formatted, the operator."""

    prompts: str = "builtin:harmful"
    limit: int | None = Field(default=None, ge=1)
    format: PromptFormat = PromptFormat.PAPER
    system_prompt: str | None = None
    data_dir: str | None = None
    token_budget: int | None = Field(default=None, ge=1)  # None: the engine's default for the device
    shard_heads: int = Field(default=32, ge=1)  # ablations per shard (the unit of work, retry and resume)
    shard_prompts: int = Field(default=16, ge=1)  # prompts per Ships shard

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> PromptFormat:
        return parse_format(v)

    @model_validator(mode="after")
    def _system(self) -> "ScanConfig":
        check_system_prompt(self.format, self.system_prompt)
        return self


class ScreenedScanConfig(ScanConfig):
    """A scan that may screen: every head scored on a low-precision copy first, then the top `verify_top`
    candidates (Ships: of each prompt; Sahara: of each step) re-scored at the model's own dtype (the tables'
    `exact` column says which scores are)."""

    screen: Literal["bf16", "fp16"] | None = None
    verify_top: int = Field(default=20, ge=1)


class GeneratingConfig(ScanConfig):
    """What every experiment that generates and judges shares: decoding, judges and the over-refusal set."""

    backend: str = "hf"
    decoding: str = "greedy"
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    samples: int = Field(default=1, ge=1)
    seed: int = 0
    # the first is the headline: `outcome` (a non-answer is no attack success); the paper's judge beside it
    judges: list[str] = Field(default_factory=lambda: [DEFAULT_JUDGE, "paper"], min_length=1)
    benign: str | None = "builtin:benign"  # over-refusal set, the same ablations (none: skip)
    benign_limit: int | None = Field(default=None, ge=1)  # default: `limit`

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return check_backend(v)

    @field_validator("benign", mode="before")
    @classmethod
    def _benign(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() == "none" else v

    @field_validator("judges", mode="before")
    @classmethod
    def _judges(cls, v: Any) -> list[str]:
        names = [j.strip() for j in v.split(",")] if isinstance(v, str) else list(v)
        for name in names:
            get_judge(name)  # a UsageError naming the valid judges, or an llm: judge without a model
            if is_llm_judge(name):
                check_model_name(name[len(LLM_PREFIX):].strip())
        return names

    @model_validator(mode="after")
    def _decoding(self) -> "GeneratingConfig":
        parse_decoding(self.decoding, max_new_tokens=self.max_new_tokens, samples=self.samples, seed=self.seed)
        if self.backend == "vllm" and self.op.value not in VLLM_OPS:
            raise UsageError(f"operator {self.op.value} has no vLLM weight edit: use {' or '.join(VLLM_OPS)} "
                             f"with --backend vllm, or --backend hf")
        return self

    @property
    def decoding_spec(self) -> Decoding:
        return parse_decoding(self.decoding, max_new_tokens=self.max_new_tokens, samples=self.samples,
                              seed=self.seed)


# settings that never change a job's rows: where and in what pieces the work runs, what is printed, where a
# checkpoint goes, which folder a prompt file was found in (its content is the prompts' identity)
NOT_ROWS = frozenset({"model", "device", "token_budget", "shard_heads", "shard_prompts", "data_dir", "top",
                      "checkpoint"})
# settings that change how many rows, not which: the first n prompts, steps, group sizes, samples, controls
SIZES = frozenset({"limit", "benign_limit", "steps", "k", "samples", "random_controls", "lm_eval_limit"})


@cache
def _defaults(cls: type[ModelConfig]) -> dict[str, Any]:
    """Each field's default as JSON would show it (a required field gets a value no setting can have)."""
    return {name: to_jsonable_python(f.get_default(call_default_factory=True)) if not f.is_required() else object()
            for name, f in cls.model_fields.items()}


def _head_labels(v: str | None) -> str | None:
    return None if v is None else ",".join(h.label for h in parse_heads(v))


class Job(ABC):
    """One experiment on one model: validated and planned without loading the model."""

    experiment: str

    def __init__(self, cfg: ModelConfig, out: Path) -> None:
        check_model_name(cfg.model)
        if cfg.dtype == AUTO:  # a job made outside a plan: this machine decides (`plan_study` asks the executor)
            cfg = cfg.model_copy(update={"dtype": resolve_dtype(AUTO, cfg.device, ExecutionConfig())})
        self.cfg = cfg
        self.shape: ModelShape = model_shape(cfg.model, cfg.revision)
        check_architecture(cfg.model, self.shape)
        self.identity = model_identity(cfg.model, cfg.revision)
        self.planted: tuple[Head, ...] = (
            tuple(h.check(self.shape.n_layers, self.shape.n_heads) for h in parse_heads(cfg.planted_heads))
            if cfg.planted_heads else planted_heads(cfg.model))
        self.model = ModelRef(name=cfg.model, revision=self.identity.revision, dtype=cfg.dtype,
                              fingerprint=self.identity.fingerprint)
        self.options = WorkerOptions(device=cfg.device, token_budget=getattr(cfg, "token_budget", None))

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

    def expected(self) -> dict[tuple[ModelRef, str], int]:
        """Work this job will submit in rounds it cannot name yet (Sahara's later steps, the arms that need its
        group), as rows by the model that runs them and kind ("row": scored, "text": generated); an estimate the
        executor sizes pools with before the work is queued."""
        return {}

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
        """What the manifest says about this job's inputs (and, for a member with planted heads, its known answer)."""
        return {"model_id": model_id(self.cfg.model), "model_fingerprint": self.identity.fingerprint,
                "model_revision_loaded": self.identity.revision,
                **({"planted_heads": labels(self.planted)} if self.planted else {})}


class ScanJob(Job):
    """A job that scores ablations on a prompt set, in shards."""

    cfg: ScanConfig

    def __init__(self, cfg: ScanConfig, out: Path) -> None:
        super().__init__(cfg, out)
        self.prompts: PromptSet = load_prompts(cfg.prompts, data_dir=cfg.data_dir, limit=cfg.limit)
        self.heads: list[Head] = all_heads(self.shape.n_layers, self.shape.n_heads)
        trained = training_ids(cfg.model)
        self.trained_on = sum(p.id in trained for p in self.prompts)
        if self.trained_on:
            log.warning("%d of the %d prompts of %s trained %s (its card lists them): scores on them are not "
                        "held out", self.trained_on, len(self.prompts), self.prompts.name, cfg.model)

    def block(self, index: slice = slice(None)) -> PromptBlock:
        return PromptBlock.of(self.prompts, self.cfg.format, self.cfg.system_prompt, index)

    def meta_values(self, run_id: str, dataset: str | None = None) -> dict[str, str | None]:
        """The run metadata every table row carries (`dataset`: another set than the job's prompts)."""
        return dict(run_id=run_id, model=model_id(self.cfg.model), model_revision=self.cfg.revision,
                    dataset=dataset or self.prompts.name, prompt_format=self.cfg.format.value,
                    code_version=__version__)

    def meta(self, run_id: str, n: int) -> dict[str, pa.Array]:
        """The run metadata columns for n rows, each one value and n indices."""
        return {k: constant(v, n) for k, v in self.meta_values(run_id).items()}

    def ablation(self, heads: tuple[Head, ...] = ()) -> Ablation:
        return Ablation(heads=heads, op=self.cfg.op, eps=self.cfg.eps)

    @property
    def screen_model(self) -> ModelRef:
        """The low-precision copy a screened round runs on (a `ScreenedScanConfig`'s `screen`): another dtype,
        so its own shard ids and workers."""
        return self.model.model_copy(update={"dtype": SCREEN_DTYPES[self.cfg.screen]})

    @property
    def condition(self) -> dict[str, Any]:
        """What makes two jobs of one experiment and model different results: every setting that changes which
        rows the job writes or their values, except how many (`SIZES`: a rerun with more replaces the rows
        of fewer). Settings at their defaults are left out, so a file's name stays what it was before a
        setting existed."""
        c = self.cfg
        out: dict[str, Any] = dict(prompts=self.prompts.name, op=c.op.value, eps=c.eps, format=c.format.value,
                                   system_prompt=c.system_prompt)
        values = c.model_dump(mode="json")
        for name, default in _defaults(type(c)).items():
            if name not in out and name not in NOT_ROWS and name not in SIZES and values[name] != default:
                out[name] = values[name]
        return out

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
