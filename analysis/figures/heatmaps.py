"""Layer x head heatmaps of one ranking condition: Ships mean KL, per-prompt top-k frequency, generalized Ships
angle; the top heads of each panel boxed and numbered, their labels listed under it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis import style
from analysis.figures._common import (
    CONDITION,
    Table,
    as_rankings,
    groups,
    numeric,
    one,
    op_text,
    ranking_source,
    revision,
    set_caption,
)
from analysis.rankings import variant_label

__all__ = ["head_heatmap", "heatmap_units"]

_LOG_SPAN = 100.0  # a mean-KL panel goes log-scale when its positive values span more than this factor
_LOG_FLOOR = 1e-6  # ... and shows values below max * this (zeros included) at that floor


@dataclass
class _Panel:
    key: str  # ships_kl | ships_topk | angle:<variant>
    title: str
    cbar: str
    rows: pd.DataFrame  # layer, head, head_label, value, order (1 = best)
    log: bool = False
    floor: float | None = None
    clipped: int = 0


def heatmap_units(table: Table, k: int = 10) -> list[pd.DataFrame]:
    """A rankings (or ships / head_scores) table split into one frame per condition (model, revision, dataset,
    format, operator, ε): the input of one `head_heatmap`."""
    return [g for _, g in groups(as_rankings(table, k), CONDITION)]


def _ships_panels(r: pd.DataFrame) -> list[_Panel]:
    r = r.sort_values("rank", kind="stable")
    score = numeric(r["score"])
    n_prompts = int(pd.to_numeric(r["n_prompts"], errors="coerce").max()) if r["n_prompts"].notna().any() else None
    pos = score[score > 0]
    log = bool(pos.size) and pos.max() / pos.min() > _LOG_SPAN
    floor = max(pos.min(), pos.max() * _LOG_FLOOR) if log else None
    rows = r[["layer", "head", "head_label"]].assign(value=score, order=np.arange(1, len(r) + 1))
    clipped = int((score < floor).sum()) if floor is not None else 0
    over = f" over {n_prompts} prompts" if n_prompts else ""
    panels = [_Panel("ships_kl", f"Ships: mean KL{over}", "mean KL (nats" + (", log scale)" if log else ")"),
                     rows, log, floor, clipped)]
    if r["topk_frac"].notna().any():
        k = int(pd.to_numeric(r["k"]).max())
        frac = numeric(r["topk_frac"])
        t = r[["layer", "head", "head_label"]].assign(value=frac, _rank=r["rank"].to_numpy())
        t = t.sort_values(["value", "_rank"], ascending=[False, True], kind="stable")
        t["order"] = np.where(t["value"] > 0, np.arange(1, len(t) + 1), 0)  # a head in no prompt's top k: unboxed
        panels.append(_Panel("ships_topk", f"Ships: in a prompt's top {k}", f"share of prompts (head in top {k})",
                             t.drop(columns="_rank")))
    return panels


def _angle_panels(r: pd.DataFrame) -> list[_Panel]:
    out = []
    for (sub, rr, cen), g in groups(r, ["subspace", "rank_r", "centered"]):
        g = g.sort_values("rank", kind="stable")
        rows = g[["layer", "head", "head_label"]].assign(value=numeric(g["score"]), order=np.arange(1, len(g) + 1))
        variant = variant_label(sub, rr, cen) or ""
        out.append(_Panel(f"angle:{variant}", f"Generalized Ships angle ({variant})", "angle (degrees)", rows))
    return out


def _grid(rows: pd.DataFrame, n_layers: int, n_heads: int, floor: float | None) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    values = rows["value"].to_numpy(dtype=float)
    if floor is not None:
        values = np.maximum(values, floor)
    grid[rows["layer"].to_numpy(dtype=int), rows["head"].to_numpy(dtype=int)] = values
    return grid


def _draw(fig: Figure, ax: Axes, p: _Panel, n_layers: int, n_heads: int, top: int, cell_in: float) -> None:
    grid = _grid(p.rows, n_layers, n_heads, p.floor)
    finite = grid[np.isfinite(grid)]
    hi = float(finite.max()) if finite.size else 1.0
    if p.log:
        norm: Normalize = LogNorm(vmin=p.floor, vmax=hi)
    else:
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    cmap = style.mpl.colormaps[style.HEATMAP_CMAP].with_extremes(bad="#E8E8E8")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto",
                   interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.08, aspect=max(12.0, cell_in * n_layers / 0.12))
    cb.set_label(p.cbar)
    cb.outline.set_visible(False)
    ax.set_title(p.title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.spines[:].set_visible(False)
    ax.tick_params(length=0)
    for axis, n in ((ax.xaxis, n_heads), (ax.yaxis, n_layers)):
        step = max(1, math.ceil(n / 16))
        axis.set_ticks(range(0, n, step))
    ax.set_label(p.key)
    best = p.rows[(p.rows["order"] >= 1) & (p.rows["order"] <= top)].sort_values("order")
    font = max(5.0, min(8.0, cell_in * 72 * 0.45))
    stroke = [patheffects.withStroke(linewidth=2.6, foreground="black")]
    listing = []
    for _, h in best.iterrows():
        x, y = int(h["head"]), int(h["layer"])
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.4,
                               path_effects=stroke, gid=f"top:{h['head_label']}", zorder=3))
        value = grid[y, x]
        shade = np.mean(cmap(norm(value))[:3]) if np.isfinite(value) else 1.0
        ax.text(x, y, str(int(h["order"])), ha="center", va="center", fontsize=font, fontweight="bold",
                color="black" if shade > 0.5 else "white", zorder=4)
        value_text = f"{float(h['value']):.0%}" if p.key == "ships_topk" else _fmt(float(h["value"]))
        listing.append(f"{int(h['order'])} {h['head_label']} ({value_text})")
    if listing:
        ax.annotate("top: " + style.wrap_items(listing, width=52), xy=(0.0, 0.0), xycoords="axes fraction",
                    xytext=(0, -32), textcoords="offset points", ha="left", va="top", fontsize=7.5,
                    color=style.INK, gid="top-list")


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def head_heatmap(table: Table, *, top: int = 5, k: int = 10) -> Figure:
    """Layer x head heatmaps of ONE condition (model, revision, dataset, format, operator, ε).

    `table` is a `rankings` table (its Ships and generalized-Ships rows), or a `ships` or `head_scores` table
    (ranked here; `k` is then the top-k of the frequency panel). Panels: Ships mean KL (log colour scale when
    it spans more than two decades), the share of prompts that put the head in their top k, and one panel per
    generalized-Ships variant. Each panel boxes and numbers its `top` heads (rectangles with gid
    `top:<label>`; axes labelled `ships_kl`, `ships_topk`, `angle:<variant>`) and lists them under it.
    ValueError for an empty table or several conditions (split with `heatmap_units`).
    """
    r = as_rankings(table, k)
    if r.empty:
        raise ValueError("head_heatmap: empty table")
    cond = {c: one(r, c, "head_heatmap") for c in CONDITION}
    panels = _ships_panels(r[r["source"] == "ships"]) if (r["source"] == "ships").any() else []
    panels += _angle_panels(r[r["source"] == "head_scores"])
    n_layers, n_heads = int(r["layer"].max()) + 1, int(r["head"].max()) + 1
    cell = min(0.42, 4.6 / n_heads, 6.0 / n_layers)
    pw, ph = max(2.2, cell * n_heads), max(0.9, cell * n_layers)
    ncols = max(1, min(len(panels), int(15 // (pw + 1.4))))
    nrows = math.ceil(len(panels) / ncols)
    with style.context():
        fig = style.new_figure(ncols * (pw + 1.4), nrows * (ph + 1.5) + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, p in zip(axes, panels):
            _draw(fig, ax, p, n_layers, n_heads, top, cell)
        for ax in axes[len(panels):]:
            ax.remove()
        model = style.short_model(cond["model"]) + revision(cond["model_revision"])
        where = f"{cond['dataset']} · {op_text(cond['op'], cond['eps'])} · format {cond['prompt_format']}"
        fig.suptitle(f"Attention-head importance in {model}\n{where} · {n_layers} layers x {n_heads} heads",
                     ha="left", x=0.01)
    notes = [f"Each cell is one attention head (layer up, head across); the {top} highest of each panel are boxed "
             "and numbered."]
    for p in panels:
        if p.key == "ships_kl":
            notes.append("Ships: KL(normal ‖ ablated) of the next-token distribution, averaged over the prompts.")
            if p.log and p.clipped:
                notes.append(f"Colour is log-scaled; {p.clipped} head(s) below {p.floor:.1e} nats (zeros included) "
                             "are drawn at that floor.")
        elif p.key == "ships_topk":
            notes.append("Top-k frequency: share of prompts whose own Ships ranking puts the head in its top k "
                         "(a large mean driven by one prompt shows as a low share).")
        else:
            notes.append("Generalized Ships: principal angle (degrees) between the normal and ablated "
                         "dataset-level representation subspaces.")
    return set_caption(fig, " ".join(notes), [ranking_source(table)])
