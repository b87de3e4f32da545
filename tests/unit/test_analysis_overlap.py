"""Overlap of top-k head sets: the exact null model (against scipy and exhaustive enumeration) and the table."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import pytest
from scipy.stats import hypergeom

from analysis.overlap import (
    expected_shared,
    intersection_distribution,
    overlap_pvalue,
    overlap_table,
    top_heads,
)
from study.runtime.schema import OVERLAP, make_table


def _ranking(model: str, top: list[str], *, dataset: str = "harm", op: str = "undiff_q", eps: float = 1e-5,
             layers: int = 2, heads: int = 4, run_id: str = "r1") -> list[dict[str, Any]]:
    """Rankings rows of every head of a layers x heads model: `top` first (in that order), then the rest."""
    labels = [f"L{la}H{h}" for la in range(layers) for h in range(heads)]
    order = top + [x for x in labels if x not in top]
    rows = []
    for rank, label in enumerate(order, start=1):
        la, h = (int(x) for x in label[1:].split("H"))
        rows.append(dict(run_id=run_id, model=model, model_revision=None, dataset=dataset, prompt_format="paper",
                         code_version="0", source="ships", subspace=None, rank_r=None, centered=None, layer=la,
                         head=h, head_label=label, op=op, eps=eps, n_heads=len(labels), n_prompts=3,
                         score=1.0 / rank, topk_frac=0.0, k=3, rank=rank, specificity=None))
    return rows


def _exhaustive(n: int, k: int, sets: int) -> list[float]:
    """P(|intersection| = j) by enumerating every tuple of k-subsets of range(n)."""
    subsets = [frozenset(c) for c in itertools.combinations(range(n), k)]
    counts = Counter(len(frozenset.intersection(*t)) for t in itertools.product(subsets, repeat=sets))
    total = len(subsets) ** sets
    return [counts.get(j, 0) / total for j in range(k + 1)]


# ---------------------------------------------------------------- null model


@pytest.mark.parametrize("n,k", [(8, 3), (50, 5), (1024, 10), (30, 30)])
def test_pair_pvalue_is_the_hypergeometric_tail(n: int, k: int) -> None:
    for shared in range(k + 1):
        want = hypergeom.sf(shared - 1, n, k, k)
        assert overlap_pvalue(n, k, 2, shared) == pytest.approx(want, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("n,k,sets", [(7, 3, 3), (6, 2, 4), (5, 4, 3)])
def test_many_sets_distribution_matches_exhaustive_enumeration(n: int, k: int, sets: int) -> None:
    want = _exhaustive(n, k, sets)
    got = intersection_distribution(n, k, sets)
    assert got == pytest.approx(want, abs=1e-12)
    for shared in range(k + 2):
        assert overlap_pvalue(n, k, sets, shared) == pytest.approx(sum(want[shared:]), abs=1e-12)


def test_expected_overlap_of_two_random_top10_of_1024() -> None:
    assert expected_shared(1024, 10, 2) == pytest.approx(0.09765625)  # 100 / 1024
    dist = intersection_distribution(1024, 10, 2)
    assert sum(j * p for j, p in enumerate(dist)) == pytest.approx(0.09765625, rel=1e-9)
    assert sum(dist) == pytest.approx(1.0)
    assert expected_shared(7, 3, 3) == pytest.approx(sum(j * p for j, p in enumerate(_exhaustive(7, 3, 3))))


def test_identical_top10_of_1024_is_very_unlikely() -> None:
    p = overlap_pvalue(1024, 10, 2, 10)
    assert p == pytest.approx(1 / math.comb(1024, 10), rel=1e-9)
    assert p < 1e-20
    assert overlap_pvalue(1024, 10, 2, 0) == pytest.approx(1.0)
    top = [f"L{i}H{i}" for i in range(10)]
    rows = _ranking("a", top, layers=32, heads=32) + _ranking("b", list(reversed(top)), layers=32, heads=32)
    t = overlap_table(make_table("rankings", rows), k=10).to_pylist()
    assert len(t) == 1
    assert (t[0]["shared"], t[0]["n_heads"], t[0]["jaccard"]) == (10, 1024, 1.0)
    assert t[0]["p_value"] < 1e-20
    assert t[0]["expected_shared"] == pytest.approx(0.09765625)


def test_null_model_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        intersection_distribution(5, 6, 2)
    with pytest.raises(ValueError, match="sets"):
        intersection_distribution(5, 2, 0)


# ---------------------------------------------------------------- table


def _three_models() -> list[dict[str, Any]]:
    return (_ranking("m1", ["L0H0", "L0H1", "L1H2"]) + _ranking("m2", ["L1H2", "L0H0", "L1H3"])
            + _ranking("m3", ["L1H2", "L0H3", "L1H0"]))


def test_models_axis_pairs_and_all_way_row() -> None:
    t = overlap_table(make_table("rankings", _three_models()), k=3)
    assert t.schema.equals(OVERLAP)
    rows = {tuple(r["models"]): r for r in t.to_pylist()}
    assert set(rows) == {("m1", "m2"), ("m1", "m3"), ("m2", "m3"), ("m1", "m2", "m3")}
    assert {r["axis"] for r in rows.values()} == {"models"}
    r12 = rows[("m1", "m2")]
    assert r12["members"] == ["m1|harm|undiff_q|paper", "m2|harm|undiff_q|paper"]
    assert (r12["shared"], r12["shared_heads"], r12["union_size"], r12["jaccard"]) == (2, ["L0H0", "L1H2"], 4, 0.5)
    assert r12["p_value"] == pytest.approx(hypergeom.sf(1, 8, 3, 3))
    assert r12["expected_shared"] == pytest.approx(8 * (3 / 8) ** 2)
    assert rows[("m1", "m3")]["shared_heads"] == ["L1H2"] and rows[("m1", "m3")]["union_size"] == 5
    all3 = rows[("m1", "m2", "m3")]
    assert (all3["n_sets"], all3["shared"], all3["union_size"]) == (3, 1, 6)
    assert all3["jaccard"] == pytest.approx(1 / 6)
    assert all3["expected_shared"] == pytest.approx(8 * (3 / 8) ** 3)
    want = sum(_exhaustive(8, 3, 3)[1:])
    assert all3["p_value"] == pytest.approx(want, abs=1e-12)
    assert all3["datasets"] == ["harm"] * 3 and all3["ops"] == ["undiff_q"] * 3 and all3["k"] == 3
    assert all3["variant"] is None and all3["source"] == "ships" and all3["run_id"] == "r1"


def test_shared_heads_sorted_by_layer_then_head() -> None:
    top = ["L10H0", "L2H0", "L1H0"]
    rows = _ranking("a", top, layers=12, heads=1) + _ranking("b", list(reversed(top)), layers=12, heads=1)
    (r,) = overlap_table(make_table("rankings", rows), k=3).to_pylist()
    assert r["shared_heads"] == ["L1H0", "L2H0", "L10H0"]  # not string order (L10 < L2)


def test_datasets_and_ops_axes() -> None:
    rows = (_ranking("m1", ["L0H0", "L0H1"], dataset="harm") + _ranking("m1", ["L0H0", "L1H1"], dataset="jbb")
            + _ranking("m1", ["L1H3", "L1H2"], op="scale_v", eps=0.0)
            + _ranking("m1", ["L0H1", "L1H2"], op="undiff_q", eps=1e-10))
    t = overlap_table(make_table("rankings", rows), k=2, run_id="derived").to_pylist()
    by_axis = {a: [r for r in t if r["axis"] == a] for a in ("models", "datasets", "ops")}
    assert by_axis["models"] == []
    (d,) = by_axis["datasets"]  # harm vs jbb (same op and eps)
    assert d["datasets"] == ["harm", "jbb"] and d["shared_heads"] == ["L0H0"] and d["run_id"] == "derived"
    ops = by_axis["ops"]  # on harm: scale_v@0, undiff_q@1e-10, undiff_q@1e-5: 3 pairs + 1 all-way
    assert len(ops) == 4
    all3 = next(r for r in ops if r["n_sets"] == 3)
    assert sorted(all3["members"]) == ["m1|harm|scale_v@0|paper", "m1|harm|undiff_q@1e-05|paper",
                                       "m1|harm|undiff_q@1e-10|paper"]
    assert all3["shared"] == 0 and all3["union_size"] == 4  # L0H0 L0H1 L1H2 L1H3
    pair = next(r for r in ops if sorted(r["eps"]) == [1e-10, 1e-5])
    assert pair["shared_heads"] == ["L0H1"]
    only = overlap_table(make_table("rankings", rows), k=2, axes=["datasets"]).to_pylist()
    assert [r["axis"] for r in only] == ["datasets"]


def test_different_architectures_raise_or_split() -> None:
    rows = _three_models() + _ranking("big", ["L0H0"], layers=3, heads=4)
    with pytest.raises(ValueError, match=r"big \(12 heads\).*m1 \(8 heads\)|m1 \(8 heads\).*big \(12 heads\)"):
        overlap_table(make_table("rankings", rows), k=3)
    t = overlap_table(make_table("rankings", rows), k=3, mismatch="split").to_pylist()
    assert all("big" not in r["models"] for r in t) and len(t) == 4


def test_top_heads_and_bad_input() -> None:
    table = make_table("rankings", _three_models() + _ranking("m1", ["L1H1"], op="scale_v"))
    assert top_heads(table, {"model": "m2", "dataset": "harm", "op": "undiff_q"}, 3) == ["L1H2", "L0H0", "L1H3"]
    assert top_heads(table, {"model": "m3", "op": "undiff_q"}, 2) == ["L1H2", "L0H3"]
    assert len(top_heads(table, {"model": "m3", "op": "undiff_q"}, 100)) == 8
    with pytest.raises(ValueError, match="'op'"):
        top_heads(table, {"model": "m1"}, 3)
    with pytest.raises(ValueError, match="no ranking"):
        top_heads(table, {"model": "m9"}, 3)
    with pytest.raises(ValueError, match="unknown condition keys"):
        top_heads(table, {"modle": "m1"}, 3)
    with pytest.raises(ValueError, match="bad k"):
        overlap_table(table, k=0)
    with pytest.raises(ValueError, match="valid axes are models, datasets, ops"):
        overlap_table(table, axes=["layers"])
    with pytest.raises(ValueError, match="lacks columns"):
        overlap_table(table.drop_columns(["rank"]).to_pandas())
    assert overlap_table(make_table("rankings", []), k=3).num_rows == 0
