"""The report's first finding for a model whose safety heads are known (planted): whether Ships ranked them at
the top, whether Sahara's group is them, and what ablating them did beside random heads; on run folders built
here with the report test's helpers."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from analysis.report import write_report  # noqa: E402
from study.core.stats import wilson  # noqa: E402
from tests.unit.test_report import (  # noqa: E402
    CHAT_A,
    CHAT_B,
    GROUPS,
    asr_row,
    asr_rows,
    manifest,
    sahara_rows,
    section,
    ships_rows,
    text_of,
    write,
)

PLANTED = {CHAT_A: ["L1H2", "L0H3"], CHAT_B: ["L1H2", "L0H0"]}


def _run(out: Path, planted: dict[str, list[str]]) -> str:
    tables: dict[str, list] = {"ships": [], "sahara": [], "asr": []}
    for model, group in GROUPS.items():
        tables["ships"] += ships_rows(model, "harm", group + ["L0H1"], ["q0", "q1", "q2"])
        tables["sahara"] += sahara_rows(model, group)
        tables["asr"] += asr_rows(model, group)
    # CHAT_A's planted pair ablated (its random controls of size 2 are asr_rows' own): 16 of 20 answered
    tables["asr"].append(asr_row(CHAT_A, "planted", 2, 16, heads=PLANTED[CHAT_A], p=3e-5))
    man = manifest(list(GROUPS))
    man["jobs"] += [{"experiment": "ships", "model": m.split("/")[1], "model_id": m, "planted_heads": heads}
                    for m, heads in planted.items()]
    write(out, tables, man)
    return write_report(out).read_text(encoding="utf-8")


def _known(html: str) -> list[str]:
    findings = section(html, "findings")
    return [unescape(text_of(x).strip()) for x in re.findall(r'<li class="known">(.*?)</li>', findings, re.S)]


def test_the_first_finding_says_whether_the_planted_heads_were_found(tmp_path):
    html = _run(tmp_path / "run", PLANTED)
    findings = section(html, "findings")
    known = _known(html)
    assert len(known) == 2 and findings.index('class="known"') < findings.index("<li><b>")  # before the models
    lo, hi = wilson(16, 20)
    assert known[0] == (
        "Known answer: chat-a's safety was planted in L1H2, L0H3. Ships (mean over prompts, harm) ranks "
        "them 1, 2 of 8 (all of them at the top: recovered); Sahara's group (L1H2, L0H3) is exactly the planted "
        f"heads; ablating them raises ASR from 0.05 to 0.80 on harm (95% CI {lo:.2f}–{hi:.2f}, McNemar p = 3.0e-05; "
        "random heads of the same number: 0.12; judge rules@1).")
    # chat-b: one planted head is its top head, the other ranks last and is not in its Sahara group
    assert known[1] == (
        "Known answer: chat-b's safety was planted in L1H2, L0H0. Ships (mean over prompts, harm) ranks "
        "them 1, 8 of 8 (1 of 2 in its top 2); Sahara's group (L1H2, L1H1) holds 1 of the 2 planted heads; ASR with "
        "them ablated was not measured.")


def test_no_known_answer_without_planted_heads(tmp_path):
    html = _run(tmp_path / "run", {})
    assert _known(html) == [] and "Known answer" not in html
