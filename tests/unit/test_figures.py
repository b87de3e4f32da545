"""Figures (analysis.figures): each figure function on a small input whose answer is known by hand, the files
`save` writes, `make_figures` on a folder with only some tables, and no torch import."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from analysis.curves import asr_curve_table  # noqa: E402
from analysis.figures import (  # noqa: E402
    asr_curve_figure,
    asr_curve_units,
    caption_of,
    head_heatmap,
    heatmap_units,
    make_figures,
    overlap_figure,
    overlap_units,
    region_sizes,
    save,
    specificity_figure,
    swaps_figure,
    utility_figure,
)
from analysis.overlap import overlap_table  # noqa: E402
from analysis.rankings import rankings_table  # noqa: E402
from analysis.specificity import specificity_table  # noqa: E402
from analysis.style import fmt_p, model_labels  # noqa: E402
from study.core.stats import wilson  # noqa: E402
from study.runtime.schema import make_table  # noqa: E402
from study.runtime.store import RunWriter  # noqa: E402

LAYERS, HEADS = 2, 4
LABELS = [f"L{i // HEADS}H{i % HEADS}" for i in range(LAYERS * HEADS)]
META = dict(run_id="r1", model_revision=None, prompt_format="paper", code_version="0")


def ships_rows(model: str, dataset: str, kls: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Ships rows of a 2 x 4 model: kls[prompt] lists the KL of each head in LABELS order."""
    rows = []
    for pid, values in kls.items():
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        for rank, i in enumerate(order, start=1):
            rows.append(dict(META, model=model, dataset=dataset, prompt_id=pid, prompt="q", layer=i // HEADS,
                             head=i % HEADS, head_label=LABELS[i], op="undiff_q", eps=1e-5, kl=values[i], rank=rank,
                             exact=True))
    return rows


def ships_top(model: str, top: list[int], dataset: str = "harm") -> list[dict[str, Any]]:
    """One prompt whose KL puts the heads `top` first, in that order, and the rest after them."""
    kl = [0.001 * (i + 1) for i in range(len(LABELS))]
    for pos, i in enumerate(top):
        kl[i] = 1.0 - 0.1 * pos
    return ships_rows(model, dataset, {"p1": kl})


def head_score_rows(model: str, angles: list[float]) -> list[dict[str, Any]]:
    order = sorted(range(len(angles)), key=lambda i: (-angles[i], i))
    rank = {i: r for r, i in enumerate(order, start=1)}
    return [dict(META, model=model, dataset="harm", layer=i // HEADS, head=i % HEADS, head_label=LABELS[i],
                 op="undiff_q", eps=1e-5, subspace="left", rank_r=1, centered=False, angle_deg=a, rank=rank[i],
                 exact=True)
            for i, a in enumerate(angles)]


def asr_row(model: str, condition: str, size: int, harmful: int, *, kind: str = "harmful", draw: int = 0,
            refused: int = 0, degenerate: int = 0, judge: str = "rules@1", n: int = 10) -> dict[str, Any]:
    lo, hi = wilson(harmful, n)
    return dict(META, model=model, dataset="harm" if kind == "harmful" else "ben", kind=kind, condition=condition,
                group_size=size, draw=draw, ablation=f"a{size}:{draw}" if size else "none", op="undiff_q", eps=1e-5,
                decoding="greedy", judge=judge, n=n, harmful=harmful, asr=harmful / n, ci_low=lo, ci_high=hi,
                p_mcnemar=None if condition == "normal" else (0.01 if harmful >= 8 else 0.5), refused=refused,
                refusal_rate=refused / n, degenerate=degenerate, degenerate_frac=degenerate / n,
                non_answer=None, non_answer_rate=None)  # a table written before outcomes


def drawn(fig: Figure) -> None:
    """Every axes of `fig` shows something (no empty panels)."""
    assert fig.axes
    for ax in fig.axes:
        assert ax.lines or ax.patches or ax.collections or ax.images or ax.texts, ax.get_title("left")


def by_gid(ax: Any, prefix: str) -> list[Any]:
    return [a for a in ax.get_children() if (a.get_gid() or "").startswith(prefix)]


def axis(fig: Figure, label: str) -> Any:
    found = [ax for ax in fig.axes if ax.get_label() == label]
    assert len(found) == 1, [ax.get_label() for ax in fig.axes]
    return found[0]


# ---- heatmaps ----

KL_P1 = [0.9, 0.1, 0.5, 0.0, 0.3, 0.05, 0.7, 0.2]
KL_P2 = [0.7, 0.2, 0.5, 0.0, 0.1, 0.05, 0.9, 0.3]
# means: .8 .15 .5 0 .2 .05 .8 .25 -> top 5: L0H0, L1H2 (tie, by layer/head), L0H2, L1H3, L1H0


def test_heatmap_boxes_the_top_five_heads_by_mean_kl() -> None:
    ships = pd.DataFrame(ships_rows("org/m", "harm", {"p1": KL_P1, "p2": KL_P2}))
    angles = [float(a) for a in (3, 9, 1, 7, 2, 8, 4, 6)]  # top 5: L0H1 L1H1 L0H3 L1H3 L1H2
    ranks = rankings_table(ships, pd.DataFrame(head_score_rows("org/m", angles)), k=2)
    fig = head_heatmap(ranks.to_pandas())
    drawn(fig)
    kl = axis(fig, "ships_kl")
    assert {p.get_gid()[4:] for p in by_gid(kl, "top:")} == {"L0H0", "L1H2", "L0H2", "L1H3", "L1H0"}
    assert all(isinstance(p, Rectangle) for p in by_gid(kl, "top:"))
    box = by_gid(kl, "top:L1H2")[0]
    assert box.get_xy() == (2 - 0.5, 1 - 0.5)  # x = head, y = layer
    image = kl.images[0].get_array()
    assert image.shape == (LAYERS, HEADS) and image[1, 2] == pytest.approx(0.8)
    listing = by_gid(kl, "top-list")[0].get_text()
    assert listing.index("1 L0H0") < listing.index("2 L1H2") < listing.index("5 L1H0")
    angle = axis(fig, "angle:left:r1")
    assert {p.get_gid()[4:] for p in by_gid(angle, "top:")} == {"L0H1", "L1H1", "L0H3", "L1H3", "L1H2"}
    # top-2 frequency: p1 top 2 = L0H0, L1H2; p2 = L1H2, L0H0 -> only those two are boxed (the rest are in none)
    topk = axis(fig, "ships_topk")
    assert {p.get_gid()[4:] for p in by_gid(topk, "top:")} == {"L0H0", "L1H2"}
    assert "Attention-head importance in m" in fig.get_suptitle()


def test_heatmap_from_a_ships_table_with_a_log_scale_and_its_floor() -> None:
    kl = [1.0, 0.0, 1e-9, 1e-3, 0.5, 0.2, 0.1, 1e-5]
    fig = head_heatmap(pd.DataFrame(ships_rows("org/m", "harm", {"p1": kl})), top=3)
    ax = axis(fig, "ships_kl")
    assert type(ax.images[0].norm).__name__ == "LogNorm"
    assert {p.get_gid()[4:] for p in by_gid(ax, "top:")} == {"L0H0", "L1H0", "L1H1"}
    assert "2 head(s) below 1.0e-06 nats" in caption_of(fig)  # 0 and 1e-9 drawn at max * 1e-6


def test_heatmap_wants_one_condition() -> None:
    rows = ships_rows("org/a", "harm", {"p1": KL_P1}) + ships_rows("org/b", "harm", {"p1": KL_P2})
    with pytest.raises(ValueError, match="expected one model"):
        head_heatmap(pd.DataFrame(rows))
    units = heatmap_units(pd.DataFrame(rows))
    assert [u["model"].iloc[0] for u in units] == ["org/a", "org/b"]


# ---- overlap ----

def _overlap(models: dict[str, list[int]], k: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [r for m, top in models.items() for r in ships_top(m, top)]
    ranks = rankings_table(pd.DataFrame(rows), k=k).to_pandas()
    return overlap_table(ranks, k).to_pandas(), ranks


def _region_texts(fig: Figure) -> dict[str, str]:
    return {t.get_gid()[7:]: t.get_text() for ax in fig.axes for t in by_gid(ax, "region:")}


def test_venn_of_two_sets_counts_and_pvalue() -> None:
    ov, ranks = _overlap({"org/a": [0, 1, 2], "org/b": [1, 2, 5]})
    [unit] = overlap_units(ov)
    fig = overlap_figure(unit, ranks)
    drawn(fig)
    circles = [p for ax in fig.axes for p in ax.patches if isinstance(p, Circle) and p.get_gid()]
    assert sorted(c.get_gid() for c in circles) == ["set:a", "set:b"]
    assert _region_texts(fig) == {"0": "1", "1": "1", "0&1": "2"}
    p = float(unit["p_value"].iloc[0])
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "a ∩ b: 2 shared" in texts and fmt_p(p) in texts
    assert "L0H1\nL0H2" in texts  # the shared heads written in the middle


def test_venn_of_three_sets_from_the_table_alone_matches_the_sets() -> None:
    ov, ranks = _overlap({"org/a": [0, 1, 2], "org/b": [0, 1, 3], "org/c": [0, 4, 2]})
    [unit] = overlap_units(ov)
    assert len(unit) == 4  # three pairs and the all-way row
    # a={0,1,2} b={0,1,3} c={0,2,4}: abc {0}; ab only {1}; ac only {2}; b only {3}; c only {4}
    want = {(0,): 0, (1,): 1, (2,): 1, (0, 1): 1, (0, 2): 1, (1, 2): 0, (0, 1, 2): 1}
    assert region_sizes(unit, 3, 3) == want
    with_sets, without = overlap_figure(unit, ranks), overlap_figure(unit)
    for fig in (with_sets, without):
        assert len([p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("set:")]) == 3
        assert _region_texts(fig) == {"&".join(map(str, c)): str(v) for c, v in want.items()}
    all_way = unit[unit["n_sets"] == 3].iloc[0]
    assert fmt_p(float(all_way["p_value"])) in " ".join(t.get_text() for ax in without.axes for t in ax.texts)


def test_upset_bars_are_the_exclusive_intersections() -> None:
    ov, ranks = _overlap({"org/a": [0, 1, 2], "org/b": [0, 1, 3], "org/c": [0, 4, 5], "org/d": [0, 1, 2]})
    units = overlap_units(ov)
    assert len(units) == 1 and int(units[0]["n_sets"].max()) == 4
    fig = overlap_figure(units[0], ranks)
    drawn(fig)
    bars = axis(fig, "upset-bars")
    heights = {p.get_gid()[6:]: p.get_height() for p in by_gid(bars, "combo:")}
    # head 0 in all; head 1 in a, b, d; head 2 in a, d; head 3 in b; heads 4, 5 in c
    assert heights == {"a&b&c&d": 1, "a&b&d": 1, "a&d": 1, "b": 1, "c": 2}
    assert [p.get_gid() for p in by_gid(bars, "combo:")][0] == "combo:c"  # largest first
    all_way = ov[ov["n_sets"] == 4].iloc[0]
    assert fmt_p(float(all_way["p_value"])) in bars.get_title("left") and "all 4: 1 shared" in bars.get_title("left")
    assert axis(fig, "pair-matrix").images  # every pair's p-value
    with pytest.raises(ValueError, match="rankings"):
        overlap_figure(units[0])


# ---- ASR curve ----

def _asr(models: list[str], judges: tuple[str, ...] = ("rules@1",)) -> pd.DataFrame:
    rows = []
    for m in models:
        for j in judges:
            rows += [asr_row(m, "normal", 0, 1, judge=j), asr_row(m, "sahara", 1, 5, judge=j, degenerate=1),
                     asr_row(m, "sahara", 2, 8, judge=j, degenerate=2), asr_row(m, "random", 1, 2, judge=j),
                     asr_row(m, "random", 1, 3, draw=1, judge=j), asr_row(m, "random", 2, 1, judge=j),
                     asr_row(m, "random", 2, 4, draw=1, judge=j),
                     asr_row(m, "normal", 0, 0, kind="benign", refused=1, judge=j),
                     asr_row(m, "sahara", 1, 0, kind="benign", refused=2, judge=j),
                     asr_row(m, "sahara", 2, 0, kind="benign", refused=4, judge=j),
                     asr_row(m, "random", 1, 0, kind="benign", refused=1, judge=j)]
    return asr_curve_table(make_table("asr", rows)).to_pandas()


def test_asr_curve_error_bars_band_and_normal_level() -> None:
    curve = _asr(["org/a", "org/b"], judges=("rules@1", "llm@2"))
    [unit] = asr_curve_units(curve)
    fig = asr_curve_figure(unit)
    drawn(fig)
    assert len(fig.axes) == 4  # two models x (ASR, over-refusal)
    assert "judge rules@1 (first of 2" in fig.get_suptitle()  # the study's first judge is the headline
    left = fig.axes[0]
    sahara = curve[(curve["model"] == "org/a") & (curve["kind"] == "harmful") & (curve["condition"] == "sahara")
                   & (curve["judge"] == "llm@2")].sort_values("group_size")
    [bars] = [c for c in by_gid(left, "ci:asr:sahara") if isinstance(c, LineCollection)]
    spans = sorted((s[0][0], s[0][1], s[1][1]) for s in bars.get_segments())
    want = sahara[["group_size", "ci_low", "ci_high"]].to_numpy(dtype=float)
    assert np.asarray(spans) == pytest.approx(want)
    assert list(by_gid(left, "asr:sahara")[0].get_ydata()) == pytest.approx([0.5, 0.8])
    [band] = [c for c in by_gid(left, "random-band") if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx((0.1, 0.4))  # draws at size 1: .2, .3; size 2: .1, .4
    assert by_gid(left, "normal")[0].get_ydata()[0] == pytest.approx(0.1)
    right = fig.axes[1]
    assert list(by_gid(right, "refusal:sahara")[0].get_ydata()) == pytest.approx([0.2, 0.4])
    assert list(by_gid(right, "degenerate:sahara")[0].get_ydata()) == pytest.approx([0.1, 0.2])
    assert any(t.get_text() == "*" for t in left.texts)  # p 0.01 at size 2
    with pytest.raises(ValueError, match="judge"):
        asr_curve_figure(unit, judge="nobody@0")


def test_asr_curve_of_one_model_without_benign_rows() -> None:
    curve = _asr(["org/a"])
    fig = asr_curve_figure(curve[curve["kind"] == "harmful"])
    drawn(fig)
    assert len(fig.axes) == 2 and "no benign prompts" in fig.axes[1].get_title("left")


# ---- specificity ----

def test_specificity_scatter_labels_clips_and_diagonal() -> None:
    harm = [0.8, 0.5, 0.02, 0.3, 0.001, 0.05, 0.2, 0.0]
    ben = [0.001, 0.6, 0.02, 0.0, 0.01, 0.5, 0.004, 0.003]
    ships = pd.DataFrame(ships_rows("org/m", "harm", {"p1": harm}) + ships_rows("org/m", "ben", {"b1": ben}))
    spec = specificity_table(ships, ["ben"]).to_pandas()
    fig = specificity_figure(spec, top=3)
    drawn(fig)
    ax = [a for a in fig.axes if a.get_xscale() == "log"][0]
    assert ax.get_yscale() == "log"
    want = set(spec.sort_values("rank_specific")["head_label"].head(3))
    got = {h for t in by_gid(ax, "label:") for h in t.get_gid()[6:].split(",")}
    assert got == want == {"L0H0", "L0H3", "L0H1"}  # h x h / (h + b): .799, .3, .227
    [clipped] = by_gid(ax, "heads-clipped")
    assert len(clipped.get_offsets()) == 2  # L0H3 (benign 0) and L1H3 (harmful 0)
    assert "drawn at that floor" in caption_of(fig)
    diag = [ln for ln in ax.lines if ln.get_label().startswith("y = x")][0]
    assert list(diag.get_xdata()) == list(diag.get_ydata())


# ---- swaps ----

RECIPE_ASR = {"aligned": 1, "base": 9, "attn-from-base": 2, "mlp-from-base": 1, "heads-from-base": 7,
              "heads-into-base": 3}


def _swaps() -> list[dict[str, Any]]:
    rows = []
    for recipe, harmful in RECIPE_ASR.items():
        heads = ["L1H0"] if recipe.startswith("heads") else []
        common = dict(META, model="org/chat", aligned="org/chat", base="org/base", recipe=recipe, heads=heads)
        for kind, dataset, metric, x in (("harmful", "harm", "asr", harmful), ("benign", "ben", "refusal_rate", 1)):
            lo, hi = wilson(x, 10)
            rows.append(dict(common, dataset=dataset, kind=kind, metric=metric, judge="rules@1", n=10,
                             value=x / 10, ci_low=lo, ci_high=hi))
        rows.append(dict(common, dataset="harm", kind="ships", metric="ships:group", judge=None, n=4,
                         value=0.5 if recipe != "base" else 1e-3, ci_low=None, ci_high=None))
    return rows


def test_swap_bars_error_bars_and_published_markers() -> None:
    published = [dict(experiment="swap", model="org/chat", claim="attn-from-base keeps the model safe", metric="asr",
                      value=0.25, baseline=0.05, source="paper"),  # the recipe named in the claim
                 dict(experiment="swap", model="org/other", claim="attn-from-base", metric="asr", value=0.9)]
    fig = swaps_figure(pd.DataFrame(_swaps()), published=published)
    drawn(fig)
    asr_ax, refusal_ax, ships_ax = fig.axes[:3]
    heights = {p.get_gid()[4:]: p.get_height() for p in by_gid(asr_ax, "asr:")}
    assert heights == pytest.approx({r: x / 10 for r, x in RECIPE_ASR.items()})
    order = list(RECIPE_ASR)
    [ci] = [c for c in by_gid(asr_ax, "ci:asr") if isinstance(c, LineCollection)]
    for seg in ci.get_segments():
        lo, hi = wilson(RECIPE_ASR[order[int(round(seg[0][0]))]], 10)
        assert (seg[0][1], seg[1][1]) == pytest.approx((lo, hi))
    marks = {m.get_gid(): tuple(m.get_offsets()[0]) for m in by_gid(asr_ax, "published:")}
    assert marks == {"published:attn-from-base": pytest.approx((2, 0.25)),
                     "published:aligned": pytest.approx((0, 0.05))}
    assert {p.get_height() for p in by_gid(refusal_ax, "refusal:")} == {0.1}
    assert ships_ax.get_yscale() == "log" and len(by_gid(ships_ax, "ships:")) == 6
    assert "L1H0" in caption_of(fig)


# ---- utility ----

def test_utility_ratio_lines() -> None:
    def row(condition: str, size: int, value: float, draw: int = 0) -> dict[str, Any]:
        return dict(META, model="org/m", dataset="text", condition=condition, group_size=size, draw=draw,
                    ablation="none" if not size else f"a{size}", op="undiff_q", eps=1e-5, metric="perplexity",
                    value=value, n=100, ratio=value / 10.0, error=None)
    rows = [row("normal", 0, 10.0), row("sahara", 1, 11.0), row("sahara", 2, 12.5), row("random", 1, 10.5),
            row("random", 1, 10.2, draw=1)]
    failed = dict(rows[0], metric="lm_eval:boolq", value=None, n=0, ratio=None, error="ConnectionError: offline")
    fig = utility_figure(make_table("utility", [*rows, failed]).to_pandas())
    drawn(fig)
    [ax] = fig.axes  # the failed task has no panel: it has no value
    assert list(by_gid(ax, "utility:sahara")[0].get_ydata()) == pytest.approx([1.1, 1.25])
    assert len(by_gid(ax, "utility:random")[0].get_offsets()) == 2


# ---- files and make_figures ----

def test_save_writes_png_and_svg(tmp_path: Path) -> None:
    fig = head_heatmap(pd.DataFrame(ships_rows("org/m", "harm", {"p1": KL_P1})))
    paths = save(fig, tmp_path / "figures", "heat map/1")
    assert set(paths) == {"png", "svg"}
    assert paths["png"].name == "heat_map_1.png" and paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["svg"].stat().st_size > 0 and "<svg" in paths["svg"].read_text()[:2000]
    assert not list((tmp_path / "figures").glob(".*"))  # no temp files left


def _write_run(out: Path, tables: dict[str, list[dict[str, Any]]], manifest: dict[str, Any]) -> None:
    with RunWriter(out, "r1") as w:
        for name, rows in tables.items():
            w.write(name, make_table(name, rows))
        w.set_manifest(manifest)


def test_make_figures_with_only_ships_makes_heatmaps_and_says_why_not_more(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _write_run(run, {"ships": ships_rows("org/m", "harm", {"p1": KL_P1, "p2": KL_P2})}, {})
    with caplog.at_level(logging.INFO, logger="analysis.figures"):
        records = make_figures(run, strict=True)
    assert [r.kind for r in records] == ["heatmap"]
    [rec] = records
    assert rec.name == "heatmap-m-harm-undiff_q" and rec.tables == ("rankings",) and rec.title and rec.caption
    for path in rec.paths.values():
        assert path.parent == run / "figures" and path.stat().st_size > 0
    log = caplog.text
    for kind in ("overlap", "specificity", "asr_curve", "swaps", "utility"):
        assert f"no {kind} figure" in log, kind


def test_make_figures_draws_every_family_for_one_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    asr = [asr_row("org/m", "normal", 0, 1), asr_row("org/m", "sahara", 1, 6), asr_row("org/m", "random", 1, 2)]
    utility = [dict(META, model="org/m", dataset="text", condition=c, group_size=s, draw=0, ablation=a, op="undiff_q",
                    eps=1e-5, metric="perplexity", value=v, n=50, ratio=v / 10, error=None) for c, s, a, v in
               (("normal", 0, "none", 10.0), ("sahara", 1, "a1", 12.0))]
    _write_run(run, {"ships": ships_rows("org/m", "harm", {"p1": KL_P1}) + ships_rows("org/m", "ben", {"b": KL_P2}),
                     "asr": asr, "swaps": _swaps(), "utility": utility},
               {"jobs": [{"experiment": "specificity", "model": "org/m", "prompts": {"set": "ben"}}]})
    records = make_figures(run, tmp_path / "figs", formats=("png",), strict=True)
    assert [r.kind for r in records] == ["heatmap", "heatmap", "overlap", "specificity", "asr_curve", "swaps",
                                         "utility"]
    assert len({r.name for r in records}) == len(records)
    assert all(set(r.paths) == {"png"} and r.paths["png"].stat().st_size > 0 for r in records)


def test_model_labels_are_short_and_unique() -> None:
    got = model_labels(["/x/runs/a/final", "/x/runs/b/final", "org/chat", "/tmp/chat"])
    assert got == {"/x/runs/a/final": "a/final", "/x/runs/b/final": "b/final", "org/chat": "org/chat",
                   "/tmp/chat": "tmp/chat"}


def test_figures_do_not_import_torch() -> None:
    code = "import sys, analysis.figures; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "Agg"},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr


def test_empty_inputs_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="empty"):
        specificity_figure(make_table("specificity", []).to_pandas())
