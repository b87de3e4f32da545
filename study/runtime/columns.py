"""Table columns built as Arrow arrays, never as one Python object per row: a value repeated down a table, and
strings chosen per row from a few (a prompt per row of a prompts x heads table) as dictionary arrays.

What `study.runtime.schema.make_table` takes for a table's compact form, so a sweep's tables cost an index per
row for their strings rather than a copy of the text. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["constant", "pick"]


def constant(value: str | None, n: int) -> pa.DictionaryArray:
    """`value` on each of n rows (None: n nulls), as one dictionary entry and n zero indices."""
    if value is None:
        return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string()))
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def pick(values: Sequence[str], index: np.ndarray) -> pa.DictionaryArray:
    """Row i holds values[index[i]]; `values` may repeat (each distinct string is stored once)."""
    distinct: dict[str, int] = {}
    remap = np.fromiter((distinct.setdefault(v, len(distinct)) for v in values), np.int32, len(values))
    return pa.DictionaryArray.from_arrays(pa.array(remap[np.asarray(index, np.int64)]),  # (rows,) int32
                                          pa.array(list(distinct), pa.string()))
