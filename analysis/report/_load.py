"""What the report reads from a run folder: its manifests and tables (derived ones made in memory when the
folder lacks them), the short model labels the figures use too, and a sample of generations for examples."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from analysis import style
from study.core.errors import UsageError
from study.runtime.schema import TABLES
from study.runtime.store import MANIFEST, read_manifest, read_manifests, read_table

__all__ = ["RunData", "load_run"]

log = logging.getLogger(__name__)

RESULT_TABLES = ("ships", "head_scores", "sahara", "joint", "joint_steps", "asr", "swaps", "utility")
DERIVED_TABLES = ("rankings", "specificity", "overlap", "asr_curve")
_DERIVED_FROM = {"rankings": ("ships", "head_scores"), "specificity": ("ships",), "overlap": ("ships", "head_scores"),
                 "asr_curve": ("asr",)}
_EXAMPLE_CONDITIONS = ("normal", "sahara", "joint", "ships", "heads", "query")  # any headline's condition


@dataclass
class RunData:
    """One run folder as the report sees it."""

    run_dir: Path
    manifest: dict[str, Any]
    manifests: list[dict[str, Any]]
    tables: dict[str, pd.DataFrame]  # only tables with rows
    derived_here: list[str] = field(default_factory=list)  # derived in memory: the folder lacks them
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why
    benign: set[str] = field(default_factory=set)  # benign prompt sets (the `specificity` scans)
    labels: dict[str, str] = field(default_factory=dict)  # model id -> short display name
    k: int = 10

    def get(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.manifest.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def published(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.config.get("published") or [] if isinstance(p, Mapping)]

    def label(self, model: Any) -> str:
        return self.labels.get(str(model), style.short_model(str(model)))

    def models(self) -> list[str]:
        """Every model the run measured, in the order the spec lists them, then the tables'."""
        seen: dict[str, None] = {}
        for name in ("ships", "head_scores", "sahara", "joint", "asr", "utility", "rankings"):
            df = self.get(name)
            if df is not None:
                seen.update(dict.fromkeys(str(m) for m in df["model"]))
        swaps = self.get("swaps")
        if swaps is not None:
            seen.update(dict.fromkeys(str(m) for m in swaps["aligned"]))
        order = [str(m.get("name")) for m in self.config.get("models") or [] if isinstance(m, dict)]
        return [m for m in order if m in seen] + [m for m in seen if m not in order]


def _is_run_folder(run: Path) -> bool:
    return (run / MANIFEST).is_file() or any((run / name).is_dir() for name in TABLES)


def _read(run: Path, name: str, unreadable: dict[str, str]) -> pd.DataFrame | None:
    try:
        table = read_table(run, name)  # no model filter: that would import study.models (and torch)
    except UsageError:
        return None
    except (pa.ArrowException, ValueError, OSError) as e:  # an older schema, a torn file: the rest still reports
        log.warning("report: table %s of %s is unreadable: %s", name, run, e)
        unreadable[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        return None
    return table.to_pandas() if table.num_rows else None


def _derive(run: Path, tables: dict[str, pd.DataFrame], benign: set[str], k: int) -> list[str]:
    missing = [n for n, src in _DERIVED_FROM.items() if n not in tables and any(s in tables for s in src)]
    if not missing:
        return []
    from analysis.derive import derive

    try:
        got = derive(run, benign_datasets=benign, k=k)
    except (ValueError, UsageError, pa.ArrowException) as e:
        log.warning("report: could not derive %s from %s: %s", ", ".join(missing), run, e)
        return []
    done = [n for n in missing if n in got]
    for name in done:
        tables[name] = got[name].to_pandas()
    if done:
        log.info("report: %s not in %s; derived in memory from the result tables", ", ".join(done), run)
    return done


def _benign(manifests: list[dict[str, Any]], tables: Mapping[str, pd.DataFrame]) -> set[str]:
    from analysis.derive import benign_datasets_of

    out: set[str] = set()
    for m in manifests:
        out |= benign_datasets_of(m)
    spec = tables.get("specificity")
    if spec is not None:
        out |= {str(d) for d in spec["benign_dataset"]}
    return out


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read run folder `run_dir`; UsageError naming it when it is not a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"run folder {str(run)!r} not found: give the --out folder of a study")
    if not _is_run_folder(run):
        raise UsageError(f"{str(run)!r} is not a run folder: it has no {MANIFEST} and none of the tables "
                         f"{', '.join(TABLES)}")
    try:
        manifest = read_manifest(run)
    except UsageError:
        manifest = {}
    manifests = read_manifests(run) or ([manifest] if manifest else [])
    unreadable: dict[str, str] = {}
    tables = {n: df for n in (*RESULT_TABLES, *DERIVED_TABLES) if (df := _read(run, n, unreadable)) is not None}
    cfg = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    overlap_cfg = cfg.get("overlap") if isinstance(cfg.get("overlap"), dict) else {}
    k = int(overlap_cfg.get("k") or 10)
    benign = _benign(manifests, tables)
    derived_here = _derive(run, tables, benign, k)
    if "specificity" in tables:
        benign |= {str(d) for d in tables["specificity"]["benign_dataset"]}
    data = RunData(run, manifest, manifests, tables, derived_here, unreadable, benign, k=k)
    ids = data.models()
    if "swaps" in tables:
        ids += [str(b) for b in tables["swaps"]["base"]]
    # models the spec lists but no table names (a base measured through swaps only); an alias whose model id
    # the tables hold (`smollm2-135m-safe` for `headstudy/smollm2-135m-safe`) is the same model, not a clash
    known = {style.short_model(i) for i in ids}
    ids += [str(m["name"]) for m in cfg.get("models") or [] if isinstance(m, dict) and m.get("name")
            and style.short_model(str(m["name"])) not in known]
    data.labels = style.model_labels(ids)
    return data


def table_files(run: Path) -> dict[str, tuple[int, int]]:
    """Per table folder present: (Parquet files, rows), read from the files' footers only."""
    out: dict[str, tuple[int, int]] = {}
    for name in TABLES:
        folder = run / name
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*/*.parquet"))
        rows = 0
        for f in files:
            try:
                rows += pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowException, OSError):
                pass
        out[name] = (len(files), rows)
    return out


def generation_examples(run: Path) -> pd.DataFrame | None:
    """A few generations per model, for the ASR section's examples: the first sample of each prompt under the
    normal model and the targeted ablations (a filtered scan: the table can be large)."""
    folder = run / "generations"
    files = sorted(str(f) for f in folder.glob("*/*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    cols = ["model", "dataset", "prompt_id", "prompt", "condition", "group_size", "ablation", "decoding", "sample",
            "text"]
    try:
        dataset = ds.dataset(files, schema=TABLES["generations"], format="parquet")
        flt = ds.field("condition").isin(list(_EXAMPLE_CONDITIONS)) & (ds.field("sample") == 0)
        df = dataset.to_table(columns=cols, filter=flt).to_pandas()
    except (pa.ArrowException, ValueError, OSError) as e:
        log.warning("report: generations of %s unreadable, no example answers: %s", run, e)
        return None
    return df if not df.empty else None
