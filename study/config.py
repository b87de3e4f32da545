"""Typed, frozen configurations: what to compute (one experiment on one model) and where to run it (execution).

Light by design (no torch, transformers, ray or vllm): a spec or a command line is validated and planned
before anything heavy is imported. Each default and each check is written once, here or in the value type
it belongs to (`study.ablation` for operators and eps, `study.prompts` for formats). Unknown keys are
refused (`extra="forbid"`). A study spec, which names models and sections of these, is `study.spec`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.ablation import DEFAULT_OP, SCORING_EPS, SURGERY_EPS, Ablation, Op, check_eps, parse_op
from study.errors import UsageError
from study.generation import DEFAULT_MAX_NEW_TOKENS, VLLM_OPS, Decoding, check_backend, parse_decoding
from study.heads import parse_heads
from study.judges import LLM_PREFIX, get_judge, is_llm_judge
from study.models import DEFAULT_MODEL, check_device, check_dtype, check_model_name
from study.prompts import PromptFormat, check_system_prompt, parse_format
from study.swap import MIXED_RECIPES, Recipe, parse_recipe

EXECUTORS = ("local", "ray")
DEFAULT_EXECUTOR = "ray"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SubspaceSpec(_Frozen):
    """Which subspace of the (prompts × d_model) hidden-state matrix generalized Ships compares.

    `left`: top-r left singular vectors (directions in prompt space, the paper's choice);
    `right`: top-r right singular vectors (directions in hidden space, a "refusal subspace").
    `center` subtracts the mean over prompts before the SVD.
    """

    rank: int = Field(default=1, ge=1)
    side: Literal["left", "right"] = "left"
    center: bool = False

    @classmethod
    def paper(cls) -> "SubspaceSpec":
        """The paper and authors' code: left singular space, r = 1, uncentred."""
        return cls(rank=1, side="left", center=False)


class ModelConfig(_Frozen):
    """Which model, and how a worker loads it."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"  # cuda where the worker holds a GPU, else cpu
    dtype: str = "float32"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return check_dtype(v)

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


class SurgeryConfig(AblatingConfig):
    """Write an ablation into the weights once and save a normal checkpoint (the paper: eps 1e-10)."""

    heads: str  # labels, e.g. "L18H8,L7H2"
    eps: float = SURGERY_EPS
    checkpoint: str | None = None  # default: OUT/checkpoints/<model>

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str) -> str:
        return ",".join(h.label for h in parse_heads(v))

    @property
    def ablation(self) -> Ablation:
        return Ablation(heads=parse_heads(self.heads), op=self.op, eps=self.eps)


class ScreenedScanConfig(ScanConfig):
    """A scan that may screen: every head scored on a low-precision copy first, then the top `verify_top`
    candidates (Ships: of each prompt; Sahara: of each step) re-scored at the model's own dtype (the tables'
    `exact` column says which scores are)."""

    screen: Literal["bf16", "fp16"] | None = None
    verify_top: int = Field(default=20, ge=1)


class ShipsConfig(ScreenedScanConfig):
    """Query-level Ships: KL(normal || head ablated) per prompt and head."""

    top: int = Field(default=5, ge=1)  # heads printed per prompt


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


class GeneratingConfig(ScanConfig):
    """What every experiment that generates and judges shares: decoding, judges and the over-refusal set."""

    backend: str = "hf"
    decoding: str = "greedy"
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    samples: int = Field(default=1, ge=1)
    seed: int = 0
    judges: list[str] = Field(default_factory=lambda: ["paper"], min_length=1)  # the first is the headline
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


def _head_labels(v: str | None) -> str | None:
    return None if v is None else ",".join(h.label for h in parse_heads(v))


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

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str | None) -> str | None:
        return _head_labels(v)

    @model_validator(mode="after")
    def _sources(self) -> "AsrConfig":
        if self.heads is not None and self.from_run is not None:
            raise UsageError("asr: give heads or from_run, not both")
        return self


class SwapConfig(GeneratingConfig):
    """Base-weight swaps between an aligned model (`model`) and its `base`: each recipe's mixed model is
    generated with and judged on the harmful and benign prompts, and its safety heads scored (Ships).

    The safety heads the head recipes move are `heads`, else the first `k` of this run's Sahara group of the
    aligned model."""

    base: str
    base_revision: str | None = None
    recipes: list[str] = Field(default_factory=lambda: [r.value for r in MIXED_RECIPES], min_length=1)
    heads: str | None = None
    k: int | None = Field(default=None, ge=1)

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
            raise UsageError("swap: use keyword judges (paper, paper-code, gcg, refusal); llm judges run in asr")
        if self.base == self.model and self.base_revision == self.revision:
            raise UsageError(f"swap: the base of {self.model!r} is itself: give the model it was fine-tuned from")
        return self

    @property
    def recipe_list(self) -> list[Recipe]:
        return [Recipe(r) for r in self.recipes]


class ExecutionConfig(_Frozen):
    """Where the work runs: in this process (`local`) or on a Ray pool (local cluster or `address`)."""

    executor: Literal["local", "ray"] = DEFAULT_EXECUTOR
    address: str | None = None  # a running Ray cluster ("auto", "ray://host:10001", "host:6379")
    actors: int | None = Field(default=None, ge=1)  # per model; None: fill the cluster
    cpus_per_actor: int | None = Field(default=None, ge=1)  # CPUs and torch threads per actor: None = 1 on
    # Ray; the local executor uses it as its thread count when given (else torch's default, all cores)
    gpus_per_actor: int | None = Field(default=None, ge=1)  # None: 1 where the cluster has GPUs
    max_retries: int = Field(default=3, ge=0)  # per shard, after an actor died

    @field_validator("executor", mode="before")
    @classmethod
    def _executor(cls, v: Any) -> str:
        if v not in EXECUTORS:
            raise UsageError(f"unknown executor {v!r}: valid executors are {', '.join(EXECUTORS)}")
        return v

    @model_validator(mode="after")
    def _address(self) -> "ExecutionConfig":
        if self.address is not None and self.executor != "ray":
            raise UsageError(f"--address {self.address!r} needs the ray executor, not {self.executor!r}")
        return self


class UtilityConfig(ScanConfig):
    """What the ablations studied cost: perplexity on benign text (default: the paragraphs shipped with the
    project; `prompts: FILE.txt` for your own, one passage per line) for the normal model, `heads` or this
    run's Sahara prefixes, and random controls; optionally the paper's lm-eval zero-shot tasks."""

    prompts: str = "builtin:text"
    heads: str | None = None
    k: int | None = Field(default=None, ge=1)  # Sahara prefixes of size 1..k (default all steps)
    random_controls: int = Field(default=0, ge=0)
    seed: int = 0
    lm_eval_tasks: list[str] = Field(default_factory=list)  # e.g. boolq, rte, winogrande, arc_challenge, openbookqa
    lm_eval_limit: int | None = Field(default=None, ge=1)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: str | None) -> str | None:
        return _head_labels(v)


class SpecificityConfig(ShipsConfig):
    """Ships on benign prompts in the same format, so each head's harmful score can be set against it."""

    prompts: str = "builtin:benign"


class OverlapConfig(_Frozen):
    """How the analysis compares top-k head sets across models, datasets and operators."""

    k: int = Field(default=10, ge=1)


EXPERIMENTS: dict[str, type[ModelConfig]] = {
    "ships": ShipsConfig, "specificity": SpecificityConfig, "generalized_ships": SaharaConfig,
    "sahara": SaharaConfig, "asr": AsrConfig, "swap": SwapConfig, "utility": UtilityConfig,
    "surgery": SurgeryConfig}
# generalized Ships is Sahara's first step, every head scored; perplexity reads raw text, not a prompt
FIXED = {"generalized_ships": {"steps": 1}, "utility": {"format": "direct", "system_prompt": None}}
# sections whose own prompt set (benign prompts, benign text) and its limit the study's defaults do not replace
OWN_PROMPTS = ("specificity", "utility")


def build(cls: type[_Frozen], values: dict[str, Any], where: str = "") -> Any:
    """Construct a config, turning a pydantic error into one `UsageError` line naming key and valid keys."""
    prefix = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise UsageError(f"{prefix}expected a mapping of keys, got {type(values).__name__}")
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            raise UsageError(f"{prefix}unknown config key {key!r}: valid keys are {valid}") from None
        raise UsageError(f"{prefix}bad value for {key!r} ({first.get('input')!r}): {first['msg']}") from None
