"""The report reads the joint head-group search as it reads a Sahara group: its own section (the selected seed's
group with gates and each prefix's exact objective, the other seeds' groups, a figure of the steps), the known
answer says whether its group is the planted heads, and the ASR conditions `joint` and `ships` are named,
ordered, coloured and count as targeted; on run folders built here with the report test's helpers."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from analysis import style  # noqa: E402
from analysis.curves import asr_curve_frame  # noqa: E402
from analysis.figures import asr_curve_figure, joint_steps_figure  # noqa: E402
from analysis.report import write_report  # noqa: E402
from study.runtime.schema import make_table  # noqa: E402
from tests.unit.test_report import (  # noqa: E402
    CHAT_A,
    CHAT_B,
    GROUPS,
    HEADS,
    LABELS,
    META,
    asr_row,
    asr_rows,
    manifest,
    model_lines,
    sahara_rows,
    section,
    text_of,
    write,
)

SEEDS = {CHAT_A: {0: ["L1H2", "L0H3"], 1: ["L1H2", "L1H1"]}, CHAT_B: {0: ["L1H2", "L1H1"]}}
SCORES = {0: [0.31, 0.87], 1: [0.31, 0.55]}  # the exact objective of heads 1..i, per seed
PROMPTS_USED = 12


def joint_rows(model: str, seeds: dict[int, list[str]], selected: int = 0) -> list[dict[str, Any]]:
    """A `joint` table of one search (refusal objective, k = 2): each seed's group gets the largest gates."""
    rows = []
    for seed, group in seeds.items():
        gate = {h: 0.01 * (i + 1) for i, h in enumerate(LABELS)}
        gate.update({h: 0.9 - 0.05 * pos - 0.01 * seed for pos, h in enumerate(group)})
        order = sorted(LABELS, key=lambda h: (-gate[h], LABELS.index(h)))
        for label in LABELS:
            rank = order.index(label) + 1
            rows.append(dict(META, model=model, dataset="harm", op="undiff_q", eps=1e-5, subspace="left", rank_r=1,
                             centered=False, objective="refusal", sparsity="l1", steps=5, lr=0.1, l1=0.01, seed=seed,
                             layer=LABELS.index(label) // HEADS, head=LABELS.index(label) % HEADS, head_label=label,
                             gate=gate[label], rank=rank, group=list(group), in_group=label in group,
                             selected=seed == selected, score=SCORES[seed][rank - 1] if label in group else None,
                             prompts_used=PROMPTS_USED))
    return rows


def joint_step_rows(model: str, seeds: list[int], steps: int = 5) -> list[dict[str, Any]]:
    return [dict(META, model=model, dataset="harm", objective="refusal", seed=seed, step=step, loss=0.1 - 0.2 * step,
                 value=0.2 * step + 0.01 * seed, penalty=0.1, open=min(step // 2, 2))
            for seed in seeds for step in range(1, steps + 1)]


def _joint_asr(model: str, group: list[str]) -> list[dict[str, Any]]:
    """The joint group's prefixes and the top heads by mean Ships, ablated (16 and 4 of 20 answered)."""
    return [asr_row(model, "joint", 1, 6, heads=group[:1], p=0.01), asr_row(model, "joint", 2, 16, heads=group, p=2e-5),
            asr_row(model, "ships", 1, 2, heads=["L0H1"], p=0.5), asr_row(model, "ships", 2, 4, heads=["L0H1", "L0H0"],
                                                                           p=0.3)]


@pytest.fixture(scope="module")
def joint_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    """CHAT_A with Sahara, the joint search (two seeds) and every ASR arm; CHAT_B with the joint search only."""
    tables: dict[str, list] = {"sahara": sahara_rows(CHAT_A, GROUPS[CHAT_A]), "joint": [], "joint_steps": [],
                               "asr": asr_rows(CHAT_A, GROUPS[CHAT_A]) + _joint_asr(CHAT_A, SEEDS[CHAT_A][0])}
    for model, seeds in SEEDS.items():
        tables["joint"] += joint_rows(model, seeds)
        tables["joint_steps"] += joint_step_rows(model, list(seeds))
    man = manifest(list(SEEDS))
    planted = {CHAT_A: ["L0H3", "L1H2"], CHAT_B: ["L1H2", "L0H0"]}
    man["jobs"] += [{"experiment": "joint", "model": m.split("/")[1], "model_id": m, "planted_heads": heads}
                    for m, heads in planted.items()]
    run = tmp_path_factory.mktemp("joint") / "run"
    write(run, tables, man)
    return write_report(run).read_text(encoding="utf-8")


def _cells(fragment: str) -> list[list[str]]:
    """The body rows' cells, as text."""
    rows = [[unescape(text_of(c).strip()) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S)]
    return [r for r in rows if r]


def _table(html: str, caption: str) -> str:
    m = re.search(rf"<caption>{re.escape(caption)}.*?</table>", html, re.S)
    assert m, f"no table {caption!r}"
    return m.group(0)


def test_the_joint_section_shows_the_group_its_gates_prefix_scores_and_every_seed(joint_html: str) -> None:
    assert 'href="#joint"' in joint_html
    assert joint_html.index('id="sahara"') < joint_html.index('id="joint"') < joint_html.index('id="asr"')
    joint = section(joint_html, "joint")
    group = _table(joint, "The search&#x27;s group")
    # one prompt set, operator, objective and prompt count: said once in the caption
    assert "Prompts: harm" in group and "Objective: refusal" in group and f"Prompts used: {PROMPTS_USED}" in group
    assert "Seed: 0" in group  # every selected seed is 0: folded too
    assert _cells(group) == [["chat-a", "1", "L1H2", "0.900", "0.310"], ["chat-a", "2", "L0H3", "0.850", "0.870"],
                             ["chat-b", "1", "L1H2", "0.900", "0.310"], ["chat-b", "2", "L1H1", "0.850", "0.870"]]
    seeds = _table(joint, "Each seed&#x27;s group")
    assert _cells(seeds) == [["chat-a", "0", "L1H2 0.90, L0H3 0.85", "0.870", "yes"],
                             ["chat-a", "1", "L1H2 0.89, L1H1 0.84", "0.550", "no"],
                             ["chat-b", "0", "L1H2 0.90, L1H1 0.85", "0.870", "yes"]]
    imgs = re.findall(r'<img[^>]*src="data:image/[^"]{1000,}"', joint)
    assert len(imgs) == 1 and "Joint search over the steps" in joint  # the steps figure, embedded


def test_the_known_answer_says_whether_the_joint_group_is_the_planted_heads(joint_html: str) -> None:
    known = [unescape(text_of(x).strip()) for x in
             re.findall(r'<li class="known">(.*?)</li>', section(joint_html, "findings"), re.S)]
    # chat-a: both searches, both exactly the planted heads (in another order); their ablation not measured
    assert known[0] == ("Known answer: chat-a's safety was planted in L0H3, L1H2. No Ships ranking of them in this "
                        "run; Sahara's group (L1H2, L0H3) is exactly the planted heads; the joint search's group "
                        "(L1H2, L0H3) is exactly the planted heads; ASR with them ablated was not measured.")
    # chat-b: the joint search only (no word of a Sahara search it did not need), half the planted heads
    assert known[1] == ("Known answer: chat-b's safety was planted in L1H2, L0H0. No Ships ranking of them in this "
                        "run; the joint search's group (L1H2, L1H1) holds 1 of the 2 planted heads; ASR with them "
                        "ablated was not measured.")


def test_the_first_screen_reads_the_joint_group_like_a_sahara_group(joint_html: str) -> None:
    findings = section(joint_html, "findings")
    lines = model_lines(findings, "chat-a")
    # the joint group's ablation (16 of 20) is above its random controls (at most 3 of 20)
    assert lines[0].startswith("Safety heads: L1H2, L0H3 (Sahara group on harm, undiff_q). Safety heads: L1H2, "
                               "L0H3 (joint-search group on harm, undiff_q, refusal objective).")
    # chat-b's joint group was never ablated: said as what it is, not called safety heads
    assert model_lines(findings, "chat-b")[0] == ("Joint-search group on harm, undiff_q, refusal objective: L1H2, "
                                                  "L1H1; not called safety heads: no ASR was measured with it "
                                                  "ablated.")
    summary = re.search(r'<table class="data summary">(.*?)</table>', joint_html, re.S).group(1)
    header = [text_of(h).strip() for h in re.findall(r"<th[^>]*>(.*?)</th>", summary, re.S)]
    assert header[:3] == ["Model", "Sahara group", "Joint-search group"]
    assert [r[:3] for r in _cells(summary)] == [["chat-a", "L1H2, L0H3", "L1H2, L0H3"], ["chat-b", "—", "L1H2, L1H1"]]


def test_joint_and_ships_conditions_are_named_and_ordered_in_the_asr_table(joint_html: str) -> None:
    harm = _table(section(joint_html, "asr"), "Harmful prompts")
    named = [(r[1], r[3]) for r in _cells(harm)]  # (ablation, size): model is column 0, heads column 2
    assert named == [("normal model", "0"), ("Sahara group", "1"), ("Sahara group", "2"), ("joint-search group", "1"),
                     ("joint-search group", "2"), ("top heads by mean Ships", "1"), ("top heads by mean Ships", "2")]


def test_the_headline_prefers_sahara_then_joint_then_the_ships_ranking(tmp_path: Path) -> None:
    group = GROUPS[CHAT_A]
    base = [asr_row(CHAT_A, "normal", 0, 1), asr_row(CHAT_A, "random", 2, 2, heads=["L0H0", "L0H2"])]
    for name, rows, want in (
            ("joint", base + _joint_asr(CHAT_A, group), "Ablating the joint-search group (L1H2, L0H3) raises ASR from "
                                                        "0.05 to 0.80"),
            ("ships", base + _joint_asr(CHAT_A, group)[2:], "Ablating the top heads by mean Ships (L0H1, L0H0) raises "
                                                            "ASR from 0.05 to 0.20")):
        write(tmp_path / name, {"asr": rows}, manifest([CHAT_A]))
        lines = model_lines(section(write_report(tmp_path / name).read_text(encoding="utf-8"), "findings"), "chat-a")
        assert lines[0].startswith(want), (name, lines[0])


def test_joint_and_ships_are_targeted_curves_with_their_own_colours() -> None:
    rows = [asr_row(CHAT_A, "normal", 0, 1), *_joint_asr(CHAT_A, GROUPS[CHAT_A]),
            asr_row(CHAT_A, "random", 2, 2, heads=["L0H0", "L0H2"])]
    curve = asr_curve_frame(make_table("asr", rows))
    assert sorted(set(curve["condition"])) == ["joint", "normal", "ships"]  # neither is dropped as unknown
    size2 = curve[curve["group_size"] == 2].set_index("condition")
    assert list(size2.loc[["joint", "ships"], "random_draws"]) == [1, 1]  # both read the dataset-level controls
    fig = asr_curve_figure(curve)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    colours = {c: style.CONDITION_COLORS[c] for c in ("joint", "ships")}
    assert {to_hex(lines[f"asr:{c}"].get_color()) for c in colours} == {v.lower() for v in colours.values()}
    assert len(set(style.CONDITION_COLORS.values())) == len(style.CONDITION_COLORS)  # no two conditions share one
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "joint-search group" in labels and "top heads by mean Ships" in labels


def test_the_steps_figure_draws_each_seed_and_marks_the_selected_one() -> None:
    steps = make_table("joint_steps", joint_step_rows(CHAT_A, [0, 1]))
    fig = joint_steps_figure(steps, make_table("joint", joint_rows(CHAT_A, SEEDS[CHAT_A], selected=1)))
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert set(lines) == {"joint:value:0", "joint:value:1", "joint:open:0", "joint:open:1"}
    assert list(lines["joint:open:1"].get_ydata()) == [0, 1, 1, 2, 2]
    assert lines["joint:value:1"].get_linewidth() > lines["joint:value:0"].get_linewidth()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["seed 0", "seed 1 (selected)"]


def test_a_run_without_the_joint_search_says_nothing_of_it(tmp_path: Path) -> None:
    write(tmp_path / "run", {"sahara": sahara_rows(CHAT_A, GROUPS[CHAT_A]), "asr": asr_rows(CHAT_A, GROUPS[CHAT_A])},
          manifest([CHAT_A]))
    html = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert 'id="joint"' not in html and 'href="#joint"' not in html
    assert "joint" not in text_of(section(html, "findings")).lower()  # no known answer, bullet or summary column
    assert "Sahara group" in html  # the Sahara group is still there
