"""Helpers the figure modules share: input frames, splitting a table into one figure's worth, captions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis import NO_VALUE, frame, is_missing
from analysis.rankings import head_score_rankings, ships_rankings
from analysis.style import fmt_eps

CONDITION = ["model", "model_revision", "dataset", "prompt_format", "op", "eps"]
MAX_PANELS = 6  # models per small-multiples figure; more models give more figures
TARGETED = ("sahara", "joint", "ships", "heads", "planted", "query")  # drawn in this order
TARGETED_NAMES = {"sahara": "Sahara group", "joint": "joint-search group", "ships": "top heads by mean Ships",
                  "heads": "given heads", "planted": "planted heads (known answer)", "query": "each prompt's top heads"}

Table = pa.Table | pd.DataFrame


def as_frame(data: Table, name: str) -> pd.DataFrame:
    """A pandas copy of table `name` with its declared columns checked (model_revision null -> NO_VALUE)."""
    return frame(data, name)


def ranking_source(data: Table) -> str:
    """Which of rankings, ships or head_scores `data` is (told apart by their columns)."""
    cols = set(data.schema.names if isinstance(data, pa.Table) else data.columns)
    for name, col in (("rankings", "source"), ("ships", "kl"), ("head_scores", "angle_deg")):
        if col in cols:
            return name
    raise ValueError("expected a rankings, ships or head_scores table (no `source`, `kl` or `angle_deg` column)")


def as_rankings(data: Table, k: int = 10) -> pd.DataFrame:
    """A `rankings` frame from a rankings, ships or head_scores table."""
    name = ranking_source(data)
    if name == "rankings":
        return as_frame(data, "rankings")
    return ships_rankings(data, k) if name == "ships" else head_score_rankings(data, k)


def groups(df: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[tuple[Any, ...], pd.DataFrame]]:
    """(key, rows) per distinct value of `keys`, in sorted order, keeping null keys."""
    if df.empty:
        return
    for key, g in df.groupby(list(keys), sort=True, dropna=False):
        yield (key if isinstance(key, tuple) else (key,)), g


def chunks(items: Sequence[Any], size: int = MAX_PANELS) -> list[list[Any]]:
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def one(df: pd.DataFrame, column: str, what: str) -> Any:
    """The single value of `column` in `df`; ValueError naming the values when there are several."""
    values = list(dict.fromkeys(df[column].tolist()))
    if len(values) != 1:
        raise ValueError(f"{what}: expected one {column}, got {values}: split the table first "
                         f"(analysis.figures.*_units)")
    return values[0]


def revision(value: Any) -> str:
    return "" if is_missing(value) or value == NO_VALUE else f"@{value}"


def op_text(op: Any, eps: Any) -> str:
    return f"{op} ε={fmt_eps(eps)}"


def set_caption(fig: Figure, caption: str, tables: Sequence[str]) -> Figure:
    """Attach the caption and the tables a figure was drawn from (read back by make_figures)."""
    fig.headstudy = {"caption": caption, "tables": tuple(tables)}  # type: ignore[attr-defined]
    return fig


def caption_of(fig: Figure) -> str:
    return getattr(fig, "headstudy", {}).get("caption", "")


def tables_of(fig: Figure) -> tuple[str, ...]:
    return tuple(getattr(fig, "headstudy", {}).get("tables", ()))


def title_of(fig: Figure) -> str:
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""
    return " ".join(sup.split())


def int_ticks(ax: Axes, values: Sequence[int]) -> None:
    """Integer x ticks at `values` (all of them when few, else matplotlib's integer locator)."""
    vals = sorted({int(v) for v in values})
    if len(vals) <= 12:
        ax.set_xticks(vals)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if vals:
        ax.set_xlim(min(vals) - 0.5, max(vals) + 0.5)


def numeric(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
