"""Running experiments end to end: validate, load, score, write tables and a manifest atomically.

Each `run_*` function returns what it wrote (the tables) so the CLI can summarise it; nothing is written
unless the whole experiment succeeds.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from study.config import SaharaConfig, ScanConfig, ShipsConfig, StudyConfig
from study.inputs import Inputs, prepare, validate
from study.models import LoadedModel
from study.sahara import run_sahara, settled_group
from study.search import Step
from study.ships import ships_table
from study.store import RunWriter, config_hash, new_run_id, package_versions

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    run_id: str
    out: Path
    tables: dict[str, pa.Table] = field(default_factory=dict)
    group: tuple = ()
    steps: list[Step] = field(default_factory=list)


def _manifest(run_id: str, command: str, configs: dict[str, ScanConfig | StudyConfig],
              timings: dict[str, float]) -> dict[str, Any]:
    resolved = {name: c.model_dump(mode="json") for name, c in configs.items()}
    return dict(run_id=run_id, command=command, argv=sys.argv, config=resolved, config_hash=config_hash(resolved),
                versions=package_versions(), timings_s=timings)


def run_ships(cfg: ShipsConfig, out: str | Path, inputs: Inputs | None = None) -> RunOutput:
    inputs = inputs or prepare(cfg)
    run_id = new_run_id()
    t0 = time.perf_counter()
    table = ships_table(cfg, inputs, run_id)
    timings = {"ships": time.perf_counter() - t0}
    with RunWriter(out, run_id) as writer:
        writer.write("ships", table)
        writer.set_manifest(_manifest(run_id, "ships", {"ships": cfg}, timings))
    return RunOutput(run_id, Path(out), {"ships": table})


def run_sahara_job(cfg: SaharaConfig, out: str | Path, inputs: Inputs | None = None) -> RunOutput:
    inputs = inputs or prepare(cfg)
    run_id = new_run_id()
    t0 = time.perf_counter()
    scores, search, steps = run_sahara(cfg, inputs, run_id)
    timings = {"sahara": time.perf_counter() - t0}
    group = settled_group(cfg, steps)
    with RunWriter(out, run_id) as writer:
        writer.write("head_scores", scores)
        writer.write("sahara", search)
        manifest = _manifest(run_id, "sahara", {"sahara": cfg}, timings)
        manifest["sahara_group"] = [h.label for h in group]
        writer.set_manifest(manifest)
    return RunOutput(run_id, Path(out), {"head_scores": scores, "sahara": search}, group, steps)


def run_study(study: StudyConfig, out: str | Path | None = None) -> RunOutput:
    """Run every experiment of a study spec into one run folder (one manifest, one run id)."""
    out = Path(out or study.out)
    ships_cfg, sahara_cfg = study.ships_config(), study.sahara_config()
    # validate everything (models, prompt sets) before loading any model
    prompt_sets = {name: validate(c) for name, c in (("ships", ships_cfg), ("sahara", sahara_cfg)) if c}
    run_id = new_run_id()
    result = RunOutput(run_id, out)
    timings: dict[str, float] = {}
    models: dict[tuple, LoadedModel] = {}

    def inputs_for(name: str, cfg: ScanConfig) -> Inputs:
        key = (cfg.model, cfg.revision, cfg.device, cfg.dtype)
        inputs = prepare(cfg, prompt_sets[name], models.get(key))
        models[key] = inputs.lm
        return inputs

    if ships_cfg:
        t0 = time.perf_counter()
        result.tables["ships"] = ships_table(ships_cfg, inputs_for("ships", ships_cfg), run_id)
        timings["ships"] = time.perf_counter() - t0
    if sahara_cfg:
        t0 = time.perf_counter()
        scores, search, steps = run_sahara(sahara_cfg, inputs_for("sahara", sahara_cfg), run_id)
        timings["sahara"] = time.perf_counter() - t0
        result.tables.update(head_scores=scores, sahara=search)
        result.steps, result.group = steps, settled_group(sahara_cfg, steps)
    configs: dict[str, Any] = {"study": study}
    configs.update({k: v for k, v in (("ships", ships_cfg), ("sahara", sahara_cfg)) if v})
    with RunWriter(out, run_id) as writer:
        for name, table in result.tables.items():
            writer.write(name, table)
        manifest = _manifest(run_id, "run", configs, timings)
        if sahara_cfg:
            manifest["sahara_group"] = [h.label for h in result.group]
        writer.set_manifest(manifest)
    return result
