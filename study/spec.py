"""The study spec: a YAML file (or one command) naming models with their roles and the experiment sections to
run on them, resolved into typed per-model experiment configs (`study.experiments`).

Light like `study.experiments` (no torch): `headstudy plan` and `submit` read a spec before anything heavy loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from study.core.errors import UsageError
from study.core.frozen import Frozen, build
from study.experiments.base import ModelConfig
from study.experiments.registry import EXPERIMENTS, FIXED, NOT_INHERITED
from study.models.builtin import check_model_name
from study.runtime.executor import ExecutionConfig

DEFAULT_STUDY = "quickstart.yaml"  # in the packaged configs folder


class ModelEntry(Frozen):
    """One model of a study: its role, the base it was fine-tuned from, and settings only it gets.

    `overrides` takes any section's keys (applied to every section that has the key) and section names
    mapping to keys for that section only: `{system_prompt: "...", asr: {limit: 50}}`. Precedence, most
    specific last: defaults, the experiment's section, the model's overrides, the model's section overrides.
    """

    name: str
    role: Literal["aligned", "base"] = "aligned"
    base: str | None = None  # the model this one was fine-tuned from (swap experiments need it)
    revision: str | None = None
    planted_heads: str | None = None  # heads its safety is known to live in (default: a family member's card)
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


class Published(Frozen):
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


class StudyConfig(Frozen):
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
    joint: Section = None
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
                   and k not in NOT_INHERITED.get(name, ())}
        values = {**inherit, **section}
        if entry is not None:
            values.update(model=entry.name, **entry.values_for(name, cls))
            for key in ("revision", "planted_heads"):
                if getattr(entry, key) is not None and key in cls.model_fields:
                    values[key] = getattr(entry, key)
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



class OverlapConfig(Frozen):
    """How the analysis compares top-k head sets across models, datasets and operators."""

    k: int = Field(default=10, ge=1)
