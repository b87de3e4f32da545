"""Surgery: write an ablation into the weights once and save a normal checkpoint (the paper uses eps 1e-10)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Collection

from study.core.ablation import Ablation
from study.core.architectures import Arch
from study.core.errors import UsageError
from study.core.files import staging_dir
from study.core.interventions import weights_edited
from study.models.loading import LoadedModel

log = logging.getLogger(__name__)


def save_ablated(lm: LoadedModel, ablation: Ablation, out: str | Path,
                 may_hold: Collection[str] = (), record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save `lm.model` with `ablation` written into its weights (and its tokenizer) to `out`, atomically; the
    model's own weights are put back afterwards, bit for bit.

    `out` must be new or empty, or hold only entries named in `may_hold` (a run folder's own files, when the
    checkpoint is the run folder: its lock, its manifests), which stay in it. Returns what was saved (source,
    ablation, edited and total parameter counts, and `record`), as also written to `out/headstudy_surgery.json`."""
    out = Path(out)
    if out.exists() and any(p.name not in may_hold for p in out.iterdir()):
        raise UsageError(f"checkpoint folder {str(out)!r} exists and is not empty: choose a new --out")
    arch = Arch.of(lm.model)
    ablation.check(arch.shape)
    # one head's block of each edited parameter: d_head x d_model weights (+ d_head bias) for a projection
    # (524,288 for a Llama-2-7B head), d_head for a q/k norm's weight; refuses before anything is written
    n_params = sum(part[..., h.head, :].numel() for h in ablation.heads
                   for part in arch.edit_target(lm.model, h.layer, ablation.op).parts)
    total = sum(p.numel() for p in lm.model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out.parent, f".{out.name}-")
    try:
        with weights_edited(lm.model, ablation, arch):
            lm.model.save_pretrained(staging)
        lm.tokenizer.save_pretrained(staging)
        info = dict(source=lm.model_id, ablation=ablation.model_dump(mode="json"), label=ablation.label,
                    edited_parameters=n_params, total_parameters=total, **(record or {}))
        (staging / "headstudy_surgery.json").write_text(json.dumps(info, indent=2))
        kept = [p.name for p in out.iterdir()] if out.exists() else []
        for name in kept:  # the run folder's own files go along (an open lock keeps its inode, so it holds)
            os.replace(out / name, staging / name)
        try:
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        except OSError:
            for name in kept:
                os.replace(staging / name, out / name)
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("saved %s with %s (%d of %d parameters edited)", out, ablation.label, n_params, total)
    return info
