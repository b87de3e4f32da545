"""One figure style for every headstudy figure: palette, fonts, sizes, and the small text helpers they share.

- Colour: the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies and in greyscale
  by lightness) for categories; viridis for heatmaps (perceptually uniform, prints in greyscale), cividis for
  a continuous score on points.
- Print and screen: 9 pt text at 150 dpi, thin spines only on the left and bottom, light grid only where a
  value is read off an axis, no frames around legends, SVG text kept as text.
- Figures are built with `matplotlib.figure.Figure` (never pyplot), so nothing global is left open and any
  backend (Agg in tests, none at all in a report) works.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

__all__ = [
    "BAND",
    "CONDITION_COLORS",
    "DPI",
    "HEATMAP_CMAP",
    "INK",
    "MUTED",
    "OKABE_ITO",
    "RC",
    "RECIPE_COLORS",
    "SCORE_CMAP",
    "color",
    "context",
    "fmt_eps",
    "fmt_p",
    "model_labels",
    "new_figure",
    "short_model",
    "slug",
    "wrap_items",
]

# Okabe & Ito (2008), "Color Universal Design"; ordered so the first colours are the most distinct on white.
OKABE_ITO: dict[str, str] = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
_CYCLE = ["blue", "vermillion", "green", "orange", "purple", "sky", "black"]  # yellow is too light for lines
INK = "#222222"  # text, the normal model's level
MUTED = "#7F7F7F"  # controls, reference lines, absent cells
BAND = "#BBBBBB"  # the random-control band
HEATMAP_CMAP = "viridis"
SCORE_CMAP = "cividis"
DPI = 150

CONDITION_COLORS: dict[str, str] = {
    "sahara": OKABE_ITO["blue"],
    "heads": OKABE_ITO["vermillion"],
    "query": OKABE_ITO["green"],
    "planted": OKABE_ITO["purple"],
    "joint": OKABE_ITO["orange"],
    "ships": OKABE_ITO["sky"],
}
RECIPE_COLORS: dict[str, str] = {
    "aligned": OKABE_ITO["blue"],
    "base": OKABE_ITO["vermillion"],
    "attn-from-base": OKABE_ITO["orange"],
    "mlp-from-base": OKABE_ITO["green"],
    "heads-from-base": OKABE_ITO["purple"],
    "heads-into-base": OKABE_ITO["sky"],
}

RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "axes.edgecolor": INK,
    "axes.labelcolor": INK,
    "text.color": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "axes.titlelocation": "left",
    "axes.prop_cycle": mpl.cycler(color=[OKABE_ITO[c] for c in _CYCLE]),
    "grid.color": "#E5E5E5",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "errorbar.capsize": 2.5,
    "image.cmap": HEATMAP_CMAP,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.facecolor": "white",
    "svg.fonttype": "none",  # text stays text in SVG: searchable and editable
    "figure.facecolor": "white",
    "figure.constrained_layout.use": True,
}


def color(i: int) -> str:
    """The i-th colour of the line cycle (wraps)."""
    return OKABE_ITO[_CYCLE[i % len(_CYCLE)]]


@contextlib.contextmanager
def context() -> Iterator[None]:
    """The figure style, applied only inside the block (a user's own rcParams are left as they were)."""
    with mpl.rc_context(RC):
        yield


def new_figure(width: float, height: float, *, max_width: float = 16.0, max_height: float = 22.0) -> Figure:
    """A white, constrained-layout figure of at most max_width x max_height inches (call inside `context`)."""
    return Figure(figsize=(min(max(width, 2.0), max_width), min(max(height, 1.6), max_height)),
                  layout="constrained", dpi=DPI)


def short_model(model: str) -> str:
    """A short display name: a local path's last folder, a hub id's name (`org/name` -> `name`)."""
    text = str(model).rstrip("/\\")
    return re.split(r"[/\\]", text)[-1] or text


def model_labels(models: Iterable[str]) -> dict[str, str]:
    """Short, unique display names for `models`: the last path component, more components where two share it,
    the full name as a last resort."""
    names = list(dict.fromkeys(str(m) for m in models))
    out: dict[str, str] = {}
    for depth in range(1, 6):
        for m in names:
            if m in out:
                continue
            parts = [p for p in re.split(r"[/\\]", m.rstrip("/\\")) if p]
            label = "/".join(parts[-depth:]) if parts else m
            clash = [o for o in names if o != m and o not in out
                     and "/".join([p for p in re.split(r"[/\\]", o.rstrip("/\\")) if p][-depth:]) == label]
            if not clash and label not in out.values():
                out[m] = label
    for m in names:
        out.setdefault(m, m)
    return out


def slug(*parts: object, max_len: int = 120) -> str:
    """A file-name-safe name from `parts` joined by '-' (letters, digits, '.', '_', '-')."""
    text = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    text = re.sub(r"_+", "_", text)
    return (text[:max_len].rstrip("._-") or "figure")


def fmt_p(p: float | None) -> str:
    """A p-value for a label: `p = 0.032`, `p = 3.2e-05`, `p < 1e-300`; `p n/a` when missing."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p n/a"
    if p <= 0:
        return "p < 1e-300"
    if p >= 0.001:
        return f"p = {p:.3f}".rstrip("0").rstrip(".") if p < 1 else "p = 1"
    return f"p = {p:.1e}"


def fmt_eps(eps: object) -> str:
    try:
        return f"{float(eps):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(eps)


def wrap_items(items: Sequence[str], width: int = 60, sep: str = " · ") -> str:
    """`items` joined by `sep`, broken into lines of about `width` characters."""
    lines: list[str] = []
    line = ""
    for it in items:
        cand = it if not line else line + sep + it
        if line and len(cand) > width:
            lines.append(line)
            line = it
        else:
            line = cand
    if line:
        lines.append(line)
    return "\n".join(lines)

