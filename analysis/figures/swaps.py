"""Base-weight swaps (the `swaps` table): per aligned model, ASR and over-refusal of each mixed model (aligned,
base, attention / MLP / safety heads from the base, safety heads into the base), with published numbers as
markers where the spec states them, and the safety heads' Ships KL inside each mixed model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from analysis import is_missing, style
from analysis.figures._common import MAX_PANELS, Table, as_frame, chunks, groups, numeric, one, set_caption

__all__ = ["RECIPES", "swaps_figure", "swaps_units"]

RECIPES = ("aligned", "base", "attn-from-base", "mlp-from-base", "heads-from-base", "heads-into-base")


def swaps_units(swaps: Table, max_models: int = MAX_PANELS) -> list[pd.DataFrame]:
    """The `swaps` table split into one frame per (format, harmful dataset) and at most `max_models` aligned
    models: their harmful and Ships rows on that dataset plus their benign rows."""
    df = as_frame(swaps, "swaps")
    out = []
    for (fmt, dataset), g in groups(df[df["kind"] == "harmful"], ["prompt_format", "dataset"]):
        for part in chunks(list(dict.fromkeys(g["aligned"])), max_models):
            mask = df["aligned"].isin(part) & (df["prompt_format"] == fmt)
            mask &= (df["kind"] == "benign") | (df["dataset"] == dataset)
            out.append(df[mask])
    return out


def _order(recipes: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(recipes))
    return [r for r in RECIPES if r in present] + [r for r in present if r not in RECIPES]


_MIXED = ("attn-from-base", "mlp-from-base", "heads-from-base", "heads-into-base")


def _recipe_of(p: Mapping[str, Any]) -> str | None:
    """The recipe a published number is about: its `recipe` key, else the mixed recipe its claim names."""
    if p.get("recipe"):
        return str(p["recipe"])
    claim = str(p.get("claim") or "")
    named = [r for r in _MIXED if r in claim]
    return named[0] if len(named) == 1 else None


def _published(published: Sequence[Mapping[str, Any]] | None, aligned: str, dataset: str,
               metric: str) -> list[tuple[str, float, str]]:
    """(recipe, value, source) of the published numbers for this aligned model and metric.

    A Published entry (experiment `swap`, metric asr | refusal_rate) places a numeric `value` at the recipe its
    `recipe` key or its claim names (e.g. "attn-from-base: ..."), a list of 6 values on RECIPES in order,
    and `baseline` at the aligned model."""
    out = []
    for p in published or []:
        if p.get("experiment") != "swap" or p.get("metric") != metric:
            continue
        model = str(p.get("model", ""))
        if model != aligned and style.short_model(model) != style.short_model(aligned):
            continue
        if p.get("dataset") not in (None, dataset):
            continue
        source = str(p.get("source") or "")
        value, recipe = p.get("value"), _recipe_of(p)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and recipe:
            out.append((recipe, float(value), source))
        elif isinstance(value, (list, tuple)) and len(value) == len(RECIPES):
            out += [(r, float(v), source) for r, v in zip(RECIPES, value) if isinstance(v, (int, float))]
        base = p.get("baseline")
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            out.append(("aligned", float(base), source))
    return out


def _bars(ax: Axes, rows: pd.DataFrame, order: list[str], key: str, rate: bool) -> None:
    rows = rows.drop_duplicates("recipe", keep="last").set_index("recipe")
    x = [i for i, r in enumerate(order) if r in rows.index]
    present = [r for r in order if r in rows.index]
    v = numeric(rows.loc[present, "value"])
    colors = [style.RECIPE_COLORS.get(r, style.MUTED) for r in present]
    yerr = None
    if rate:
        lo, hi = numeric(rows.loc[present, "ci_low"]), numeric(rows.loc[present, "ci_high"])
        yerr = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        yerr = np.where(np.isfinite(yerr), yerr, 0.0)
    bars = ax.bar(x, v, width=0.66, color=colors, yerr=yerr, ecolor=style.INK, capsize=2.5,
                  error_kw=dict(linewidth=1.0))
    for b, r in zip(bars, present):
        b.set_gid(f"{key}:{r}")
    if bars.errorbar is not None:
        for col in bars.errorbar.lines[2]:
            col.set_gid(f"ci:{key}")
    tops = v if yerr is None else v + yerr[1]
    for xi, val, t in zip(x, v, tops):
        text = f"{val:.0%}" if rate else (f"{val:.2g}" if abs(val) >= 0.01 else f"{val:.0e}")
        ax.text(xi, t * (1.15 if not rate else 1.0) + (0.02 if rate else 0.0), text, ha="center", va="bottom",
                fontsize=7, color=style.INK)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.grid(axis="y")
    ax.set_axisbelow(True)
    if rate:
        ax.set_ylim(0, 1.15)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _marks(ax: Axes, order: list[str], marks: list[tuple[str, float, str]]) -> None:
    for recipe, value, source in marks:
        if recipe in order:
            ax.scatter([order.index(recipe)], [value], marker="D", s=34, facecolor="white", edgecolor=style.INK,
                       linewidths=1.2, zorder=5, label=f"published ({source})" if source else "published",
                       gid=f"published:{recipe}")


def swaps_figure(swaps: Table, published: Sequence[Mapping[str, Any]] | None = None,
                 judge: str | None = None) -> Figure:
    """One row per aligned model of one (format, harmful dataset): ASR of every recipe (harmful, metric asr;
    Wilson 95% error bars), over-refusal (benign, refusal_rate) beside it, and, when measured, the safety
    heads' Ships KL ablated together inside each mixed model (log scale). Bars carry gid `asr:<recipe>`,
    `refusal:<recipe>`, `ships:<recipe>`. `published`: dicts like study.spec.Published (experiment `swap`,
    model, metric asr | refusal_rate; see `_published` for where each number goes), drawn as white diamonds. `judge` None takes the first judge and names it in the title."""
    df = as_frame(swaps, "swaps")
    harm = df[(df["kind"] == "harmful") & (df["metric"] == "asr")]
    if harm.empty:
        raise ValueError("swaps_figure: no harmful ASR rows")
    dataset, fmt = one(harm, "dataset", "swaps_figure"), one(harm, "prompt_format", "swaps_figure")
    judges = [j for j in dict.fromkeys(harm["judge"]) if not is_missing(j)]
    judge = judges[0] if judge is None and judges else judge
    harm = harm[harm["judge"] == judge] if judge is not None else harm
    benign = df[(df["kind"] == "benign") & (df["metric"] == "refusal_rate")]
    benign = benign[benign["judge"] == judge] if judge is not None else benign
    ships = df[(df["kind"] == "ships") & (df["metric"] == "ships:group")]
    aligned = list(dict.fromkeys(harm["aligned"]))
    labels = style.model_labels(aligned + list(df["base"]))
    ncols = 2 + (not ships.empty)
    heads_moved: dict[str, str] = {}
    with style.context():
        fig = style.new_figure(3.4 * ncols + 0.4, 2.9 * len(aligned) + 1.2)
        axes = fig.subplots(len(aligned), ncols, squeeze=False)
        for row, model in zip(axes, aligned):
            mine = df[df["aligned"] == model]
            order = _order(mine["recipe"])
            base = labels[one(mine, "base", "swaps_figure")]
            name = labels[model]
            h, b = harm[harm["aligned"] == model], benign[benign["aligned"] == model]
            _bars(row[0], h, order, "asr", True)
            _marks(row[0], order, _published(published, model, dataset, "asr"))
            row[0].set_title(f"{name} (base model: {base}): ASR")
            row[0].set_ylabel("attack success rate\n(% of generations)")
            if b.empty:
                row[1].text(0.5, 0.5, "no benign prompts measured", ha="center", va="center",
                            transform=row[1].transAxes, color=style.MUTED)
                row[1].set_xticks([])
            else:
                _bars(row[1], b, order, "refusal", True)
                _marks(row[1], order, _published(published, model, dataset, "refusal_rate"))
                row[1].set_ylabel("refusals of benign prompts\n(% of generations)")
            row[1].set_title(f"{name}: over-refusal" + (f" ({', '.join(sorted(set(b['dataset'])))})" if not b.empty
                                                        else ""))
            if ncols == 3:
                s = ships[ships["aligned"] == model]
                if s.empty:
                    row[2].axis("off")
                else:
                    _bars(row[2], s, order, "ships", False)
                    row[2].set_yscale("log")
                    lo, hi = float(np.nanmin(numeric(s["value"]))), float(np.nanmax(numeric(s["value"])))
                    if lo > 0:
                        row[2].set_ylim(lo / 3, hi * 6)
                    row[2].set_ylabel("mean KL, safety heads\nablated together (nats)")
                    row[2].set_title(f"{name}: safety heads' Ships KL")
            moved = [list(v) for v in mine["heads"] if v is not None and len(v)]
            if moved:
                heads_moved[name] = ", ".join(moved[0])
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for hnd, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, hnd)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="outside lower center")
        more = f" (first of {len(judges)}: {', '.join(judges)})" if len(judges) > 1 else ""
        fig.suptitle(f"Base-weight swaps — safety of mixed models on {dataset} · format {fmt}"
                     + (f"\njudge {judge}{more}" if judge is not None else ""), ha="left", x=0.01)
    caption = ("Each aligned model mixed with its base: attn-from-base (every attention module from the base, the "
               "rest aligned), mlp-from-base, heads-from-base (only the safety heads' q/k/v/o slices from the base) "
               "and heads-into-base (the aligned model's safety heads transplanted into the base). Error bars: "
               "Wilson 95% intervals.")
    if heads_moved:
        caption += " Safety heads moved: " + "; ".join(f"{m}: {h}" for m, h in heads_moved.items()) + "."
    if ncols == 3:
        caption += " Right: mean Ships KL of ablating those heads together inside each model (log scale)."
    if any("published" in k for k in handles):
        caption += " Diamonds: published numbers."
    return set_caption(fig, caption, ["swaps"])

