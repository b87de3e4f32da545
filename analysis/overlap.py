"""Overlap of top-k head sets across conditions, against a null model: the `overlap` table.

A condition is one ranking: (model, dataset, operator, ε, prompt format, source[, head_scores variant]).
Three comparisons, each over every group of conditions that differ only along one axis:
- `models`: the same dataset, operator and format across models (paper Fig. 5b);
- `datasets`: one model's datasets (Fig. 5a);
- `ops`: one model and dataset across operators (with their ε).
Each group yields every pair and, with more than two conditions, one all-way row. Heads are compared by label,
so the models compared must share an architecture (checked through the number of heads ranked, N).

Null model: n independent uniform random k-subsets of N heads. A head is in all of them with probability
(k/N)^n, so the expected intersection is N (k/N)^n (about 0.098 for two top-10 sets of 1024 heads). The
p-value P(|A1 ∩ … ∩ An| >= observed) is exact: given |A1 ∩ … ∩ Ai| = j, the next set's intersection with it
is Hypergeometric(N, j, k), so the intersection size is a short Markov chain (for n = 2, the hypergeometric
upper tail).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import pyarrow as pa

from analysis import CODE_VERSION, NO_VALUE, frame, to_table
from analysis.rankings import check_k, variant_label

__all__ = ["AXES", "Condition", "expected_shared", "intersection_distribution", "overlap_pvalue", "overlap_rows",
           "overlap_table", "top_heads"]

log = logging.getLogger(__name__)

AXES = ("models", "datasets", "ops")
_KEY = ["model", "model_revision", "dataset", "op", "eps", "prompt_format", "source", "variant"]
_VARIES: dict[str, tuple[str, ...]] = {"models": ("model", "model_revision"), "datasets": ("dataset",),
                                       "ops": ("op", "eps")}


def intersection_distribution(n: int, k: int, sets: int) -> list[float]:
    """P(|A1 ∩ … ∩ A_sets| = j) for j = 0..k, the A_i independent uniform k-subsets of n items.

    Each transition probability C(j, j') C(n - j, k - j') / C(n, k) is computed in exact integers and
    rounded once; the chain then only adds and multiplies positive numbers, so small tails stay accurate.
    """
    if not (isinstance(n, int) and isinstance(k, int) and isinstance(sets, int)) or not 1 <= k <= n or sets < 1:
        raise ValueError(f"bad null model n={n!r}, k={k!r}, sets={sets!r}: expected integers 1 <= k <= n, sets >= 1")
    total = math.comb(n, k)
    dist = [0.0] * (k + 1)
    dist[k] = 1.0  # the first set is its own intersection
    for _ in range(sets - 1):
        nxt = [0.0] * (k + 1)
        for j, pj in enumerate(dist):
            if pj == 0.0:
                continue
            for jj in range(max(0, j + k - n), min(j, k) + 1):
                nxt[jj] += pj * (math.comb(j, jj) * math.comb(n - j, k - jj) / total)
        dist = nxt
    return dist


def overlap_pvalue(n: int, k: int, sets: int, shared: int) -> float:
    """Exact P(intersection >= shared) for `sets` independent uniform k-subsets of n heads."""
    dist = intersection_distribution(n, k, sets)
    return min(1.0, math.fsum(dist[max(shared, 0):]))


def expected_shared(n: int, k: int, sets: int) -> float:
    """Expected intersection of `sets` independent uniform k-subsets of n heads: n (k/n)^sets."""
    return n * (k / n) ** sets


@dataclass(frozen=True)
class Condition:
    """One ranking of the `rankings` table. `model_revision`/`variant` use analysis.NO_VALUE for none."""

    model: str
    model_revision: str
    dataset: str
    op: str
    eps: float
    prompt_format: str
    source: str
    variant: str

    def label(self, with_eps: bool = False) -> str:
        model = self.model if self.model_revision == NO_VALUE else f"{self.model}@{self.model_revision}"
        op = f"{self.op}@{self.eps:g}" if with_eps else self.op
        return f"{model}|{self.dataset}|{op}|{self.prompt_format}"


def _frame(rankings: pa.Table | pd.DataFrame) -> pd.DataFrame:
    df = frame(rankings, "rankings")
    variants = [variant_label(s, r, c) for s, r, c in zip(df["subspace"], df["rank_r"], df["centered"])]
    df["variant"] = [NO_VALUE if v is None else v for v in variants]
    return df


def _select(df: pd.DataFrame, condition: Condition | Mapping[str, Any]) -> pd.DataFrame:
    given = condition.__dict__ if isinstance(condition, Condition) else dict(condition)
    unknown = sorted(set(given) - set(_KEY))
    if unknown:
        raise ValueError(f"unknown condition keys {unknown}: valid keys are {', '.join(_KEY)}")
    mask = pd.Series(True, index=df.index)
    for key, value in given.items():
        mask &= df[key] == (NO_VALUE if value is None and key in ("model_revision", "variant") else value)
    return df[mask]


def top_heads(rankings: pa.Table | pd.DataFrame, condition: Condition | Mapping[str, Any], k: int = 10) -> list[str]:
    """Labels of the top-k heads (by rank, best first) of the one ranking `condition` selects.

    `condition` is a Condition or a mapping of some of its fields (model, dataset, op, ...). ValueError
    when it matches no ranking or several (naming the key that tells them apart).
    """
    k = check_k(k)
    rows = _select(_frame(rankings), condition)
    if rows.empty:
        given = condition.__dict__ if isinstance(condition, Condition) else dict(condition)
        raise ValueError(f"no ranking matches {given}: see the rankings table's model, dataset, op, ... columns")
    for key in _KEY:
        if rows[key].nunique() > 1:
            raise ValueError(f"condition matches several rankings: add {key!r} (one of "
                             f"{sorted(map(str, rows[key].unique()))})")
    return rows.sort_values("rank", kind="stable")["head_label"].head(k).tolist()


def _conditions(df: pd.DataFrame) -> dict[Condition, pd.DataFrame]:
    out = {}
    for key, g in df.groupby(_KEY, sort=True, dropna=False):
        out[Condition(*key)] = g.sort_values("rank", kind="stable").drop_duplicates("head_label")
    return out


def _row(axis: str, members: Sequence[Condition], sets: Sequence[frozenset[str]], order: Mapping[str, tuple[int, int]],
         n: int, k: int, run_id: str) -> dict[str, Any]:
    with_eps = len({c.label() for c in members}) < len(members)
    shared = frozenset.intersection(*sets)
    union = frozenset.union(*sets)
    first = members[0]
    return dict(run_id=run_id, code_version=CODE_VERSION, source=first.source,
                variant=None if first.variant == NO_VALUE else first.variant, axis=axis,
                prompt_format=first.prompt_format, k=k, n_heads=n, n_sets=len(members),
                members=[c.label(with_eps) for c in members], models=[c.model for c in members],
                datasets=[c.dataset for c in members], ops=[c.op for c in members], eps=[c.eps for c in members],
                shared=len(shared), shared_heads=sorted(shared, key=order.__getitem__), union_size=len(union),
                jaccard=len(shared) / len(union), expected_shared=expected_shared(n, k, len(members)),
                p_value=overlap_pvalue(n, k, len(members), len(shared)))


def _groups(conds: Sequence[Condition], axis: str) -> dict[tuple[Any, ...], list[Condition]]:
    fixed = [f for f in _KEY if f not in _VARIES[axis]]
    out: dict[tuple[Any, ...], list[Condition]] = {}
    for c in conds:
        out.setdefault(tuple(getattr(c, f) for f in fixed), []).append(c)
    return {key: g for key, g in out.items() if len(g) > 1}


def overlap_rows(rankings: pa.Table | pd.DataFrame, k: int = 10, axes: Sequence[str] = AXES,
                 mismatch: Literal["raise", "split"] = "raise", run_id: str | None = None) -> list[dict[str, Any]]:
    """The `overlap` rows as dicts (see overlap_table)."""
    k = check_k(k)
    bad = [a for a in axes if a not in AXES]
    if isinstance(axes, str) or bad:
        raise ValueError(f"bad overlap axes {axes!r}: valid axes are {', '.join(AXES)}")
    if mismatch not in ("raise", "split"):
        raise ValueError(f"bad mismatch {mismatch!r}: expected 'raise' or 'split'")
    df = _frame(rankings)
    if df.empty:
        return []
    order = {lab: (int(lay), int(h)) for lab, lay, h in zip(df["head_label"], df["layer"], df["head"])}
    ranked = _conditions(df)
    rows: list[dict[str, Any]] = []
    for axis in axes:
        for group in _groups(list(ranked), axis).values():
            by_n: dict[int, list[Condition]] = {}
            for c in group:
                by_n.setdefault(len(ranked[c]), []).append(c)
            if len(by_n) > 1:
                what = "; ".join(f"{c.model} ({len(ranked[c])} heads)" for c in group)
                if mismatch == "raise":
                    raise ValueError(f"cannot compare top-k heads across different architectures: {what}; "
                                     "compare models with the same number of heads")
                log.info("overlap over %s: different head counts, compared within each: %s", axis, what)
            for n, members in sorted(by_n.items()):
                kk = min(k, n)
                sets = [frozenset(ranked[c]["head_label"].head(kk)) for c in members]
                rid = run_id if run_id is not None else max(str(ranked[c]["run_id"].max()) for c in members)
                combos = list(itertools.combinations(range(len(members)), 2))
                if len(members) > 2:
                    combos.append(tuple(range(len(members))))
                for idx in combos:
                    rows.append(_row(axis, [members[i] for i in idx], [sets[i] for i in idx], order, n, kk, rid))
    return rows


def overlap_table(rankings: pa.Table | pd.DataFrame, k: int = 10, axes: Sequence[str] = AXES, *,
                  mismatch: Literal["raise", "split"] = "raise", run_id: str | None = None) -> pa.Table:
    """Table `overlap` from a `rankings` table: every pair (and all-way group) of conditions along each axis.

    mismatch "raise": ValueError naming the models when one comparison mixes different head counts;
    "split": compare within each head count instead (what `derive` does for a run with several
    architectures). run_id None uses the latest input run id of the members.
    """
    return to_table("overlap", pd.DataFrame(overlap_rows(rankings, k, axes, mismatch, run_id)))
