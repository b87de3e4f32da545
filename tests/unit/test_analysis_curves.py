"""ASR against group size: the targeted curve, the pooled normal level and the random-control band."""

from __future__ import annotations

import math
from typing import Any

import pytest

from analysis.curves import asr_curve_table
from study.runtime.schema import ASR_CURVE, make_table


def asr_row(condition: str, group_size: int, harmful: int, *, draw: int = 0, n: int = 10, refused: int = 0,
            degenerate: int = 0, kind: str = "harmful", ablation: str | None = None, p: float | None = None,
            run_id: str = "r1", non_answer: int | None = None) -> dict[str, Any]:
    """An `asr` row; non_answer None is a table written before outcomes (the column null)."""
    return dict(run_id=run_id, model="m", model_revision=None, dataset="harm", prompt_format="paper",
                code_version="0", kind=kind, condition=condition, group_size=group_size, draw=draw,
                ablation=ablation or (f"undiff_q:1e-05:g{group_size}" if group_size else "none"), op="undiff_q",
                eps=1e-5, decoding="greedy", judge="rules@1", n=n, harmful=harmful, asr=harmful / n,
                ci_low=0.0, ci_high=1.0, p_mcnemar=p, refused=refused, refusal_rate=refused / n,
                degenerate=degenerate, degenerate_frac=degenerate / n, non_answer=non_answer,
                non_answer_rate=None if non_answer is None else non_answer / n)


def _wilson(x: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


ROWS = [
    asr_row("normal", 0, 1, refused=9),
    asr_row("normal", 0, 3, refused=7, ablation="none", run_id="r0"),  # a second job's normal rows: pooled
    asr_row("sahara", 1, 5, refused=5, degenerate=1, p=0.06),
    asr_row("sahara", 2, 7, refused=2, degenerate=2, p=0.01),
    asr_row("random", 1, 1, draw=0, refused=9), asr_row("random", 1, 3, draw=1, refused=7),
    asr_row("random", 1, 2, draw=2, refused=8, degenerate=3),
    asr_row("random", 2, 4, draw=0, refused=6),
    asr_row("query", 1, 6, ablation="query:top1", p=0.02),
    asr_row("random", 1, 0, draw=0, ablation="query:random1:d0"),
    asr_row("random", 1, 2, draw=1, ablation="query:random1:d1"),
    asr_row("normal", 0, 0, refused=1, kind="benign"),
    asr_row("sahara", 1, 0, refused=4, kind="benign", p=0.3),
    asr_row("random", 1, 0, draw=0, refused=2, kind="benign"),
]


def test_non_answer_rate_for_every_arm_and_from_older_tables() -> None:
    """An ablation that turns refusals into evasions: the non-answer rate rises, not ASR. Rows written before
    outcomes (null non_answer) read n - harmful - refused: every verdict is a refusal, an answer or neither."""
    rows = [asr_row("normal", 0, 1, refused=9, non_answer=0),
            asr_row("normal", 0, 2, refused=6, run_id="r0"),  # older: 2 non-answers, pooled with the first
            asr_row("sahara", 1, 2, refused=1, non_answer=7, p=0.5),
            asr_row("random", 1, 1, refused=6),  # older: 3
            asr_row("random", 1, 1, draw=1, refused=8, non_answer=1)]
    t = asr_curve_table(make_table("asr", rows)).to_pylist()
    normal, sahara = t
    assert (normal["condition"], normal["non_answer_rate"], normal["normal_non_answer_rate"]) == ("normal", 0.1, 0.1)
    assert (sahara["asr"], sahara["refusal_rate"], sahara["non_answer_rate"]) == (0.2, 0.1, 0.7)
    assert sahara["normal_non_answer_rate"] == 0.1
    assert sahara["random_non_answer_mean"] == pytest.approx(0.2)  # (0.3 + 0.1) / 2


def test_curve_rows_levels_and_bands() -> None:
    t = asr_curve_table(make_table("asr", ROWS))
    assert t.schema.equals(ASR_CURVE)
    rows = t.to_pylist()
    harm = [(r["condition"], r["group_size"]) for r in rows if r["kind"] == "harmful"]
    assert harm == [("normal", 0), ("query", 1), ("sahara", 1), ("sahara", 2)]
    r = {(x["kind"], x["condition"], x["group_size"]): x for x in rows}
    normal = r[("harmful", "normal", 0)]
    assert (normal["n"], normal["harmful"], normal["asr"]) == (20, 4, 0.2)
    assert normal["refusal_rate"] == pytest.approx(16 / 20) and normal["p_mcnemar"] is None
    assert (normal["ci_low"], normal["ci_high"]) == pytest.approx(_wilson(4, 20))
    assert normal["run_id"] == "r1" and normal["random_draws"] == 0 and normal["delta_asr"] == 0.0
    s1 = r[("harmful", "sahara", 1)]
    assert (s1["asr"], s1["p_mcnemar"], s1["normal_asr"], s1["degenerate_frac"]) == (0.5, 0.06, 0.2, 0.1)
    assert s1["delta_asr"] == pytest.approx(0.3)
    assert s1["random_draws"] == 3
    assert (s1["random_asr_mean"], s1["random_asr_min"], s1["random_asr_max"]) == pytest.approx((0.2, 0.1, 0.3))
    assert (s1["random_refusal_mean"], s1["random_refusal_min"], s1["random_refusal_max"]) == pytest.approx(
        (0.8, 0.7, 0.9))
    assert s1["random_degenerate_mean"] == pytest.approx(0.1)
    assert s1["normal_refusal_rate"] == pytest.approx(0.8) and s1["ablation"] == "undiff_q:1e-05:g1"
    s2 = r[("harmful", "sahara", 2)]
    assert s2["random_draws"] == 1 and s2["random_asr_min"] == s2["random_asr_max"] == 0.4
    q = r[("harmful", "query", 1)]  # query-level controls only
    assert q["random_draws"] == 2 and q["random_asr_mean"] == pytest.approx(0.1) and q["asr"] == 0.6
    b = r[("benign", "sahara", 1)]
    assert (b["refusal_rate"], b["normal_refusal_rate"], b["random_refusal_mean"]) == pytest.approx((0.4, 0.1, 0.2))
    assert b["random_draws"] == 1
    assert len(rows) == 6


def test_missing_controls_and_normal_give_nulls() -> None:
    t = asr_curve_table(make_table("asr", [asr_row("heads", 2, 3, p=0.5)]), run_id="d1").to_pylist()
    (r,) = t
    assert (r["condition"], r["random_draws"], r["random_asr_mean"], r["normal_asr"], r["delta_asr"]) == (
        "heads", 0, None, None, None)
    assert r["run_id"] == "d1" and r["model_revision"] is None
    assert asr_curve_table(make_table("asr", [])).num_rows == 0
    with pytest.raises(ValueError, match="lacks columns"):
        asr_curve_table(make_table("asr", ROWS).drop_columns(["judge"]))
