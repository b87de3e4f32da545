"""Analysis over the result tables only (rankings, overlap, specificity, ASR curves, figures, report).

Never imports torch: everything here reads Arrow tables and writes derived tables declared in
`study.runtime.schema`, so the report and a user's notebook read the same numbers.

This module holds the few helpers the analysis modules share: moving between Arrow tables and pandas frames
without losing nulls, and a stable ranking within groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from study import __version__ as CODE_VERSION
from study.runtime.schema import make_table, schema_for

__all__ = ["CODE_VERSION", "NO_VALUE", "frame", "is_missing", "rank_within", "restore_missing", "to_table"]

NO_VALUE = ""  # stands for a null key (model_revision, variant) while grouping: pandas drops or mangles NaN keys


def frame(data: pa.Table | pd.DataFrame, name: str) -> pd.DataFrame:
    """A pandas copy of table `name`, checking it has the declared columns (a user may pass a hand-made frame).
    Repeated strings held as dictionaries (a run's tables in memory) or categoricals come back as plain values.

    ValueError naming the missing columns otherwise.
    """
    df = data.to_pandas() if isinstance(data, pa.Table) else data.copy()
    for col in df.columns:
        if isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = df[col].astype(df[col].cat.categories.dtype)
    missing = [c for c in schema_for(name).names if c not in df.columns]
    if missing:
        raise ValueError(f"input table {name!r} lacks columns {missing}: expected the columns of "
                         f"study.runtime.schema.TABLES[{name!r}]")
    if "model_revision" in df.columns:
        df["model_revision"] = df["model_revision"].astype(object).where(df["model_revision"].notna(), NO_VALUE)
    return df


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (what a null becomes in a frame)."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def restore_missing(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Turn the grouping stand-in NO_VALUE back into nulls in `columns`."""
    for c in columns:
        df[c] = df[c].astype(object).where(df[c] != NO_VALUE, None)
    return df


def rank_within(df: pd.DataFrame, by: Sequence[str], score: str) -> pd.Series:
    """1-based rank of `score` within groups `by`, 1 = largest; ties broken by (layer, head) so ranks are a
    permutation and reproducible across runs."""
    order = df.assign(_neg=-df[score]).sort_values([*by, "_neg", "layer", "head"], kind="stable")
    ranks = order.groupby(list(by), sort=False, dropna=False).cumcount() + 1
    return ranks.reindex(df.index)


def _column(values: pd.Series, field: pa.Field) -> Any:
    if pa.types.is_list(field.type):
        return [None if not hasattr(v, "__len__") and is_missing(v) else list(v) for v in values]
    if values.dtype == object:
        return [None if is_missing(v) else v for v in values]
    return pa.array(values, from_pandas=True)  # NaN -> null: a non-nullable column then fails loudly


def to_table(name: str, df: pd.DataFrame) -> pa.Table:
    """Derived table `name` from a frame holding (at least) its declared columns, validated by make_table, in
    the declared schema (a few rows per model: nothing to compact)."""
    schema = schema_for(name)
    if df.empty:
        return schema.empty_table()
    return make_table(name, {f.name: _column(df[f.name], f) for f in schema}, compact=False)
