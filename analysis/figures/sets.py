"""Overlap of top-k head sets: a Venn diagram for 2-3 conditions, an UpSet chart for more, both annotated with
the exact p-values of the `overlap` table (drawn with plain matplotlib: no matplotlib-venn or upsetplot)."""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from analysis import is_missing
from analysis.figures._common import Table, as_frame, groups, op_text, set_caption
from analysis.overlap import top_heads
from analysis.style import INK, MUTED, OKABE_ITO, SCORE_CMAP, context, fmt_p, model_labels, new_figure, wrap_items

__all__ = ["overlap_figure", "overlap_units", "overlap_upset", "overlap_venn", "region_sizes"]

_GROUP = ["source", "variant", "axis", "prompt_format", "k", "n_heads"]
_VENN_COLORS = [OKABE_ITO["blue"], OKABE_ITO["vermillion"], OKABE_ITO["green"]]
MAX_COMBOS = 30  # UpSet columns shown (largest first)


def overlap_units(overlap: Table) -> list[pd.DataFrame]:
    """The `overlap` table split into comparisons: each frame holds one group of conditions' rows (every pair
    and, for more than two, the all-way row), the input of one `overlap_figure`."""
    out = []
    for _, g in groups(as_frame(overlap, "overlap"), _GROUP):
        g = g.sort_values("n_sets", ascending=False, kind="stable")
        found: list[tuple[frozenset[str], list[Any]]] = []
        for idx, members in zip(g.index, g["members"]):
            ms = frozenset(members)
            for whole, rows in found:
                if ms <= whole:
                    rows.append(idx)
                    break
            else:
                found.append((ms, [idx]))
        out += [g.loc[rows] for _, rows in found]
    return out


def _unit(overlap: Table) -> tuple[pd.DataFrame, pd.Series]:
    units = overlap_units(overlap)
    if len(units) != 1:
        raise ValueError(f"expected the rows of one comparison, got {len(units)}: split with overlap_units()")
    rows = units[0]
    return rows, rows.iloc[0]  # sorted by n_sets: the first row lists every member


def _names(whole: pd.Series) -> list[str]:
    axis, members = whole["axis"], list(whole["members"])
    if axis == "models":
        short = model_labels(list(whole["models"]))
        names = [short[m] + _rev(lab, m) for m, lab in zip(whole["models"], members)]
    elif axis == "datasets":
        names = [str(d) for d in whole["datasets"]]
    else:
        names = [str(o) for o in whole["ops"]]
        if len(set(names)) < len(names):
            names = [op_text(o, e) for o, e in zip(whole["ops"], whole["eps"])]
    return names if len(set(names)) == len(names) else [str(m) for m in members]


def _rev(label: str, model: str) -> str:
    head = str(label).split("|")[0]
    return head[len(model):] if head.startswith(model + "@") else ""


def _sets(whole: pd.Series, rankings: Table | None) -> list[frozenset[str]] | None:
    """Each member's top-k heads from `rankings`, or None when a member's ranking is not there."""
    if rankings is None:
        return None
    out = []
    for i, member in enumerate(whole["members"]):
        rev = _rev(member, whole["models"][i])[1:] or None
        cond = dict(model=whole["models"][i], model_revision=rev, dataset=whole["datasets"][i], op=whole["ops"][i],
                    eps=float(whole["eps"][i]), prompt_format=whole["prompt_format"], source=whole["source"],
                    variant=None if is_missing(whole["variant"]) else whole["variant"])
        try:
            out.append(frozenset(top_heads(rankings, cond, int(whole["k"]))))
        except ValueError:
            return None
    return out


def region_sizes(rows: pd.DataFrame, n_sets: int, k: int) -> dict[tuple[int, ...], int]:
    """Heads in exactly each combination of 2 or 3 sets, from the table's pair and all-way intersection sizes
    (inclusion-exclusion: every set has k heads)."""
    whole = list(rows.iloc[0]["members"])
    shared = {frozenset(whole.index(m) for m in r["members"]): int(r["shared"]) for _, r in rows.iterrows()}
    if n_sets == 2:
        ab = shared[frozenset({0, 1})]
        return {(0,): k - ab, (1,): k - ab, (0, 1): ab}
    abc = shared[frozenset({0, 1, 2})]
    pair = {p: shared[frozenset(p)] for p in itertools.combinations(range(3), 2)}
    out: dict[tuple[int, ...], int] = {p: s - abc for p, s in pair.items()}
    for i in range(3):
        out[(i,)] = k - sum(s for p, s in pair.items() if i in p) + abc
    out[(0, 1, 2)] = abc
    return out


def _exact(sets: Sequence[frozenset[str]]) -> dict[tuple[int, ...], list[str]]:
    """Heads in exactly each combination of sets (keys: sorted set indices)."""
    where: dict[str, list[int]] = {}
    for i, s in enumerate(sets):
        for h in s:
            where.setdefault(h, []).append(i)
    out: dict[tuple[int, ...], list[str]] = {}
    for h, idx in where.items():
        out.setdefault(tuple(sorted(idx)), []).append(h)
    return {c: sorted(v, key=_head_order) for c, v in out.items()}


def _head_order(label: str) -> tuple[int, int, str]:
    try:
        layer, head = label[1:].split("H")
        return int(layer), int(head), label
    except ValueError:
        return (1 << 30, 0, label)


def _context(whole: pd.Series, names: Sequence[str]) -> str:
    source = ("Ships mean KL" if whole["source"] == "ships"
              else f"generalized Ships ({whole['variant']})" if not is_missing(whole["variant"]) else whole["source"])
    fixed = []
    if whole["axis"] != "models":
        fixed.append(model_labels(whole["models"])[whole["models"][0]])
    if whole["axis"] != "datasets":
        fixed.append(str(whole["datasets"][0]))
    if whole["axis"] != "ops":
        fixed.append(op_text(whole["ops"][0], whole["eps"][0]))
    fixed.append(f"format {whole['prompt_format']}")
    return f"{source} · " + " · ".join(fixed) + f" · top {int(whole['k'])} of {int(whole['n_heads'])} heads"


def _pvalue_lines(rows: pd.DataFrame, names: Sequence[str], whole: Sequence[str], width: int = 88) -> list[str]:
    """One line per comparison; long ones wrap (indented) so the text stays as wide as the diagram."""
    lines = []
    for _, r in rows.sort_values("n_sets", kind="stable").iterrows():
        who = " ∩ ".join(names[list(whole).index(m)] for m in r["members"])
        text = f"{who}: {int(r['shared'])} shared (by chance: {r['expected_shared']:.2g}), {fmt_p(r['p_value'])}"
        lines += textwrap.wrap(text, width, subsequent_indent="    ", break_on_hyphens=False)
    return lines


_CAPTION = ("Each condition's top-{k} heads of {n}. {what} p: exact probability that independent, uniformly random "
            "top-{k} sets share at least as many heads (hypergeometric for a pair, its exact extension for more).")


def overlap_venn(overlap: Table, rankings: Table | None = None) -> Figure:
    """Venn diagram of one comparison of 2 or 3 top-k sets (the rows of one `overlap_units` frame).

    Region counts come from the head sets in `rankings` when given (their labels are written in regions of
    up to 3 heads), else from the table's intersection sizes. Circles carry gid `set:<name>`, region counts
    gid `region:<i>&<j>` (0-based set indices). The p-values of every pair and of all sets are listed below.
    """
    rows, whole = _unit(overlap)
    n, k = int(whole["n_sets"]), int(whole["k"])
    if n not in (2, 3):
        raise ValueError(f"a Venn diagram takes 2 or 3 sets, got {n}: use overlap_upset")
    names = _names(whole)
    sets = _sets(whole, rankings)
    heads = _exact(sets) if sets is not None else {}
    sizes = {c: len(v) for c, v in heads.items()} if sets is not None else region_sizes(rows, n, k)
    if n == 2:
        centres = [(-0.55, 0.0), (0.55, 0.0)]
        spots = {(0,): (-1.0, 0.0), (1,): (1.0, 0.0), (0, 1): (0.0, 0.0)}
        name_at = [(-0.9, 1.12, "right"), (0.9, 1.12, "left")]
        lim = (-1.75, 1.75, -1.15, 1.35)
    else:
        centres = [(0.0, 0.62), (-0.537, -0.31), (0.537, -0.31)]
        spots = {(0,): (0.0, 1.12), (1,): (-0.98, -0.56), (2,): (0.98, -0.56), (0, 1): (-0.63, 0.37),
                 (0, 2): (0.63, 0.37), (1, 2): (0.0, -0.73), (0, 1, 2): (0.0, 0.0)}
        # bottom names grow away from each other (long model names would run into one another centred)
        name_at = [(0.0, 1.74, "center"), (-0.1, -1.45, "right"), (0.1, -1.45, "left")]
        lim = (-1.8, 1.8, -1.6, 1.9)
    lines = _pvalue_lines(rows, names, list(whole["members"]))
    with context():
        fig = new_figure(6.4, 5.6 + 0.16 * len(lines))
        gs = fig.add_gridspec(2, 1, height_ratios=[4.6, 0.1 + 0.16 * len(lines)])
        ax, info = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
        for i, (c, name) in enumerate(zip(centres, names)):
            col = _VENN_COLORS[i]
            ax.add_patch(Circle(c, 1.0, facecolor=col, alpha=0.18, edgecolor="none"))
            ax.add_patch(Circle(c, 1.0, fill=False, edgecolor=col, linewidth=1.8, gid=f"set:{name}"))
            x, y, ha = name_at[i]
            ax.text(x, y, name, ha=ha, va="center", color=col, fontsize=10, fontweight="bold")
        for combo, (x, y) in spots.items():
            size = sizes.get(combo, 0)
            ax.text(x, y, str(size), ha="center", va="center", fontsize=13, fontweight="bold",
                    color=INK if size else MUTED, gid="region:" + "&".join(map(str, combo)))
            labels = heads.get(combo, [])
            if 0 < len(labels) <= 3:
                ax.text(x, y - 0.17, "\n".join(labels), ha="center", va="top", fontsize=7, color=INK)
        ax.set_xlim(lim[0], lim[1])
        ax.set_ylim(lim[2], lim[3])
        ax.set_aspect("equal")
        ax.axis("off")
        info.axis("off")
        info.text(0.0, 1.0, "\n".join(lines), ha="left", va="top", fontsize=8, transform=info.transAxes)
        context_text = wrap_items(_context(whole, names).split(" · "), 70)
        fig.suptitle(f"Top-{k} heads shared across {whole['axis']}\n{context_text}", ha="left", x=0.01)
    what = "Numbers: heads in exactly that region."
    return set_caption(fig, _CAPTION.format(k=k, n=int(whole["n_heads"]), what=what),
                       ["overlap"] + (["rankings"] if sets is not None else []))


def overlap_upset(overlap: Table, rankings: Table) -> Figure:
    """UpSet chart of one comparison of any number of top-k sets: bars (gid `combo:<name>&<name>`) count the
    heads in exactly the sets marked in the dot matrix below, largest first (at most MAX_COMBOS); a matrix
    beside it gives every pair's shared heads and p-value; the all-way row is in the title of the bars.
    ValueError when `rankings` lacks a member's ranking (the sets are needed)."""
    rows, whole = _unit(overlap)
    n, k = int(whole["n_sets"]), int(whole["k"])
    names = _names(whole)
    sets = _sets(whole, rankings)
    if sets is None:
        raise ValueError("overlap_upset needs every member's ranking in `rankings`")
    exact = _exact(sets)
    combos = sorted(exact, key=lambda c: (-len(exact[c]), len(c), c))
    hidden = max(0, len(combos) - MAX_COMBOS)
    combos = combos[:MAX_COMBOS]
    members = list(whole["members"])
    pair_rows = rows[rows["n_sets"] == 2]
    show_pairs = 2 < n <= 12 and not pair_rows.empty
    nc = len(combos)
    bar_w = max(3.6, 0.32 * nc + 1.8)
    pair_w = 0.42 * n + 1.6 if show_pairs else 0.0
    with context():
        fig = new_figure(bar_w + pair_w + max(len(s) for s in names) * 0.06, 2.9 + 0.3 * n)
        gs = fig.add_gridspec(2, 2 if show_pairs else 1, height_ratios=[2.3, 0.3 * n + 0.2],
                              width_ratios=[bar_w, pair_w] if show_pairs else None)
        ax_bar = fig.add_subplot(gs[0, 0])
        ax_dot = fig.add_subplot(gs[1, 0], sharex=ax_bar)
        sizes = [len(exact[c]) for c in combos]
        bars = ax_bar.bar(range(nc), sizes, width=0.62, color=OKABE_ITO["blue"])
        for b, c, s in zip(bars, combos, sizes):
            b.set_gid("combo:" + "&".join(names[i] for i in c))
            ax_bar.text(b.get_x() + b.get_width() / 2, s, str(s), ha="center", va="bottom", fontsize=7.5)
        ax_bar.set_ylabel("heads in exactly\nthese sets")
        ax_bar.set_ylim(0, max(sizes) * 1.18 if sizes else 1)
        ax_bar.tick_params(labelbottom=False, bottom=False)
        ax_bar.grid(axis="y")
        ax_bar.set_axisbelow(True)
        ax_bar.set_label("upset-bars")
        all_row = rows[rows["n_sets"] == n].iloc[0]
        hidden_text = f"; {hidden} smaller combinations not shown" if hidden else ""
        ax_bar.set_title(f"all {n}: {int(all_row['shared'])} shared (by chance: {all_row['expected_shared']:.2g}), "
                         f"{fmt_p(all_row['p_value'])}{hidden_text}")
        for i in range(n):
            if i % 2 == 0:
                ax_dot.axhspan(i - 0.5, i + 0.5, color="#F2F2F2", zorder=0)
        for j, c in enumerate(combos):
            ax_dot.scatter([j] * n, range(n), s=34, color="#D0D0D0", zorder=1)
            ax_dot.scatter([j] * len(c), c, s=34, color=INK, zorder=3)
            if len(c) > 1:
                ax_dot.plot([j, j], [min(c), max(c)], color=INK, linewidth=1.6, zorder=2)
        ax_dot.set_yticks(range(n), names)
        ax_dot.set_ylim(n - 0.5, -0.5)
        ax_dot.set_xlim(-0.6, nc - 0.4)
        ax_dot.tick_params(bottom=False, labelbottom=False, left=False)
        ax_dot.spines[:].set_visible(False)
        ax_dot.set_label("upset-matrix")
        if show_pairs:
            _pair_matrix(fig, fig.add_subplot(gs[:, 1]), pair_rows, members, names)
        fig.suptitle(f"Top-{k} heads shared across {whole['axis']} ({n} sets)\n"
                     f"{wrap_items(_context(whole, names).split(' · '), 90)}", ha="left", x=0.01)
    what = ("Bars: heads in exactly the sets marked below (a head counts once, in its own combination)"
            + ("; pair matrix: shared heads and p-value of each pair" if show_pairs else "") + ".")
    return set_caption(fig, _CAPTION.format(k=k, n=int(whole["n_heads"]), what=what), ["overlap", "rankings"])


def _pair_matrix(fig: Figure, ax: Any, pair_rows: pd.DataFrame, members: list[str], names: Sequence[str]) -> None:
    """Lower triangle of pairs: row j > column i; the empty first row and last column are left out."""
    n = len(members)
    m = np.full((n - 1, n - 1), np.nan)
    texts = {}
    for _, r in pair_rows.iterrows():
        i, j = sorted(members.index(x) for x in r["members"])
        m[j - 1, i] = -math.log10(max(float(r["p_value"]), 1e-300))
        texts[(j - 1, i)] = f"{int(r['shared'])}\n{fmt_p(r['p_value']).replace('p = ', '')}"
    cmap = mpl.colormaps[SCORE_CMAP].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=max(2.0, float(np.nanmax(m))))
    if n <= 8:
        for (j, i), t in texts.items():
            ax.text(i, j, t, ha="center", va="center", fontsize=6.5,
                    color="black" if im.norm(m[j, i]) > 0.6 else "white")
    ax.set_xticks(range(n - 1), names[:-1], rotation=90)
    ax.set_yticks(range(n - 1), names[1:])
    ax.spines[:].set_visible(False)
    ax.tick_params(length=0)
    ax.set_title("pairs: shared heads, p")
    ax.set_label("pair-matrix")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, shrink=0.8)
    cb.set_label("−log10 p (pair)")
    cb.outline.set_visible(False)


def overlap_figure(overlap: Table, rankings: Table | None = None) -> Figure:
    """A Venn diagram (2-3 sets) or an UpSet chart (more) of one comparison of the `overlap` table."""
    _, whole = _unit(overlap)
    if int(whole["n_sets"]) <= 3:
        return overlap_venn(overlap, rankings)
    if rankings is None:
        raise ValueError(f"{int(whole['n_sets'])} sets: an UpSet chart needs the rankings table for the sets")
    return overlap_upset(overlap, rankings)
