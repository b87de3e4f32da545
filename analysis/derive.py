"""`derive`: every derived table a run folder's result tables support, in one call.

Reads whichever of `ships`, `head_scores` and `asr` the folder holds (a table that is absent or empty
simply yields no derived table from it) and returns `rankings`, `specificity`, `overlap` and `asr_curve`
as validated Arrow tables, keyed by table name, for a caller to write with `study.runtime.store.RunWriter`
(the report does so, and so can a notebook).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Any

import pyarrow as pa

from analysis.curves import asr_curve_table
from analysis.overlap import overlap_table
from analysis.rankings import check_k, rankings_table
from analysis.specificity import specificity_table
from study.core.errors import UsageError
from study.runtime.store import read_manifest, read_manifests, read_table

__all__ = ["benign_datasets_of", "derive"]

log = logging.getLogger(__name__)

BENIGN_EXPERIMENT = "specificity"  # the experiment that runs Ships on benign prompts


def benign_datasets_of(manifest: dict[str, Any]) -> set[str]:
    """The prompt sets the run's `specificity` jobs scanned: the benign datasets of its Ships tables."""
    out = set()
    for job in manifest.get("jobs") or []:
        if isinstance(job, dict) and job.get("experiment") == BENIGN_EXPERIMENT:
            name = (job.get("prompts") or {}).get("set")
            if isinstance(name, str):
                out.add(name)
    return out


def derive_run(run_dir: str | os.PathLike[str], k: int = 10) -> dict[str, pa.Table]:
    """`derive` with the benign datasets of every run the folder holds (what `study.runner.run_study` takes
    as its `derive`)."""
    benign = set().union(*(benign_datasets_of(m) for m in read_manifests(run_dir)))
    return derive(run_dir, benign, k=k)


def _read(run_dir: str | os.PathLike[str], name: str) -> pa.Table | None:
    try:
        table = read_table(run_dir, name)  # no model filter: that would import study.models (and torch)
    except UsageError:
        return None
    return table if table.num_rows else None


def derive(run_dir: str | os.PathLike[str], benign_datasets: Collection[str] | None = None,
           k: int = 10) -> dict[str, pa.Table]:
    """The derived tables of run folder `run_dir` that its tables support, each validated by make_table.

    benign_datasets None reads them from the manifest (the `specificity` jobs' prompt sets); every other
    Ships dataset counts as harmful. Derived rows carry the manifest's run id (without a manifest, the
    latest input run id). An empty derived table (e.g. overlap with one condition) is left out.
    """
    k = check_k(k)
    try:
        manifest: dict[str, Any] | None = read_manifest(run_dir)
    except UsageError:
        manifest = None
        log.warning("%s has no manifest: derived rows keep their inputs' run ids", run_dir)
    run_id = manifest.get("run_id") if manifest else None
    if benign_datasets is None:
        benign_datasets = benign_datasets_of(manifest) if manifest else set()
    ships, scores, asr = (_read(run_dir, n) for n in ("ships", "head_scores", "asr"))
    out: dict[str, pa.Table] = {}
    spec = None
    if ships is not None and benign_datasets:
        spec = specificity_table(ships, benign_datasets, run_id=run_id)
        out["specificity"] = spec
    if ships is not None or scores is not None:
        ranks = rankings_table(ships, scores, k=k, specificity=spec, run_id=run_id)
        out["rankings"] = ranks
        out["overlap"] = overlap_table(ranks, k, mismatch="split", run_id=run_id)
    if asr is not None:
        out["asr_curve"] = asr_curve_table(asr, run_id=run_id)
    for name in [n for n, t in out.items() if t.num_rows == 0]:
        del out[name]
    log.info("derived from %s: %s", run_dir, ", ".join(f"{n} ({t.num_rows} rows)" for n, t in out.items()) or "none")
    return out
