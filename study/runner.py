"""The one runner: a study (or a single command, which is a one-experiment study) from spec to tables.

    plan    validate the spec, the output folder, every prompt set and model shape; cut the work into
            shards (no torch, no model loaded)
    run     advance every job (experiment x model) round by round on one executor, each job as soon as its
            own inputs are ready (study.runtime.rounds): no barrier between models or experiments; finished
            shards are stored as they arrive
    write   each job's tables (replacing that experiment's earlier tables for the model) and a manifest

Started again on the same folder, a run reads finished shards back and computes only what is missing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from study.core.dtypes import AUTO
from study.core.errors import RunFailed, UsageError
from study.experiments.asr import AsrJob
from study.experiments.base import Job, ModelConfig, ScanJob
from study.experiments.registry import JOBS
from study.experiments.swap import SwapJob
from study.experiments.utility import UtilityJob
from study.models.builtin import model_id
from study.runtime.executor import Executor, ModelStats, make_executor, resolve_dtype
from study.runtime.rounds import Rounds
from study.runtime.runfolder import FolderLock, recover
from study.runtime.shards import GenShard, JointShard
from study.runtime.store import (
    RunWriter,
    ShardStore,
    code_version,
    config_hash,
    new_run_id,
    package_versions,
    read_manifest,
)
from study.spec import StudyConfig


@dataclass
class RunOutput:
    run_id: str
    out: Path
    jobs: list[Job]
    tables: dict[str, pa.Table] = field(default_factory=dict)  # every model's rows, per table
    job_tables: list[dict[str, pa.Table]] = field(default_factory=list)  # per job, in job order
    stats: dict[str, ModelStats] = field(default_factory=dict)
    computed: int = 0  # shards computed in this run
    reused: int = 0  # shards read back from the run folder
    seconds: float = 0.0
    derived: dict[str, pa.Table] = field(default_factory=dict)  # the analysis tables written after the run
    failed: dict[str, str] = field(default_factory=dict)  # model label -> why it was given up


@dataclass
class Plan:
    study: StudyConfig
    out: Path
    jobs: list[Job]


def check_out(out: str | os.PathLike[str]) -> Path:
    """The output folder must be a folder we can write (or create): one line otherwise, before any work."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output {str(p)!r} exists and is not a folder: choose a folder for --out")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output {str(p)!r} is not writable ({existing} is not a writable folder): "
                         f"choose another --out")
    return p


def plan_study(study: StudyConfig, out: str | os.PathLike[str] | None = None) -> Plan:
    """Everything that can be checked and planned without loading a model."""
    out_dir = check_out(out or study.out)
    dtypes: dict[str, str] = {}  # device -> what dtype auto is there (a cluster elsewhere is asked once)

    def resolved(cfg: ModelConfig) -> ModelConfig:
        if cfg.dtype != AUTO:
            return cfg
        if cfg.device not in dtypes:
            dtypes[cfg.device] = resolve_dtype(AUTO, cfg.device, study.execution)
        return cfg.model_copy(update={"dtype": dtypes[cfg.device]})

    jobs = [JOBS[name](resolved(cfg), out_dir) for name, cfg in study.jobs()]
    check_distinct_files(jobs)
    for job in jobs:
        job.link(jobs)
    return Plan(study, out_dir, jobs)


def check_distinct_files(jobs: list[Job]) -> None:
    """Two jobs that would write the same table files (same model, experiment and condition) end the plan with
    one line naming both: the second would replace the first's rows, or the commit would fail after the work."""
    seen: dict[tuple[str, str], Job] = {}
    for job in jobs:
        key = (model_id(job.cfg.model), job.part)
        if key in seen:
            other = seen[key]
            a, b = other.cfg.model_dump(mode="json"), job.cfg.model_dump(mode="json")
            diff = "; ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]) or "nothing"
            raise UsageError(f"{job.experiment} on {job.cfg.model!r}: two jobs would write the same table files "
                             f"(they differ in {diff}, which changes how many rows or how they run, not which "
                             f"rows): keep one of them, or run the other into another --out folder")
        seen[key] = job


# What turns a run folder's tables into the analysis tables (rankings, specificity, overlap, ASR curves):
# `analysis.derive.derive_run`, handed in by the caller (the CLI), since `study` never imports `analysis`.
Derive = Callable[[Path, int], dict[str, pa.Table]]


def run_study(study: StudyConfig, out: str | os.PathLike[str] | None = None, *, force: bool = False,
              executor: Executor | None = None, command: str = "run", derive: Derive | None = None) -> RunOutput:
    """Run every job of the study into one run folder (one manifest, one run id); with `derive`, its
    analysis tables too (of everything the folder then holds)."""
    plan = plan_study(study, out)
    with FolderLock(plan.out):
        recover(plan.out)  # a killed run's half commit is finished, its leftovers removed
        return _run(plan, study, force, executor, command, derive)


def _run(plan: Plan, study: StudyConfig, force: bool, executor: Executor | None, command: str,
         derive: Derive | None) -> RunOutput:
    run_id = new_run_id()
    store = ShardStore(plan.out)
    result = RunOutput(run_id, plan.out, plan.jobs)
    t0 = time.perf_counter()
    options = {j.model: j.options for j in plan.jobs}
    # Ray starts only when a shard must be computed, not for a rerun that reads everything back
    rounds = Rounds(plan.jobs, store, options, lambda: executor or make_executor(study.execution), force=force,
                    sources=lambda job: getattr(job, "source", None))
    try:
        rounds.run()
    finally:
        if rounds.executor is not None and executor is None:
            rounds.executor.close()
    result.computed, result.reused = rounds.computed, rounds.reused
    result.failed.update(rounds.failed)
    result.stats = rounds.model_stats()
    failed = rounds.failed_jobs
    plan = Plan(plan.study, plan.out, [j for j in plan.jobs if j not in failed])
    for job in plan.jobs:
        job.finish()
    result.seconds = time.perf_counter() - t0
    _write(plan, result, command)
    if derive is not None:
        result.derived = _write_derived(plan, result.run_id, derive)
    if result.failed:
        raise RunFailed("; ".join(f"model {name} could not be loaded: {cause}" for name, cause in result.failed.items())
                        + f"; the other models' tables are in {plan.out}")
    return result


def _write(plan: Plan, result: RunOutput, command: str) -> None:
    resolved = plan.study.model_dump(mode="json")
    jobs_meta = []
    with RunWriter(plan.out, result.run_id) as writer:
        for job in plan.jobs:
            tables = job.tables(result.run_id)
            result.job_tables.append(tables)
            for name, table in tables.items():
                writer.write(name, table, part=job.part)
                result.tables[name] = (table if name not in result.tables
                                       else pa.concat_tables([result.tables[name], table]))
            jobs_meta.append(dict(experiment=job.experiment, model=job.cfg.model,
                                  config=job.cfg.model_dump(mode="json"),
                                  config_hash=config_hash(job.cfg.model_dump(mode="json")),
                                  tables=sorted(tables), **job.record(), **job.summary()))
        writer.set_manifest(dict(
            run_id=result.run_id, command=command, argv=sys.argv, config=resolved, config_hash=config_hash(resolved),
            versions=package_versions(), code=code_version(), executor=plan.study.execution.model_dump(mode="json"), jobs=jobs_meta,
            shards=dict(computed=result.computed, reused=result.reused), failed=result.failed,
            models={name: s.as_dict() for name, s in result.stats.items()},
            timings_s=dict(total=round(result.seconds, 3)),
        ))


def _write_derived(plan: Plan, run_id: str, derive: Derive) -> dict[str, pa.Table]:
    """The analysis tables of everything the folder now holds, committed as a second part of this run: every
    run adds its conditions and the derived rows are redone."""
    derived = derive(plan.out, plan.study.overlap.k if plan.study.overlap else 10)
    if derived:
        manifest = read_manifest(plan.out)
        with RunWriter(plan.out, run_id) as writer:
            for name, table in derived.items():
                writer.write(name, table, part="derived")
            writer.set_manifest({**manifest, "derived": sorted(derived)})
    return derived


def describe_plan(plan: Plan, force: bool = False) -> list[str]:
    """What a study implies, and what the run folder already holds (`headstudy plan`)."""
    store = ShardStore(plan.out)
    done = set() if force else store.ids()
    models = plan.study.models or []
    lines = [f"study -> {plan.out} ({plan.study.execution.executor} executor)"]
    if models:
        lines.append(f"models ({len(models)}): " + ", ".join(
            m.name + (" (base)" if m.role == "base" else f" (from {m.base})" if m.base else "") for m in models))
    forwards = generations = tokens = todo = total = 0
    waiting: list[str] = []
    for job in plan.jobs:
        if not isinstance(job, ScanJob):
            target = job.summary()["checkpoint"]
            lines.append(f"  {job.experiment:<7} {job.cfg.model}: {job.cfg.ablation.label} -> {target}")
            continue
        shards = job.pending()
        have = sum(s.id in done for s in shards)
        total += len(shards)
        todo += len(shards) - have
        if not shards and not job.done:
            waiting.append(f"{job.experiment} {job.cfg.model}")
        for sh in shards:
            if isinstance(sh, GenShard):
                generations += sh.rows
                tokens += sh.rows * sh.decoding.max_new_tokens
            elif not isinstance(sh, JointShard):  # a joint shard's rows are optimisation steps
                forwards += sh.rows
        if isinstance(job, (AsrJob, SwapJob, UtilityJob)):
            lines.append(job.plan_line(shards, have))
            continue
        if job.experiment == "joint":
            c = job.cfg
            lines.append(f"  joint   {c.model}: {len(job.prompts)} prompts, {len(c.seeds)} seed(s) x {c.steps} steps "
                         f"(a forward and a backward pass over the prompts each, all {len(job.heads)} heads at once), "
                         f"in shards of {c.shard_steps} steps; {have} of the first {len(shards)} already done")
            continue
        rows = sum(s.rows for s in shards)
        extra = ""
        if job.experiment == "sahara":
            extra = f", then up to {job.cfg.steps - 1} more step(s) of about the same size"
        lines.append(f"  {job.experiment:<7} {job.cfg.model}: {len(job.prompts)} prompts x {len(job.heads)} heads, "
                     f"{len(shards)} shards ({rows} rows) in the first round, {have} already done{extra}")
    lines.append(f"first round: {total} shards ({todo} to compute): {forwards} scored (prompt, ablation) rows, "
                 f"{generations} generations of up to {tokens} tokens in all")
    if waiting:
        lines.append(f"later rounds (their size follows from the first): {', '.join(waiting)}")
    return lines


def summary_lines(result: RunOutput) -> list[str]:
    """The closing summary: actors, shards, retries and time per model."""
    if not (result.computed or result.reused):
        return [f"{result.seconds:.1f} s in all"]
    lines = [f"shards: {result.computed} computed, {result.reused} reused from {result.out}, "
             f"{result.seconds:.1f} s in all"]
    for name, s in result.stats.items():
        lines.append(f"  {name}: {s.actors} actor(s), {s.shards} shards ({s.rows} rows) computed, "
                     f"{s.reused} reused, {s.retries} retried, {s.seconds:.1f} s")
    return lines
