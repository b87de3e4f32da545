"""Ranking scores within a group (1 = largest), in numpy: tables are built without torch, so a Ray driver
that only plans shards and assembles their batches never imports it."""

from __future__ import annotations

import numpy as np


def rank_desc(values: np.ndarray) -> np.ndarray:
    """1-based rank along the last axis, 1 = largest; ties keep index order (stable), so ranks are a
    permutation and reproducible. NaN ranks last. int64, same shape as `values`."""
    values = np.asarray(values)
    key = values.astype(np.float64)
    key = np.where(np.isnan(key), -np.inf, key)  # (..., m)
    # a stable ascending sort of the negated key keeps equal values in index order
    order = np.argsort(-key, axis=-1, kind="stable")  # (..., m)
    ranks = np.empty_like(order, dtype=np.int64)  # (..., m)
    np.put_along_axis(ranks, order, np.arange(1, values.shape[-1] + 1, dtype=np.int64) * np.ones_like(order),
                      axis=-1)
    return ranks


def top_union(values: np.ndarray, k: int) -> np.ndarray:
    """(rows, m) scores -> sorted column indices in any row's top `k` (1 = largest, as `rank_desc`)."""
    ranks = rank_desc(values)  # (rows, m)
    return np.flatnonzero((ranks <= k).any(axis=0))
