"""`make_figures`: every figure a run folder's tables support, saved as PNG and SVG under RUN/figures/.

A table that is absent or empty is never an error: the figures that need it are skipped and the log says
why. Derived tables (rankings, specificity, overlap, asr_curve) missing from the folder are derived in memory
from the result tables they come from (nothing is written back).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure

from analysis import is_missing, style
from analysis.figures._common import caption_of, tables_of, title_of
from analysis.figures.curves import asr_curve_figure, asr_curve_units
from analysis.figures.heatmaps import head_heatmap, heatmap_units
from analysis.figures.joint import joint_steps_figure, joint_steps_units
from analysis.figures.scatter import specificity_figure, specificity_units
from analysis.figures.sets import overlap_figure, overlap_units
from analysis.figures.swaps import swaps_figure, swaps_units
from analysis.figures.utility import utility_figure, utility_units
from study.core.errors import UsageError
from study.core.files import atomic_path
from study.runtime.store import read_manifest, read_table

__all__ = ["FORMATS", "FigureRecord", "make_figures", "save"]

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
FIGURES_DIR = "figures"
_DERIVED = {"rankings": ("ships", "head_scores"), "specificity": ("ships",), "overlap": ("ships", "head_scores"),
            "asr_curve": ("asr",)}


@dataclass(frozen=True)
class FigureRecord:
    """One saved figure: its file stem, family, title (the figure's own), a caption for a report, the files
    by format and the tables it was drawn from."""

    name: str
    kind: str  # heatmap | overlap | specificity | joint | asr_curve | swaps | utility
    title: str
    caption: str
    paths: dict[str, Path] = field(default_factory=dict)
    tables: tuple[str, ...] = ()


def save(fig: Figure, out_dir: str | os.PathLike[str], name: str, formats: Sequence[str] = FORMATS,
         dpi: int = style.DPI) -> dict[str, Path]:
    """Write `fig` as OUT_DIR/<name>.<fmt> for each format (PNG at `dpi`, SVG with text kept as text), each
    atomically (temp file + rename); returns the paths by format. `name` is made file-name safe."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = style.slug(name)
    paths: dict[str, Path] = {}
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else None  # reproducible SVG files
        with atomic_path(path, durable=False) as tmp, style.context(), warnings.catch_warnings():
            # text-heavy panels (the Venn's p-value lines) can outgrow constrained layout's grid; the tight
            # bounding box below still fits everything, so its warning is noise on a user's terminal
            warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white", metadata=meta)
        paths[fmt] = path
    return paths


def _read(run_dir: Path, name: str) -> pd.DataFrame | None:
    try:
        table = read_table(run_dir, name)  # no model filter: that would import study.models (and torch)
    except UsageError:
        return None
    except (pa.ArrowException, ValueError) as e:  # e.g. files of an older schema: the other figures still come
        log.warning("figures: table %s of %s is unreadable, its figures are skipped: %s", name, run_dir, e)
        return None
    return table.to_pandas() if table.num_rows else None


def _derive_missing(run_dir: Path, tables: dict[str, pd.DataFrame | None], k: int) -> None:
    missing = [n for n, src in _DERIVED.items()
               if tables.get(n) is None and any(tables.get(s) is not None for s in src)]
    if not missing:
        return
    from analysis.derive import derive

    try:
        got = derive(run_dir, k=k)
    except (ValueError, UsageError, pa.ArrowException) as e:
        log.warning("figures: could not derive %s from %s: %s", ", ".join(missing), run_dir, e)
        return
    for name in missing:
        if name in got:
            tables[name] = got[name].to_pandas()
            log.info("figures: %s is not in %s; derived in memory from the result tables", name, run_dir)


@dataclass
class _Plan:
    kind: str
    name: str
    draw: Callable[[], Figure]


def _unique(plans: list[_Plan]) -> list[_Plan]:
    seen: dict[str, int] = {}
    for p in plans:
        stem = style.slug(p.name)
        seen[stem] = seen.get(stem, 0) + 1
        p.name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
    return plans


def _varying(rows: list[dict[str, Any]], always: Sequence[str]) -> list[list[Any]]:
    """Per row, the values of `always` plus of every other key whose value differs between rows."""
    keys = [k for k in rows[0]] if rows else []
    vary = [k for k in keys if k in always or len({str(r[k]) for r in rows}) > 1]
    return [[r[k] for k in vary if not is_missing(r[k]) and r[k] != ""] for r in rows]


def _heatmaps(t: dict[str, Any], labels: Mapping[str, str], top: int) -> tuple[list[_Plan], str | None]:
    if t["rankings"] is None:
        return [], "no ships, head_scores or rankings table"
    units = heatmap_units(t["rankings"])
    keys = [dict(model=labels.get(u["model"].iloc[0], u["model"].iloc[0]), rev=u["model_revision"].iloc[0],
                 dataset=u["dataset"].iloc[0], op=u["op"].iloc[0], eps=u["eps"].iloc[0],
                 fmt=u["prompt_format"].iloc[0]) for u in units]
    names = _varying(keys, ["model", "dataset", "op"])
    return [_Plan("heatmap", style.slug("heatmap", *n), lambda u=u: head_heatmap(u, top=top))
            for u, n in zip(units, names)], None


def _overlaps(t: dict[str, Any], labels: Mapping[str, str]) -> tuple[list[_Plan], str | None]:
    if t["overlap"] is None:
        why = "no rankings to compare" if t["rankings"] is None else "fewer than two comparable rankings"
        return [], f"no overlap table ({why})"
    plans, skipped = [], 0
    for u in overlap_units(t["overlap"]):
        w = u.iloc[0]
        if int(w["n_sets"]) > 3 and t["rankings"] is None:
            skipped += 1
            continue
        fixed = [labels.get(w["models"][0], w["models"][0]) if w["axis"] != "models" else "",
                 w["datasets"][0] if w["axis"] != "datasets" else "", w["ops"][0] if w["axis"] != "ops" else ""]
        variant = "" if is_missing(w["variant"]) else w["variant"]
        plans.append(_Plan("overlap", style.slug("overlap", w["axis"], w["source"], variant, *fixed),
                           lambda u=u: overlap_figure(u, t["rankings"])))
    if skipped:
        log.info("figures: %d overlap comparison(s) of more than 3 sets skipped: no rankings table for the sets",
                 skipped)
    return plans, None


def _specificity(t: dict[str, Any]) -> tuple[list[_Plan], str | None]:
    if t["specificity"] is None:
        return [], "no specificity table (no Ships scan of benign prompts: the `specificity` experiment)"
    plans = []
    for u in specificity_units(t["specificity"]):
        w = u.iloc[0]
        plans.append(_Plan("specificity", style.slug("specificity", w["dataset"], "vs", w["benign_dataset"], w["op"]),
                           lambda u=u: specificity_figure(u)))
    return plans, None


def _joint(t: dict[str, Any]) -> tuple[list[_Plan], str | None]:
    if t["joint_steps"] is None:
        return [], "no joint_steps table (no `joint` experiment)"
    return [_Plan("joint", style.slug("joint-steps", u["dataset"].iloc[0], u["objective"].iloc[0],
                                      u["prompt_format"].iloc[0]), lambda u=u: joint_steps_figure(u, t["joint"]))
            for u in joint_steps_units(t["joint_steps"])], None


def _asr(t: dict[str, Any]) -> tuple[list[_Plan], str | None]:
    if t["asr_curve"] is None:
        return [], "no asr or asr_curve table (no `asr` experiment)"
    units = asr_curve_units(t["asr_curve"])
    if not units:
        return [], "the asr_curve table has no ablated condition (only the normal model)"
    return [_Plan("asr_curve", style.slug("asr-curve", u[u["kind"] == "harmful"]["dataset"].iloc[0],
                                          u["decoding"].iloc[0], u["prompt_format"].iloc[0]),
                  lambda u=u: asr_curve_figure(u)) for u in units], None


def _swaps(t: dict[str, Any], published: Sequence[Mapping[str, Any]]) -> tuple[list[_Plan], str | None]:
    if t["swaps"] is None:
        return [], "no swaps table (no `swap` experiment)"
    units = swaps_units(t["swaps"])
    if not units:
        return [], "the swaps table has no harmful rows"
    return [_Plan("swaps", style.slug("swaps", u[u["kind"] == "harmful"]["dataset"].iloc[0],
                                      u["prompt_format"].iloc[0]), lambda u=u: swaps_figure(u, published))
            for u in units], None


def _utility(t: dict[str, Any]) -> tuple[list[_Plan], str | None]:
    if t["utility"] is None:
        return [], "no utility table (no `utility` experiment)"
    return [_Plan("utility", style.slug("utility", u["dataset"].iloc[0], u["prompt_format"].iloc[0]),
                  lambda u=u: utility_figure(u)) for u in utility_units(t["utility"])], None


def make_figures(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                 published: Sequence[Mapping[str, Any]] | None = None, top: int = 5, k: int | None = None,
                 formats: Sequence[str] = FORMATS, strict: bool = False) -> list[FigureRecord]:
    """Draw and save every figure the tables of run folder `run_dir` support; returns their records in order
    (heatmaps, overlap, specificity, joint search steps, ASR curves, swaps, utility).

    out_dir None: RUN/figures/. `published` None reads the spec's `published` list from the manifest. `top`:
    heads labelled per heatmap / scatter. `k`: top-k of rankings and overlap derived here when the folder
    lacks them (None: the spec's `overlap.k`, else 10). A family whose tables are absent or empty is skipped
    with its reason logged (INFO); a figure that fails to draw is logged (WARNING) and skipped, or raised when
    `strict`.
    """
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / FIGURES_DIR
    try:
        manifest: dict[str, Any] = read_manifest(run)
    except UsageError:
        manifest = {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    if published is None:
        published = [p for p in config.get("published") or [] if isinstance(p, Mapping)]
    if k is None:
        k = int((config.get("overlap") or {}).get("k") or 10) if isinstance(config.get("overlap"), dict) else 10
    names = ("ships", "head_scores", "rankings", "overlap", "specificity", "joint", "joint_steps", "asr_curve", "asr",
             "swaps", "utility")
    tables: dict[str, pd.DataFrame | None] = {n: _read(run, n) for n in names}
    _derive_missing(run, tables, k)
    models = [m for n in names if tables[n] is not None and "model" in tables[n].columns for m in tables[n]["model"]]
    labels = style.model_labels(models)
    families = [("heatmap", _heatmaps(tables, labels, top)), ("overlap", _overlaps(tables, labels)),
                ("specificity", _specificity(tables)), ("joint", _joint(tables)), ("asr_curve", _asr(tables)),
                ("swaps", _swaps(tables, published)), ("utility", _utility(tables))]
    records: list[FigureRecord] = []
    plans: list[_Plan] = []
    for kind, (found, why) in families:
        if why:
            log.info("figures: no %s figure: %s", kind, why)
        plans += found
    for plan in _unique(plans):
        try:
            fig = plan.draw()
            paths = save(fig, out, plan.name, formats)
        except Exception as e:  # one figure's failure leaves the others standing
            if strict:
                raise
            log.warning("figures: %s not drawn: %s: %s", plan.name, type(e).__name__, e)
            continue
        records.append(FigureRecord(plan.name, plan.kind, title_of(fig), caption_of(fig), paths, tables_of(fig)))
        fig.clear()
    log.info("figures: %d drawn in %s", len(records), out)
    return records
