"""The surgery experiment: write an ablation into a model's weights once and save a normal checkpoint.
Config and job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import field_validator

from study.core.ablation import SURGERY_EPS, Ablation
from study.core.errors import UsageError
from study.core.heads import parse_heads
from study.experiments.base import AblatingConfig, Job
from study.models.builtin import model_id
from study.runtime.executor import Outcome
from study.runtime.runfolder import LOCK_FILE
from study.runtime.shards import SurgeryShard
from study.runtime.store import model_slug

log = logging.getLogger(__name__)


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


class SurgeryJob(Job):
    """Save the model with an ablation written into its weights: one shard, run by a worker that holds the model
    (on a cluster, an actor: the checkpoint folder must be storage it can write), which puts the weights back."""

    experiment = "surgery"
    cfg: SurgeryConfig

    def __init__(self, cfg: SurgeryConfig, out: Path) -> None:
        super().__init__(cfg, out)
        cfg.ablation.check(self.shape)  # heads against the config, before any weight loads
        self.checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else out / "checkpoints" / model_slug(
            model_id(cfg.model))
        self.saved: dict[str, Any] = self._already_saved()
        self.shard = SurgeryShard(model=self.model, ablation=cfg.ablation, checkpoint=str(self.checkpoint.resolve()),
                                  may_hold=_RUN_FILES)

    def _already_saved(self) -> dict[str, Any]:
        """A checkpoint folder that holds this very surgery (same model content, same ablation) is done: a rerun
        of the study keeps it. Any other content in it is refused before anything loads."""
        folder = self.checkpoint
        if not folder.exists() or (folder.is_dir() and all(p.name in _RUN_FILES for p in folder.iterdir())):
            return {}
        try:
            info = json.loads((folder / "headstudy_surgery.json").read_text())
        except (OSError, ValueError):
            info = {}
        if (info.get("ablation") == self.cfg.ablation.model_dump(mode="json")
                and info.get("source_fingerprint") == self.identity.fingerprint):
            log.info("surgery: %s already holds %s of this model: kept", folder, self.cfg.ablation.label)
            return info
        raise UsageError(f"checkpoint folder {str(folder)!r} exists and is not empty (and holds no save of this "
                         f"model with {self.cfg.ablation.label}): choose a new --out")

    @property
    def done(self) -> bool:
        return bool(self.saved)

    @property
    def round_label(self) -> str:
        return "surgery"

    def pending(self) -> list[SurgeryShard]:
        return [] if self.done else [self.shard]

    def absorb(self, outcome: Outcome) -> None:
        row = outcome.table(self.shard).to_pylist()[0]
        self.saved = {"source": model_id(self.cfg.model), "ablation": self.cfg.ablation.model_dump(mode="json"),
                      "source_fingerprint": self.identity.fingerprint,
                      **{k: row[k] for k in ("label", "edited_parameters", "total_parameters")}}

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), **self.saved}


# a run folder's own files may already sit in the checkpoint folder (when it is the run folder)
_RUN_FILES = ("manifest.json", "manifests", LOCK_FILE)
