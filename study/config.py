"""Typed, frozen run configurations (CLI flags and YAML study specs map onto these).

Every field is validated before any model is loaded, so bad input ends with one clear line. Unknown keys
are refused (`extra="forbid"`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.ablation import Op, check_eps, parse_op
from study.errors import UsageError
from study.models import DEFAULT_MODEL, DTYPES, check_device
from study.prompts import PromptFormat, parse_format
from study.scores import SubspaceSpec

EXECUTORS = ("local",)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScanConfig(_Frozen):
    """What every attribution shares: the model, the prompts, how they are formatted, the operator."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    prompts: str = "builtin:harmful"
    limit: int | None = Field(default=None, ge=1)
    format: PromptFormat = PromptFormat.PAPER
    system_prompt: str | None = None
    op: Op = Op.UNDIFF_Q
    eps: float = 1e-5
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: str | None = None
    token_budget: int | None = Field(default=None, ge=1)  # None: the engine's default for the device
    executor: Literal["local"] = "local"

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> PromptFormat:
        return parse_format(v)

    @field_validator("op", mode="before")
    @classmethod
    def _op(cls, v: Any) -> Op:
        return v if isinstance(v, Op) else parse_op(str(v))

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise UsageError(f"unknown dtype {v!r}: valid dtypes are {', '.join(DTYPES)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _eps(self) -> "ScanConfig":
        check_eps(self.op, self.eps)
        if self.system_prompt is not None and self.format is not PromptFormat.CHAT:
            raise UsageError(f"a system prompt needs format 'chat', not {self.format.value!r}")
        return self


class ShipsConfig(ScanConfig):
    """Query-level Ships: KL(normal || head ablated) per prompt and head."""

    top: int = Field(default=5, ge=1)  # heads printed per prompt


class SaharaConfig(ScanConfig):
    """Dataset-level attribution: generalized Ships per head, then the greedy Sahara search."""

    steps: int = Field(default=3, ge=1)
    rank: int = Field(default=1, ge=1)
    subspace: Literal["left", "right"] = "left"
    center: bool = False
    min_gain: float | None = None  # stop when the best score gains less than this (degrees)

    @property
    def subspace_spec(self) -> SubspaceSpec:
        return SubspaceSpec(rank=self.rank, side=self.subspace, center=self.center)


class StudyConfig(_Frozen):
    """A YAML study spec for `headstudy run`: shared settings, then which experiments to run."""

    out: str = "runs/quickstart"
    ships: dict[str, Any] | None = None
    sahara: dict[str, Any] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)

    def ships_config(self) -> ShipsConfig | None:
        return None if self.ships is None else build(ShipsConfig, {**self.defaults, **self.ships}, "ships")

    def sahara_config(self) -> SaharaConfig | None:
        return None if self.sahara is None else build(SaharaConfig, {**self.defaults, **self.sahara}, "sahara")


def build(cls: type[_Frozen], values: dict[str, Any], where: str = "") -> Any:
    """Construct a config, turning a pydantic error into one `UsageError` line naming key and valid keys."""
    prefix = f"{where}: " if where else ""
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            raise UsageError(f"{prefix}unknown config key {key!r}: valid keys are {valid}") from None
        raise UsageError(f"{prefix}bad value for {key!r} ({first.get('input')!r}): {first['msg']}") from None


def load_study(path: str | os.PathLike[str]) -> StudyConfig:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} not found: pass a YAML study spec, e.g. configs/quickstart.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must be a mapping of keys, got {type(data).__name__}")
    cfg = build(StudyConfig, data, str(p))
    if cfg.ships is None and cfg.sahara is None:
        raise UsageError(f"config file {str(p)!r} runs nothing: add a 'ships' and/or 'sahara' section")
    cfg.ships_config(), cfg.sahara_config()  # validate every section before anything runs
    return cfg
