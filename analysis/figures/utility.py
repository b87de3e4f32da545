"""Utility (the `utility` table): what ablating the heads costs the model on benign text, as the ratio of each
condition's perplexity (or lm-eval score) to the unablated model's, against the number of heads ablated."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import style
from analysis.figures._common import (
    MAX_PANELS,
    TARGETED,
    TARGETED_NAMES,
    Table,
    as_frame,
    chunks,
    groups,
    int_ticks,
    numeric,
    one,
    op_text,
    revision,
    set_caption,
)

__all__ = ["utility_figure", "utility_units"]

_UNIT = ["dataset", "prompt_format"]
MAX_METRICS = 6


def utility_units(utility: Table, max_models: int = MAX_PANELS) -> list[pd.DataFrame]:
    """The `utility` table split into one frame per (text set, format) and at most `max_models` models."""
    out = []
    for _, g in groups(as_frame(utility, "utility"), _UNIT):
        for part in chunks(list(dict.fromkeys(g["model"])), max_models):
            out.append(g[g["model"].isin(part)])
    return out


def _metrics(df: pd.DataFrame) -> list[str]:
    found = list(dict.fromkeys(df["metric"]))
    return (["perplexity"] if "perplexity" in found else []) + [m for m in found if m != "perplexity"]


def utility_figure(utility: Table) -> Figure:
    """Ratio to the normal model against group size, one row per model and one column per metric (perplexity
    first, at most MAX_METRICS): each targeted condition as a line (gid `utility:<condition>`), each random
    draw as a grey point (gid `utility:random`), 1 (the unablated model) dotted. Rows without a ratio fall back
    to the raw value."""
    df = as_frame(utility, "utility")
    df = df[df["value"].notna()]  # an lm-eval task that failed has no value (the report's table says why)
    if df.empty:
        raise ValueError("utility_figure: empty table")
    dataset, fmt = one(df, "dataset", "utility_figure"), one(df, "prompt_format", "utility_figure")
    metrics = _metrics(df)[:MAX_METRICS]
    models = list(dict.fromkeys(df["model"]))
    labels = style.model_labels(models)
    several_ops = len(df[df["condition"] != "normal"][["op", "eps"]].drop_duplicates()) > 1
    with style.context():
        fig = style.new_figure(max(6.4, 3.6 * len(metrics) + 0.6), 2.6 * len(models) + 1.1)
        axes = fig.subplots(len(models), len(metrics), squeeze=False)
        for row, model in zip(axes, models):
            for ax, metric in zip(row, metrics):
                g = df[(df["model"] == model) & (df["metric"] == metric)]
                use_ratio = g["ratio"].notna().any()
                col = "ratio" if use_ratio else "value"
                for cond in TARGETED:
                    for (op, eps), s in groups(g[g["condition"] == cond], ["op", "eps"]):
                        s = s.sort_values("group_size")
                        label = TARGETED_NAMES[cond] + (f" ({op_text(op, eps)})" if several_ops else "")
                        ax.plot(s["group_size"], numeric(s[col]), marker="o", label=label,
                                color=style.CONDITION_COLORS[cond], gid=f"utility:{cond}", zorder=3)
                r = g[g["condition"] == "random"]
                if not r.empty:
                    ax.scatter(r["group_size"], numeric(r[col]), color=style.MUTED, s=18, zorder=2,
                               label="random heads (each draw)", gid="utility:random")
                normal = g[g["condition"] == "normal"]
                if use_ratio:
                    ax.axhline(1.0, color=style.INK, linestyle=":", linewidth=1.3, label="normal model (no ablation)")
                elif not normal.empty:
                    ax.axhline(float(numeric(normal["value"]).mean()), color=style.INK, linestyle=":",
                               linewidth=1.3, label="normal model (no ablation)")
                y = numeric(g[col])
                y = y[np.isfinite(y) & (y > 0)]
                if y.size and y.max() / y.min() > 20:
                    ax.set_yscale("log")
                int_ticks(ax, [int(v) for v in g["group_size"] if int(v) > 0] or [0])
                ax.grid(axis="y")
                ax.set_axisbelow(True)
                ax.set_xlabel("heads ablated (group size)")
                what = "perplexity" if metric == "perplexity" else metric
                ax.set_ylabel(f"{what} / normal model's\n(ratio)" if use_ratio else what)
                rev = revision(g["model_revision"].iloc[0]) if not g.empty else ""
                ax.set_title(f"{labels[model]}{rev}: {what}")
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for hnd, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, hnd)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(4, len(handles) or 1))
        fig.suptitle(f"Utility cost of the ablations — {dataset} · format {fmt}", ha="left", x=0.01)
    caption = (f"Each ablation's {', '.join(metrics)} on {dataset} divided by the unablated model's (1 = no cost; "
               "for perplexity, above 1 is worse). Grey points: random heads of the same number, one per draw.")
    return set_caption(fig, caption, ["utility"])

