"""Safety specificity (the `specificity` table): each head's mean Ships KL on harmful prompts against the same on
benign prompts, log-log, one panel per model; heads below the diagonal move harmful answers more."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from analysis import style
from analysis.figures._common import (
    MAX_PANELS,
    Table,
    as_frame,
    chunks,
    groups,
    numeric,
    one,
    op_text,
    revision,
    set_caption,
)

__all__ = ["specificity_figure", "specificity_units"]

_UNIT = ["dataset", "benign_dataset", "prompt_format", "op", "eps"]
_MERGE_DECADES = 0.04  # labels of points closer than this (in log10 units on both axes) are merged


def specificity_units(specificity: Table, max_models: int = MAX_PANELS) -> list[pd.DataFrame]:
    """The `specificity` table split into one frame per (harmful set, benign set, format, operator, ε) and at
    most `max_models` models (one panel each)."""
    out = []
    for _, g in groups(as_frame(specificity, "specificity"), _UNIT):
        for part in chunks(list(dict.fromkeys(zip(g["model"], g["model_revision"]))), max_models):
            keys = set(part)
            out.append(g[[k in keys for k in zip(g["model"], g["model_revision"])]])
    return out


def _floor(values: np.ndarray) -> float:
    pos = values[np.isfinite(values) & (values > 0)]
    if not pos.size:
        raise ValueError("specificity_figure: no positive KL to draw on a log scale")
    return 10.0 ** math.floor(math.log10(pos.min()))


def _labels(g: pd.DataFrame, x: np.ndarray, y: np.ndarray, top: int) -> list[tuple[float, float, str]]:
    """(x, y, text) for the `top` heads by rank_specific; heads drawn on (nearly) one spot share a label."""
    best = np.argsort(g["rank_specific"].to_numpy(), kind="stable")[:top]
    spots: list[list] = []
    for i in best:
        lx, ly = math.log10(x[i]), math.log10(y[i])
        for s in spots:
            if abs(s[0] - lx) < _MERGE_DECADES and abs(s[1] - ly) < _MERGE_DECADES:
                s[2].append(g["head_label"].iloc[i])
                break
        else:
            spots.append([lx, ly, [g["head_label"].iloc[i]], x[i], y[i]])
    return [(s[3], s[4], ", ".join(s[2])) for s in spots]


def _annotate(ax: object, labels: list[tuple[float, float, str]], lim: tuple[float, float]) -> None:
    """Labels beside their points, pushed down (with a leader line) where they would overprint a placed one."""
    lo, hi = math.log10(lim[0]), math.log10(lim[1])
    placed: list[tuple[float, float]] = []
    for x, y, text in sorted(labels, key=lambda t: -t[1]):
        fx, fy = (math.log10(x) - lo) / (hi - lo), (math.log10(y) - lo) / (hi - lo)
        tx, ty = fx + 0.025, fy + 0.02
        while any(abs(tx - px) < 0.3 and abs(ty - py) < 0.05 for px, py in placed):
            ty -= 0.05
        placed.append((tx, ty))
        moved = abs(ty - fy - 0.02) > 1e-9
        ax.annotate(text, (x, y), xytext=(tx, ty), textcoords="axes fraction", fontsize=7.5, color=style.INK,
                    va="center", gid=f"label:{text.replace(', ', ',')}", zorder=4,
                    arrowprops=dict(arrowstyle="-", color=style.MUTED, linewidth=0.6, shrinkA=0, shrinkB=3)
                    if moved else None)


def specificity_figure(specificity: Table, top: int = 5) -> Figure:
    """Harmful against benign mean KL for every head of one (harmful set, benign set, format, operator, ε), one
    panel per model (shared log axes), coloured by specificity h / (h + b), with the diagonal y = x. KL <= 0
    cannot sit on a log axis: such values are drawn at a floor (hollow markers) and the caption says how many.
    The `top` heads by rank_specific are labelled (texts with gid `label:<L1H0>[,<L1H3>]`)."""
    df = as_frame(specificity, "specificity")
    if df.empty:
        raise ValueError("specificity_figure: empty table")
    unit = {c: one(df, c, "specificity_figure") for c in _UNIT}
    models = list(dict.fromkeys(zip(df["model"], df["model_revision"])))
    short = style.model_labels([m for m, _ in models])
    h_all, b_all = numeric(df["kl_harmful"]), numeric(df["kl_benign"])
    floor = _floor(np.concatenate([h_all, b_all]))
    top_v = float(np.nanmax(np.concatenate([h_all, b_all])))
    lim = (floor / 2, max(top_v, floor) * 3)
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    norm = Normalize(0.0, 1.0)
    clipped_total = 0
    with style.context():
        fig = style.new_figure(3.4 * ncols + 1.1, 3.1 * nrows + 0.8)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        for ax, (model, rev) in zip(axes.ravel(), models):
            g = df[(df["model"] == model) & (df["model_revision"] == rev)]
            h, b = numeric(g["kl_harmful"]), numeric(g["kl_benign"])
            clipped = (h < floor) | (b < floor)
            clipped_total += int(clipped.sum())
            x, y = np.maximum(h, floor), np.maximum(b, floor)
            spec = numeric(g["specificity"])
            ax.plot(lim, lim, color=style.MUTED, linestyle="--", linewidth=1.0, label="y = x (no preference)",
                    zorder=1)
            ax.scatter(x[~clipped], y[~clipped], c=spec[~clipped], cmap=style.SCORE_CMAP, norm=norm, s=26,
                       edgecolors=style.INK, linewidths=0.4, zorder=3, gid="heads")
            if clipped.any():
                ax.scatter(x[clipped], y[clipped], facecolors="none", edgecolors=style.INK, s=26, linewidths=0.8,
                           zorder=3, gid="heads-clipped", label=f"KL below {floor:.0e} (drawn at it)")
            _annotate(ax, _labels(g, x, y, top), lim)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
            ax.set_aspect("equal", adjustable="box")
            ax.text(0.97, 0.04, "harmful-specific", transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5,
                    color=style.MUTED, style="italic")
            ax.text(0.04, 0.96, "affects benign\nprompts more", transform=ax.transAxes, ha="left", va="top",
                    fontsize=7.5, color=style.MUTED, style="italic")
            ax.set_title(style.short_model(short[model]) + revision(rev))
            ax.set_xlabel(f"mean KL, harmful: {unit['dataset']} (nats)")
            ax.set_ylabel(f"mean KL, benign: {unit['benign_dataset']} (nats)")
            ax.label_outer()
        for ax in axes.ravel()[len(models):]:
            ax.remove()
        if clipped_total:
            handles: dict[str, object] = {}
            for ax in axes.ravel()[:len(models)]:
                for hnd, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, hnd)
            fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=style.SCORE_CMAP), ax=axes.ravel().tolist(), shrink=0.8)
        cb.set_label("specificity h / (h + b)")
        cb.outline.set_visible(False)
        fig.suptitle(f"Safety specificity of each head — {unit['dataset']} against {unit['benign_dataset']}\n"
                     f"{op_text(unit['op'], unit['eps'])} · format {unit['prompt_format']}", ha="left", x=0.01)
    caption = (f"Each point is one head: mean Ships KL when it is ablated, on harmful prompts (x) against benign ones "
               f"(y). Below the dashed diagonal a head moves harmful answers more (a safety-specific head); on it, "
               f"both alike (a head the model needs everywhere). Colour: specificity h / (h + b), 0.5 = no preference. "
               f"Labelled: the {top} heads with the largest h x specificity.")
    if clipped_total:
        caption += (f" {clipped_total} value(s) below {floor:.0e} nats (zeros included) cannot sit on a log axis and "
                    "are drawn at that floor as hollow markers.")
    return set_caption(fig, caption, ["specificity"])
