"""Head rankings from Ships (mean KL, top-k frequency) and generalized Ships, with specificity filled in."""

from __future__ import annotations

from typing import Any

import pytest

from analysis.rankings import rankings_table
from analysis.specificity import specificity_table
from study.runtime.schema import RANKINGS, make_table
from tests.analysis_rows import HARM, HEADS, ships_rows


def _by(table, **match) -> dict[str, dict[str, Any]]:
    return {r["head_label"]: r for r in table.to_pylist() if all(r[k] == v for k, v in match.items())}


def test_ships_mean_kl_rank_and_topk_frequency() -> None:
    t = rankings_table(make_table("ships", ships_rows(HARM)), k=2)
    assert t.schema.equals(RANKINGS)
    r = _by(t)
    assert {h: r[h]["score"] for h in HEADS} == {"L0H0": 0.5, "L0H1": 0.4375, "L1H0": 0.5625, "L1H1": 0.3125}
    assert {h: r[h]["rank"] for h in HEADS} == {"L1H0": 1, "L0H0": 2, "L0H1": 3, "L1H1": 4}
    # per-prompt ranks: p1 L0H0 1, L1H0 2, L1H1 3, L0H1 4; p2 L0H1 1, L1H0 2, L1H1 3, L0H0 4
    assert {h: r[h]["topk_frac"] for h in HEADS} == {"L0H0": 0.5, "L0H1": 0.5, "L1H0": 1.0, "L1H1": 0.0}
    row = r["L1H0"]
    assert (row["k"], row["n_heads"], row["n_prompts"], row["source"]) == (2, 4, 2, "ships")
    assert row["specificity"] is None and row["subspace"] is None and row["rank_r"] is None
    assert row["model_revision"] is None and row["run_id"] == "r1"
    assert t["rank"].to_pylist() == [1, 2, 3, 4]  # rows sorted best first


def test_k_is_capped_by_heads_and_ties_break_by_layer_head() -> None:
    t = rankings_table(make_table("ships", ships_rows({"p1": [0.5, 0.5, 0.5, 0.25]})), k=10, run_id="d1")
    r = _by(t)
    assert {h: r[h]["rank"] for h in HEADS} == {"L0H0": 1, "L0H1": 2, "L1H0": 3, "L1H1": 4}
    assert all(r[h]["k"] == 4 and r[h]["topk_frac"] == 1.0 and r[h]["run_id"] == "d1" for h in HEADS)
    with pytest.raises(ValueError, match="bad k"):
        rankings_table(make_table("ships", ships_rows(HARM)), k=0)


def test_conditions_are_ranked_separately() -> None:
    rows = (ships_rows(HARM) + ships_rows({"p1": [0.0, 0.0, 0.0, 1.0]}, model="m2")
            + ships_rows({"p1": [0.0, 1.0, 0.0, 0.0]}, op="scale_v")
            + ships_rows({"p1": [0.0, 0.0, 1.0, 0.0]}, revision="abc"))
    t = rankings_table(make_table("ships", rows), k=1)
    assert _by(t, model="m2")["L1H1"]["rank"] == 1
    assert _by(t, op="scale_v")["L0H1"]["rank"] == 1
    assert _by(t, model_revision="abc")["L1H0"]["rank"] == 1
    base = _by(t, model="m", op="undiff_q", model_revision=None)
    assert base["L1H0"]["rank"] == 1 and base["L1H0"]["topk_frac"] == 0.0  # best mean, never a prompt's top 1
    assert base["L0H0"]["topk_frac"] == 0.5 and base["L0H0"]["k"] == 1
    assert t.num_rows == 16


def _scores(subspace: str, angles: list[float]) -> list[dict[str, Any]]:
    order = sorted(range(4), key=lambda i: -angles[i])
    rank = {i: r for r, i in enumerate(order, start=1)}
    return [dict(run_id="r1", model="m", model_revision=None, dataset="harm", prompt_format="paper",
                 code_version="0", layer=int(h[1]), head=int(h[3]), head_label=h, op="undiff_q", eps=1e-5,
                 subspace=subspace, rank_r=1, centered=False, angle_deg=a, rank=rank[i], exact=True)
            for i, (h, a) in enumerate(zip(HEADS, angles))]


def test_head_scores_rankings_per_variant() -> None:
    hs = make_table("head_scores", _scores("left", [10.0, 40.0, 20.0, 30.0]) + _scores("right", [4.0, 3.0, 2.0, 1.0]))
    t = rankings_table(make_table("ships", ships_rows(HARM)), hs, k=2)
    left = _by(t, source="head_scores", subspace="left")
    assert {h: left[h]["rank"] for h in HEADS} == {"L0H1": 1, "L1H1": 2, "L1H0": 3, "L0H0": 4}
    assert left["L0H1"]["score"] == 40.0 and left["L0H1"]["topk_frac"] is None and left["L0H1"]["k"] == 2
    assert left["L0H1"]["n_prompts"] is None and left["L0H1"]["rank_r"] == 1 and left["L0H1"]["centered"] is False
    right = _by(t, source="head_scores", subspace="right")
    assert right["L0H0"]["rank"] == 1 and right["L0H0"]["specificity"] is None
    assert len(_by(t, source="ships")) == 4 and t.num_rows == 12


def test_specificity_is_filled_for_harmful_ships_rankings() -> None:
    ben1 = {"b1": [0.5, 0.4375, 0.0, 0.3125]}  # L0H0 .5, L0H1 .4375, L1H0 0, L1H1 .3125
    ben2 = {"c1": [0.25, 0.0, 0.0, 0.0]}
    ships = make_table("ships", ships_rows(HARM) + ships_rows(ben1, dataset="ben")
                       + ships_rows(ben2, dataset="ben2"))
    one = specificity_table(ships, ["ben"])
    r = _by(rankings_table(ships, k=2, specificity=one), dataset="harm")
    assert r["L0H0"]["specificity"] == pytest.approx(0.5)  # equal KL on both
    assert r["L1H0"]["specificity"] == pytest.approx(1.0)  # no effect on benign prompts
    assert r["L0H1"]["specificity"] == pytest.approx(0.5)
    assert all(v["specificity"] is None for v in _by(rankings_table(ships, k=2, specificity=one),
                                                      dataset="ben").values())
    two = specificity_table(ships, ["ben", "ben2"])
    r2 = _by(rankings_table(ships, k=2, specificity=two), dataset="harm")
    assert r2["L0H0"]["specificity"] == pytest.approx(0.5 / (0.5 + (0.5 + 0.25) / 2))
    assert r2["L1H1"]["specificity"] == pytest.approx(0.3125 / (0.3125 + 0.3125 / 2))
    assert rankings_table().num_rows == 0
