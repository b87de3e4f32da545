"""Resolving a config into loaded inputs: prompts first (cheap, fails fast), then the model, then tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from study import __version__
from study.config import ScanConfig
from study.models import LoadedModel, check_model_name, load_model
from study.prompts import PromptSet, encode_all, load_prompts

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    lm: LoadedModel
    prompts: PromptSet
    token_ids: list[list[int]]

    def meta(self, run_id: str, cfg: ScanConfig) -> dict[str, Any]:
        """The run metadata columns every table row carries."""
        return dict(run_id=run_id, model=self.lm.model_id, model_revision=self.lm.revision,
                    dataset=self.prompts.name, prompt_format=cfg.format.value, code_version=__version__)


def validate(cfg: ScanConfig) -> PromptSet:
    """Everything that can be checked without loading the model."""
    check_model_name(cfg.model)
    return load_prompts(cfg.prompts, data_dir=cfg.data_dir, limit=cfg.limit)


def prepare(cfg: ScanConfig, prompts: PromptSet | None = None, lm: LoadedModel | None = None) -> Inputs:
    prompts = prompts or validate(cfg)
    if lm is None:
        log.info("loading model %s (%s, %s)", cfg.model, cfg.device, cfg.dtype)
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision)
    ids = encode_all(prompts, cfg.format, lm.tokenizer, cfg.system_prompt)
    return Inputs(lm, prompts, ids)
