"""Specificity: harmful vs benign mean Ships KL per head, the bounded score, the log ratio and the ranks."""

from __future__ import annotations

import math

import pytest

from analysis.specificity import safety_specific, specificity_score, specificity_table
from study.runtime.schema import SPECIFICITY, make_table
from tests.analysis_rows import HARM, HEADS, ships_rows

BEN = {"b1": [0.125, 0.0, 0.5625, 0.0], "b2": [0.125, 0.0, 0.5625, 0.0]}
# harmful means: L0H0 .5, L0H1 .4375, L1H0 .5625, L1H1 .3125; benign means: .125, 0, .5625, 0


def test_scores_log_ratio_and_ranks() -> None:
    t = specificity_table(make_table("ships", ships_rows(HARM) + ships_rows(BEN, dataset="ben")), {"ben"})
    assert t.schema.equals(SPECIFICITY)
    r = {x["head_label"]: x for x in t.to_pylist()}
    assert set(r) == set(HEADS)
    assert r["L0H0"]["kl_harmful"] == 0.5 and r["L0H0"]["kl_benign"] == 0.125
    assert r["L0H0"]["specificity"] == pytest.approx(0.8)
    assert r["L0H0"]["log2_ratio"] == pytest.approx(2.0)
    assert r["L1H0"]["specificity"] == pytest.approx(0.5) and r["L1H0"]["log2_ratio"] == pytest.approx(0.0)
    assert r["L0H1"]["specificity"] == 1.0 and r["L0H1"]["log2_ratio"] is None  # benign KL 0: ratio undefined
    assert (r["L0H0"]["n_harmful"], r["L0H0"]["n_benign"]) == (2, 2)
    assert {h: r[h]["rank_harmful"] for h in HEADS} == {"L1H0": 1, "L0H0": 2, "L0H1": 3, "L1H1": 4}
    # importance h*s: L0H0 .4, L0H1 .4375, L1H0 .28125, L1H1 .3125
    assert {h: r[h]["rank_specific"] for h in HEADS} == {"L0H1": 1, "L0H0": 2, "L1H1": 3, "L1H0": 4}
    assert all(x["dataset"] == "harm" and x["benign_dataset"] == "ben" and x["model_revision"] is None
               for x in t.to_pylist())


def test_score_properties() -> None:
    assert specificity_score(0.0, 0.0) == 0.5
    assert specificity_score(3.0, 1.0) == pytest.approx(0.75)
    assert specificity_score(1.0, 3.0) == pytest.approx(1 - specificity_score(3.0, 1.0))  # symmetric
    assert specificity_score(300.0, 100.0) == pytest.approx(specificity_score(3.0, 1.0))  # scale-free
    assert specificity_score(-1e-9, 0.5) == 0.0  # float noise below 0 reads as no effect


def test_pairs_every_harmful_with_every_benign_of_the_same_condition() -> None:
    rows = (ships_rows(HARM) + ships_rows(HARM, dataset="harm2") + ships_rows(BEN, dataset="ben")
            + ships_rows(BEN, dataset="ben2") + ships_rows(BEN, dataset="ben", op="scale_v")
            + ships_rows(BEN, dataset="ben", model="other"))
    t = specificity_table(make_table("ships", rows), ["ben", "ben2", "absent"], run_id="d1").to_pylist()
    pairs = {(x["dataset"], x["benign_dataset"]) for x in t}
    assert pairs == {("harm", "ben"), ("harm", "ben2"), ("harm2", "ben"), ("harm2", "ben2")}
    assert len(t) == 16 and {x["op"] for x in t} == {"undiff_q"} and {x["model"] for x in t} == {"m"}
    assert {x["run_id"] for x in t} == {"d1"}
    none = specificity_table(make_table("ships", ships_rows(HARM)), ["ben"])
    assert none.num_rows == 0 and none.schema.equals(SPECIFICITY)


def test_bad_benign_datasets() -> None:
    ships = make_table("ships", ships_rows(HARM))
    with pytest.raises(ValueError, match="collection of dataset names"):
        specificity_table(ships, "ben")
    assert not math.isnan(specificity_score(1.0, 0.0))


def test_bootstrap_interval_tells_a_specific_head_from_noise() -> None:
    """L0H0 moves harmful prompts far more than benign ones on every prompt; L0H1 scores 0.51 but only because
    half its harmful prompts move a lot and half not at all; L1H0 and L1H1 prefer benign prompts."""
    harm = {"p1": [0.9, 0.0, 0.1, 0.1], "p2": [0.8, 1.02, 0.1, 0.1], "p3": [1.0, 0.0, 0.1, 0.1],
            "p4": [0.85, 1.02, 0.1, 0.1]}
    ben = {"b1": [0.01, 0.49, 0.3, 0.3], "b2": [0.02, 0.49, 0.3, 0.3], "b3": [0.015, 0.49, 0.3, 0.3]}
    t = specificity_table(make_table("ships", ships_rows(harm) + ships_rows(ben, dataset="ben")), {"ben"})
    r = {x["head_label"]: x for x in t.to_pylist()}
    assert r["L0H1"]["specificity"] == pytest.approx(0.51)
    for head in HEADS:
        assert r[head]["spec_ci_low"] <= r[head]["specificity"] <= r[head]["spec_ci_high"], head
    assert r["L0H0"]["spec_ci_low"] > 0.9 and safety_specific(r["L0H0"]["spec_ci_low"])
    assert r["L0H1"]["spec_ci_low"] < 0.4 and r["L0H1"]["spec_ci_high"] > 0.6  # 0.51 is within the noise
    assert not safety_specific(r["L0H1"]["spec_ci_low"])
    assert not safety_specific(r["L1H0"]["spec_ci_low"])  # no spread, but 0.25: prefers benign prompts
    again = specificity_table(make_table("ships", ships_rows(harm) + ships_rows(ben, dataset="ben")), {"ben"})
    assert again.column("spec_ci_low").to_pylist() == t.column("spec_ci_low").to_pylist()  # seeded


def test_one_prompt_on_a_side_gives_no_interval_and_no_claim() -> None:
    t = specificity_table(make_table("ships", ships_rows({"p1": [0.9, 0.1, 0.1, 0.1]})
                                     + ships_rows(BEN, dataset="ben")), {"ben"}).to_pylist()
    assert all(x["spec_ci_low"] is None and x["spec_ci_high"] is None for x in t)
    assert not any(safety_specific(x["spec_ci_low"]) for x in t)
    assert not safety_specific(None) and not safety_specific(float("nan")) and safety_specific(0.51)
