"""Typed, frozen configurations: what to compute (experiments), where to run it (execution), and the study spec.

Light by design (no torch, transformers, ray or vllm): a spec or a command line is validated and planned
before anything heavy is imported. Each default and each check is written once, here or in the value type
it belongs to (`study.ablation` for operators and eps, `study.prompts` for formats). Unknown keys are
refused (`extra="forbid"`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
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
DEFAULT_STUDY = "quickstart.yaml"  # in the packaged configs folder


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


class ModelEntry(_Frozen):
    """One model of a study: its role, the base it was fine-tuned from, and settings only it gets.

    `overrides` takes any section's keys (applied to every section that has the key) and section names
    mapping to keys for that section only: `{system_prompt: "...", asr: {limit: 50}}`. Precedence, most
    specific last: defaults, the experiment's section, the model's overrides, the model's section overrides.
    """

    name: str
    role: Literal["aligned", "base"] = "aligned"
    base: str | None = None  # the model this one was fine-tuned from (swap experiments need it)
    revision: str | None = None
    experiments: list[str] | None = None  # which sections run on this model (default: all)
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("experiments")
    @classmethod
    def _experiments(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in EXPERIMENTS:
                raise UsageError(f"unknown experiment {name!r}: valid experiments are {', '.join(EXPERIMENTS)}")
        return v

    @field_validator("name", "base")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None:
            check_model_name(v)
        return v

    @model_validator(mode="after")
    def _roles(self) -> "ModelEntry":
        if self.role == "base" and self.base is not None:
            raise UsageError(f"model {self.name!r} has role base and a base ({self.base!r}): a base model has "
                             f"no base; give role aligned to a fine-tune")
        if self.base == self.name:
            raise UsageError(f"model {self.name!r} names itself as its base")
        known = {k for c in EXPERIMENTS.values() for k in c.model_fields}
        for key, value in self.overrides.items():
            if key in EXPERIMENTS:
                if not isinstance(value, dict):
                    raise UsageError(f"model {self.name!r}: overrides.{key} must be a mapping of {key} keys")
                for k in value:
                    if k not in EXPERIMENTS[key].model_fields:
                        raise UsageError(f"model {self.name!r}: overrides.{key}: unknown config key {k!r}: valid "
                                         f"keys are {', '.join(EXPERIMENTS[key].model_fields)}")
            elif key not in known:
                raise UsageError(f"model {self.name!r}: unknown override {key!r}: give a config key "
                                 f"({', '.join(sorted(known))}) or a section ({', '.join(EXPERIMENTS)})")
        return self

    def values_for(self, section: str, cls: type[ModelConfig]) -> dict[str, Any]:
        """This model's overrides that apply to `section`."""
        flat = {k: v for k, v in self.overrides.items() if k not in EXPERIMENTS and k in cls.model_fields}
        return {**flat, **self.overrides.get(section, {})}


Section = dict[str, Any] | list[dict[str, Any]] | None  # one settings mapping, or several (one job set each)


class Published(_Frozen):
    """A number the paper reports, stated beside the experiment that measures it, so the report can set
    the measured value against it (METHOD.md section 7)."""

    experiment: str
    model: str
    claim: str
    metric: str  # asr | delta_asr | top_head | group | note
    value: float | str | list[float] | list[str]
    baseline: float | None = None  # the normal model's value where the claim is a change
    dataset: str | None = None
    op: str | None = None
    decoding: str | None = None
    source: str = "Zhou et al., ICLR 2025"

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if v not in EXPERIMENTS:
            raise UsageError(f"published: unknown experiment {v!r}: valid experiments are {', '.join(EXPERIMENTS)}")
        return v


class StudyConfig(_Frozen):
    """A YAML study spec for `headstudy run`: shared settings, models with their roles, the experiments.

    `models` (optional) runs every experiment on each listed model (one pool per model, concurrently; a
    `swap` section runs for each aligned model with a `base`); without it, each section's `model` (default:
    the embedded SmolLM2) is the one model. An entry is a name or a mapping (`ModelEntry`); `{file: F,
    role:, base:, overrides:}` lists many models, one per line of F (resolved by `load_study`).
    """

    out: str = "runs/quickstart"
    models: list[ModelEntry] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    ships: Section = None
    specificity: Section = None
    generalized_ships: Section = None
    sahara: Section = None
    asr: Section = None
    swap: Section = None
    utility: Section = None
    surgery: Section = None
    overlap: OverlapConfig | None = None
    published: list[Published] = Field(default_factory=list)  # the paper's numbers, for the report to set beside

    @field_validator("execution", mode="before")
    @classmethod
    def _execution(cls, v: Any) -> ExecutionConfig:
        return v if isinstance(v, ExecutionConfig) else build(ExecutionConfig, v or {}, "execution")

    @field_validator("overlap", mode="before")
    @classmethod
    def _overlap(cls, v: Any) -> OverlapConfig:
        return v if isinstance(v, OverlapConfig) else build(OverlapConfig, v or {}, "overlap")

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, list):
            raise UsageError(f"models: expected a list of model names or entries, got {type(v).__name__}")
        out = []
        for i, item in enumerate(v):
            if isinstance(item, ModelEntry):
                out.append(item)
            elif isinstance(item, str):
                out.append(build(ModelEntry, {"name": item}, f"models[{i}]"))
            elif isinstance(item, dict) and "file" in item:
                raise UsageError(f"models[{i}]: a 'file' entry is read by load_study (give the spec as a file)")
            else:
                out.append(build(ModelEntry, item, f"models[{i}]"))
        return out

    @model_validator(mode="after")
    def _runs_something(self) -> "StudyConfig":
        if not any(getattr(self, name) is not None for name in EXPERIMENTS):
            raise UsageError(f"the study runs nothing: add a section ({', '.join(EXPERIMENTS)})")
        if self.models is not None and not self.models:
            raise UsageError("'models' is empty: list at least one model, or drop the key")
        if self.models:
            names = [m.name for m in self.models]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise UsageError(f"models: {dup[0]!r} is listed twice: list each model once")
            sections = [getattr(self, n) for n in EXPERIMENTS]
            if any("model" in part for sec in sections if sec for part in (sec if isinstance(sec, list) else [sec])
                   if isinstance(part, dict)):
                raise UsageError("a section sets 'model' while the study lists 'models': use one or the other")
        if self.swap is not None and not any(m.base for m in self.models or []):
            raise UsageError("swap: no model names its base: list the fine-tunes under 'models' with "
                             "'base: <the model it was fine-tuned from>'")
        known = {k for cls in EXPERIMENTS.values() for k in cls.model_fields}
        for key in self.defaults:
            if key not in known:
                raise UsageError(f"defaults: unknown config key {key!r}: valid keys are {', '.join(sorted(known))}")
        list(self.jobs())  # validate every section for every model before anything runs
        return self

    def entry(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models or [] if m.name == name), None)

    def jobs(self) -> Iterator[tuple[str, ModelConfig]]:
        """(experiment, config) for every experiment section and every model, in spec order. A section takes
        the defaults it has fields for (a surgery section has no prompts)."""
        for name, cls in EXPERIMENTS.items():
            section = getattr(self, name)
            if section is None:
                continue
            for entry in self.models or [None]:
                if name == "swap" and (entry is None or entry.base is None):
                    continue
                if entry is not None and entry.experiments is not None and name not in entry.experiments:
                    continue
                for settings in section if isinstance(section, list) else [section]:
                    yield from self._jobs(name, cls, entry, settings)

    def _jobs(self, name: str, cls: type[ModelConfig], entry: ModelEntry | None,
              section: Any) -> Iterator[tuple[str, ModelConfig]]:
        """One settings mapping of a section on one model (or the section's own model): its jobs."""
        if not isinstance(section, dict):
            raise UsageError(f"{name}: expected a mapping of keys (or a list of them), got {type(section).__name__}")
        inherit = {k: v for k, v in self.defaults.items() if k in cls.model_fields
                   and not (k in ("prompts", "limit") and name in OWN_PROMPTS)}
        values = {**inherit, **section}
        if entry is not None:
            values.update(model=entry.name, **entry.values_for(name, cls))
            if entry.revision is not None:
                values["revision"] = entry.revision
            if name == "swap":
                base = self.entry(entry.base)
                values.update(base=entry.base, base_revision=base.revision if base else None)
        values.update(FIXED.get(name, {}))
        where = name if entry is None else f"{name} ({entry.name})"
        for combo in _sweep(values):
            yield name, build(cls, combo, where)

    def with_overrides(self, defaults: dict[str, Any], execution: dict[str, Any]) -> "StudyConfig":
        """The spec with command-line overrides applied (and validated again)."""
        return build(StudyConfig, {**self.model_dump(exclude={"execution", "overlap"}),
                                   "overlap": self.overlap,
                                   "defaults": {**self.defaults, **defaults},
                                   "execution": {**self.execution.model_dump(exclude_unset=True), **execution}})


SWEEPS = ("prompts", "op", "decoding")  # keys a list may give: one job per value (per combination of values)


def _sweep(values: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`{prompts: [a, b], op: [x, y]}` -> four value sets, in spec order (the first key outermost)."""
    combos = [dict(values)]
    for key in SWEEPS:
        v = values.get(key)
        if isinstance(v, list):
            if not v:
                raise UsageError(f"{key}: an empty list: give at least one value")
            combos = [{**c, key: item} for c in combos for item in dict.fromkeys(v)]
    yield from combos


def one_experiment(name: str, values: dict[str, Any], execution: dict[str, Any], out: str) -> StudyConfig:
    """A single command (`headstudy ships ...`) as a one-experiment study: one code path for everything."""
    cls = EXPERIMENTS[name]
    build(cls, values, "")  # the command's own line names a bad value without a section prefix
    return build(StudyConfig, {"out": out, name: values, "execution": execution})


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


def packaged_configs() -> Path:
    """The built-in study specs (`study/configs`, a link to the project's `configs/` that the wheel copies)."""
    return Path(__file__).parent / "configs"


def find_config(name: str | os.PathLike[str] | None) -> Path:
    """A spec path as given, else a built-in spec by file name or stem (`quickstart`), from any directory."""
    if name is None:
        name = DEFAULT_STUDY
    p = Path(name)
    if p.is_file():
        return p
    builtin = packaged_configs()
    for candidate in (builtin / p.name, builtin / f"{p.name}.yaml"):
        if candidate.is_file() and p.parent == Path("."):
            return candidate
    known = ", ".join(sorted(c.stem for c in builtin.glob("*.yaml"))) or "none"
    raise UsageError(f"config file {str(name)!r} not found: pass a YAML study spec or a built-in one ({known})")


def _expand_model_files(items: list[Any], folder: Path) -> list[Any]:
    """`{file: F, ...}` entries become one entry per model named in F (one per line; `#` comments), each
    with the entry's other keys (role, base, overrides). F is relative to the spec's folder."""
    out: list[Any] = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and "file" in item):
            out.append(item)
            continue
        rest = {k: v for k, v in item.items() if k != "file"}
        f = Path(str(item["file"])).expanduser()
        f = f if f.is_absolute() else folder / f
        if not f.is_file():
            raise UsageError(f"models[{i}]: model list file {str(f)!r} not found (a path relative to the spec)")
        names = [line.split("#", 1)[0].strip() for line in f.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        if not names:
            raise UsageError(f"models[{i}]: model list file {str(f)!r} names no model (one per line)")
        out += [{"name": n, **rest} for n in names]
    return out


def load_study(path: str | os.PathLike[str] | None) -> StudyConfig:
    p = find_config(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must be a mapping of keys, got {type(data).__name__}")
    try:
        if isinstance(data.get("models"), list):
            data["models"] = _expand_model_files(data["models"], p.parent)
        return build(StudyConfig, data, str(p))
    except UsageError as err:
        msg = str(err)
        raise UsageError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None
