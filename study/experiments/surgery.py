"""The surgery experiment: write an ablation into a model's weights once and save a normal checkpoint.
Config and job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import field_validator

from study.core.ablation import SURGERY_EPS, Ablation
from study.core.errors import UsageError
from study.core.heads import parse_heads
from study.experiments.base import AblatingConfig, Job
from study.models.builtin import model_id
from study.runtime.runfolder import LOCK_FILE
from study.runtime.store import model_slug


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
        from study.models.loading import load_model
        from study.models.surgery import save_ablated

        lm = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype, revision=self.identity.revision)
        self.saved = save_ablated(lm, self.cfg.ablation, self.checkpoint, may_hold=_RUN_FILES)

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), **self.saved}


# a run folder's own files may already sit in the checkpoint folder (when it is the run folder)
_RUN_FILES = ("manifest.json", "manifests", LOCK_FILE)
