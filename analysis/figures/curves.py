"""ASR against the number of heads ablated (the `asr_curve` table): the targeted curves with Wilson intervals,
the random-head band and the normal level; beside it over-refusal on benign prompts and degenerate output."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

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
from study.core.stats import wilson

__all__ = ["asr_curve_figure", "asr_curve_units"]

_UNIT = ["dataset", "prompt_format", "decoding"]
_BAND_HALF = 0.22  # the random band is drawn this far either side of each group size


def asr_curve_units(asr_curve: Table, max_models: int = MAX_PANELS) -> list[pd.DataFrame]:
    """The `asr_curve` table split into one frame per (harmful dataset, format, decoding) and at most
    `max_models` models: its harmful rows plus the same models' benign rows of that format and decoding.
    A unit without targeted rows (only the normal model) is left out."""
    df = as_frame(asr_curve, "asr_curve")
    harm, benign = df[df["kind"] == "harmful"], df[df["kind"] == "benign"]
    out = []
    for (dataset, fmt, decoding), g in groups(harm, _UNIT):
        models = [m for m in dict.fromkeys(g["model"]) if g[(g["model"] == m)]["condition"].isin(TARGETED).any()]
        for part in chunks(models, max_models):
            if not part:
                continue
            b = benign[benign["model"].isin(part) & (benign["prompt_format"] == fmt) & (benign["decoding"] == decoding)]
            out.append(pd.concat([g[g["model"].isin(part)], b], ignore_index=True))
    return out


def _series(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(condition, legend label, rows by group size) per targeted condition and operator."""
    t = rows[rows["condition"].isin(TARGETED)]
    ops = t[["op", "eps"]].drop_duplicates()
    out = []
    for cond in TARGETED:
        for (op, eps), g in groups(t[t["condition"] == cond], ["op", "eps"]):
            label = TARGETED_NAMES[cond] + (f" ({op_text(op, eps)})" if len(ops) > 1 else "")
            out.append((cond, label, g.sort_values("group_size", kind="stable")))
    return out


def _band(ax: Axes, g: pd.DataFrame, lo: str, hi: str, mean: str, color: str, label: str) -> None:
    r = g[pd.to_numeric(g["random_draws"]) > 0].drop_duplicates("group_size").sort_values("group_size")
    if r.empty:
        return
    size = r["group_size"].to_numpy(dtype=float)
    x = np.column_stack([size - _BAND_HALF, size + _BAND_HALF]).ravel()
    rep = lambda c: np.repeat(numeric(r[c]), 2)  # noqa: E731
    ax.fill_between(x, rep(lo), rep(hi), color=color, alpha=0.35 if color == style.BAND else 0.18, linewidth=0,
                    label=f"{label} (min–max)", gid="random-band")
    ax.plot(x, rep(mean), color=style.MUTED, linestyle="--", linewidth=1.2, label=f"{label} (mean)",
            gid="random-mean")


def _bands(ax: Axes, series: list, lo: str, hi: str, mean: str) -> None:
    """One random band per level (per-prompt draws pair with `query`, the others with the dataset-level groups)
    and op."""
    keys = {("query" if c == "query" else "dataset", g["op"].iloc[0], g["eps"].iloc[0]) for c, _, g in series}
    seen = set()
    for cond, _label, g in series:
        key = ("query" if cond == "query" else "dataset", g["op"].iloc[0], g["eps"].iloc[0])
        if key in seen:
            continue
        seen.add(key)
        color = style.BAND if len(keys) == 1 else style.CONDITION_COLORS.get(cond, style.BAND)
        what = "random heads" + (" per prompt" if key[0] == "query" and len(keys) > 1 else "")
        _band(ax, g, lo, hi, mean, color, what)


def _dodge(i: int, n: int) -> float:
    """x offset of series i of n, so error bars at one group size do not overprint."""
    return (i - (n - 1) / 2) * 0.08


def _curve(ax: Axes, g: pd.DataFrame, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, color: str, label: str,
           gid: str, marker: str = "o", linestyle: str = "-", dx: float = 0.0) -> None:
    x = g["group_size"].to_numpy(dtype=float) + dx
    yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
    cont = ax.errorbar(x, y, yerr=yerr, color=color, marker=marker, linestyle=linestyle, label=label,
                       markersize=5, zorder=4)
    cont.lines[0].set_gid(gid)
    for col in cont.lines[2]:
        col.set_gid(f"ci:{gid}")


def _rate_axis(ax: Axes, sizes: list[int]) -> None:
    ax.set_ylim(-0.03, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(axis="y")
    ax.set_axisbelow(True)
    int_ticks(ax, sizes)
    ax.set_xlabel("heads ablated (group size)")


def _left(ax: Axes, rows: pd.DataFrame, series: list) -> bool:
    starred = False
    for i, (cond, label, g) in enumerate(series):
        color = style.CONDITION_COLORS.get(cond, style.INK)
        y, lo, hi = numeric(g["asr"]), numeric(g["ci_low"]), numeric(g["ci_high"])
        dx = _dodge(i, len(series))
        _curve(ax, g, y, lo, hi, color, label, f"asr:{cond}", dx=dx)
        for xi, h, p in zip(g["group_size"], hi, numeric(g["p_mcnemar"])):
            if np.isfinite(p) and p < 0.05:
                ax.text(xi + dx, min(h, 1.0) + 0.015, "*", ha="center", va="bottom", color=color, fontsize=11)
                starred = True
    _bands(ax, series, "random_asr_min", "random_asr_max", "random_asr_mean")
    level = numeric(rows["normal_asr"])
    if np.isfinite(level).any():
        ax.axhline(float(np.nanmax(level)), color=style.INK, linestyle=":", linewidth=1.3,
                   label="normal model (no ablation)", gid="normal")
    ax.set_ylabel("attack success rate\n(% of generations)")
    return starred


def _right(ax: Axes, harm: pd.DataFrame, benign: pd.DataFrame) -> None:
    series = _series(benign)
    for i, (cond, _label, g) in enumerate(series):
        n = numeric(g["n"])
        rate = numeric(g["refusal_rate"])
        ci = np.array([wilson(int(round(r * m)), int(m)) for r, m in zip(rate, n)])
        _curve(ax, g, rate, ci[:, 0], ci[:, 1], style.CONDITION_COLORS.get(cond, style.INK),
               "over-refusal, benign prompts", f"refusal:{cond}", marker="s", dx=_dodge(i, len(series)))
    if not benign.empty:
        _bands(ax, series, "random_refusal_min", "random_refusal_max", "random_refusal_mean")
        level = numeric(benign["normal_refusal_rate"])
        if np.isfinite(level).any():
            ax.axhline(float(np.nanmax(level)), color=style.INK, linestyle=":", linewidth=1.3,
                       label="normal model (no ablation)")
    for cond, _label, g in _series(harm):
        ax.plot(g["group_size"], numeric(g["degenerate_frac"]), color=style.CONDITION_COLORS.get(cond, style.INK),
                linestyle="--", marker="x", label="degenerate output, harmful prompts", gid=f"degenerate:{cond}",
                zorder=5)
    ax.set_ylabel("share of generations")


def asr_curve_figure(asr_curve: Table, judge: str | None = None) -> Figure:
    """ASR against group size for one (harmful dataset, format, decoding), one row of two panels per model.

    Left: each targeted condition's ASR with Wilson 95% error bars (gid `ci:asr:<condition>` on the bars), `*`
    where the exact McNemar test against the normal model gives p < 0.05, the random-head band (min..max
    shaded, mean dashed) and the normal model's level (dotted). Right: over-refusal on the benign prompts
    (refusal rate, Wilson error bars, its random band and normal level) and the degenerate fraction of the
    harmful generations (dashed). `judge` None takes the first judge of the table and says so in the title.
    """
    df = as_frame(asr_curve, "asr_curve")
    harm = df[df["kind"] == "harmful"]
    if harm.empty or not harm["condition"].isin(TARGETED).any():
        raise ValueError(f"asr_curve_figure: no harmful rows of an ablated condition ({', '.join(TARGETED)})")
    unit = {c: one(harm, c, "asr_curve_figure") for c in _UNIT}
    judges = list(dict.fromkeys(harm["judge"]))
    judge = judges[0] if judge is None else judge
    if judge not in judges:
        raise ValueError(f"judge {judge!r} not in the table: judges are {judges}")
    df = df[df["judge"] == judge]
    models = list(dict.fromkeys(df[df["kind"] == "harmful"]["model"]))
    labels = style.model_labels(models)
    benign_sets = sorted(set(df[df["kind"] == "benign"]["dataset"]))
    starred = False
    with style.context():
        fig = style.new_figure(9.2, 2.7 * len(models) + 1.3)
        axes = fig.subplots(len(models), 2, squeeze=False)
        for (ax_l, ax_r), model in zip(axes, models):
            rows = df[df["model"] == model]
            harm_m, benign_m = rows[rows["kind"] == "harmful"], rows[rows["kind"] == "benign"]
            rev = revision(rows["model_revision"].iloc[0])
            starred |= _left(ax_l, harm_m, _series(harm_m))
            _right(ax_r, harm_m, benign_m)
            sizes = sorted(int(s) for s in rows["group_size"] if int(s) > 0)
            for ax in (ax_l, ax_r):
                _rate_axis(ax, sizes)
            name = labels[model] + rev
            ax_l.set_title(f"{name}: attack success on {unit['dataset']}")
            on = f"over-refusal ({', '.join(sorted(set(benign_m['dataset'])))}) and" if not benign_m.empty \
                else "no benign prompts in this run;"
            ax_r.set_title(f"{name}: {on} degenerate output")
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if starred:
            handles["p < 0.05 vs normal (exact McNemar)"] = Line2D([], [], linestyle="none", marker="$*$",
                                                                     color=style.INK, markersize=8)
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncols=3)
        more = f" (first of {len(judges)}: {', '.join(judges)})" if len(judges) > 1 else ""
        fig.suptitle(f"ASR against heads ablated — {unit['dataset']} · {unit['decoding']} decoding · format "
                     f"{unit['prompt_format']}\njudge {judge}{more}", ha="left", x=0.01)
    caption = (f"Attack success rate on {unit['dataset']} ({unit['decoding']} decoding, judge {judge}) as more heads "
               "are ablated; error bars are Wilson 95% intervals. The grey band spans the random-head controls of the "
               "same size (min to max over draws, dashed: their mean); the dotted line is the unablated model. "
               "Right: refusals of benign prompts" + (f" ({', '.join(benign_sets)})" if benign_sets else "")
               + " and the share of degenerate harmful generations (repetition, echo, no words), so a broken model "
               "is not read as a jailbroken one.")
    return set_caption(fig, caption, ["asr_curve"])
