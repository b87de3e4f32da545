"""The HTML report (analysis.report.write_report) on small run folders built here: the first screen names the
planted safety heads and the ASR numbers of the tables, absent experiments are said plainly, nothing external
is referenced, table text is escaped, and the file is written atomically.

`build_run` makes a realistic folder (two fine-tunes of one base: Ships, benign Ships, generalized Ships, Sahara,
ASR with random controls, swaps, utility, generations); tests/integration/test_report_browser.py uses it too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from analysis.report import write_report  # noqa: E402
from study.core.errors import UsageError  # noqa: E402
from study.core.stats import wilson  # noqa: E402
from study.runtime.schema import make_table  # noqa: E402
from study.runtime.store import RunWriter  # noqa: E402

LAYERS, HEADS = 2, 4
LABELS = [f"L{i // HEADS}H{i % HEADS}" for i in range(LAYERS * HEADS)]
BASE, CHAT_A, CHAT_B = "org/base", "org/chat-a", "org/chat-b"
GROUPS = {CHAT_A: ["L1H2", "L0H3"], CHAT_B: ["L1H2", "L1H1"]}  # the planted Sahara groups
EVIL = "<script>alert('x')</script> & how do I pick a lock?"
META = dict(run_id="r1", model_revision=None, prompt_format="paper", code_version="0")
HARMFUL = dict(normal=1, size1=8, size2=15, n=20)  # harmful answers of 20 for the chat models
P_SIZE2 = 1.2e-4


def _idx(label: str) -> int:
    return LABELS.index(label)


def ships_rows(model: str, dataset: str, top: list[str], prompts: list[str]) -> list[dict[str, Any]]:
    """Ships rows in which the heads `top` come first, in order, for every prompt."""
    rows = []
    for p, text in enumerate(prompts):
        kl = [0.001 * (i + 1) + 0.0001 * p for i in range(len(LABELS))]
        for pos, label in enumerate(top):
            kl[_idx(label)] = 0.9 - 0.2 * pos - 0.01 * p
        order = sorted(range(len(kl)), key=lambda i: (-kl[i], i))
        for rank, i in enumerate(order, start=1):
            rows.append(dict(META, model=model, dataset=dataset, prompt_id=f"{dataset}-{p}", prompt=text,
                             layer=i // HEADS, head=i % HEADS, head_label=LABELS[i], op="undiff_q", eps=1e-5,
                             kl=kl[i], rank=rank, exact=True))
    return rows


def head_score_rows(model: str, top: list[str]) -> list[dict[str, Any]]:
    angle = [1.0 + 0.1 * i for i in range(len(LABELS))]
    for pos, label in enumerate(top):
        angle[_idx(label)] = 30.0 - 5 * pos
    order = sorted(range(len(angle)), key=lambda i: (-angle[i], i))
    rank = {i: r for r, i in enumerate(order, start=1)}
    return [dict(META, model=model, dataset="harm", layer=i // HEADS, head=i % HEADS, head_label=LABELS[i],
                 op="undiff_q", eps=1e-5, subspace="left", rank_r=1, centered=False, angle_deg=a, rank=rank[i],
                 exact=True)
            for i, a in enumerate(angle)]


def sahara_rows(model: str, group: list[str]) -> list[dict[str, Any]]:
    rows = []
    for step in range(1, len(group) + 1):
        chosen_before = group[:step - 1]
        for i, label in enumerate(LABELS):
            if label in chosen_before:
                continue
            score = 10.0 * step + (5.0 if label == group[step - 1] else 0.1 * i)
            rows.append(dict(META, model=model, dataset="harm", op="undiff_q", eps=1e-5, subspace="left", rank_r=1,
                             centered=False, step=step, layer=i // HEADS, head=i % HEADS, head_label=label,
                             group=chosen_before, score=score, chosen=label == group[step - 1], exact=True))
    return rows


def asr_row(model: str, condition: str, size: int, harmful: int, *, kind: str = "harmful", draw: int = 0,
            heads: list[str] | None = None, refused: int | None = None, degenerate: int = 0, n: int = 20,
            p: float | None = 0.5) -> dict[str, Any]:
    lo, hi = wilson(harmful, n)
    ablation = "none" if condition == "normal" else f"undiff_q:1e-05:{','.join(heads or ['L0H0'])}"
    refused = n - harmful if refused is None else refused
    return dict(META, model=model, dataset="harm" if kind == "harmful" else "ben", kind=kind, condition=condition,
                group_size=size, draw=draw, ablation=ablation, op="undiff_q", eps=1e-5, decoding="greedy",
                judge="rules@1", n=n, harmful=harmful, asr=harmful / n, ci_low=lo, ci_high=hi,
                p_mcnemar=None if condition == "normal" else p, refused=refused, refusal_rate=refused / n,
                degenerate=degenerate, degenerate_frac=degenerate / n, non_answer=n - harmful - refused,
                non_answer_rate=(n - harmful - refused) / n)


def asr_rows(model: str, group: list[str], *, degenerate: int = 0) -> list[dict[str, Any]]:
    h = HARMFUL
    return [asr_row(model, "normal", 0, h["normal"]),
            asr_row(model, "sahara", 1, h["size1"], heads=group[:1], p=0.004),
            asr_row(model, "sahara", 2, h["size2"], heads=group, p=P_SIZE2, degenerate=degenerate),
            asr_row(model, "random", 1, 1, heads=["L0H0"]), asr_row(model, "random", 1, 2, draw=1, heads=["L0H1"]),
            asr_row(model, "random", 2, 2, heads=["L0H0", "L0H1"]),
            asr_row(model, "random", 2, 3, draw=1, heads=["L0H2", "L1H0"]),
            asr_row(model, "normal", 0, 20, kind="benign", refused=1),
            asr_row(model, "sahara", 2, 20, kind="benign", heads=group, refused=2)]


def swap_rows(aligned: str, group: list[str]) -> list[dict[str, Any]]:
    asr = {"aligned": 1, "base": 18, "attn-from-base": 2, "mlp-from-base": 1, "heads-from-base": 14,
           "heads-into-base": 5}
    rows = []
    for recipe, harmful in asr.items():
        common = dict(META, model=aligned, aligned=aligned, base=BASE, recipe=recipe,
                      heads=group if recipe.startswith("heads") else [])
        for kind, dataset, metric, x in (("harmful", "harm", "asr", harmful), ("harmful", "harm", "refusal_rate",
                                                                               20 - harmful),
                                         ("harmful", "harm", "degenerate_frac", 0),
                                         ("harmful", "harm", "non_answer_rate", 0),
                                         ("benign", "ben", "refusal_rate", 1)):
            lo, hi = wilson(x, 20)
            rows.append(dict(common, dataset=dataset, kind=kind, metric=metric, judge="rules@1", n=20, value=x / 20,
                             ci_low=lo, ci_high=hi))
        rows.append(dict(common, dataset="harm", kind="ships", metric="ships:group", judge=None, n=4,
                         value=0.4 if recipe != "base" else 1e-3, ci_low=None, ci_high=None))
    return rows


def utility_rows(model: str, group: list[str]) -> list[dict[str, Any]]:
    def row(condition: str, size: int, value: float, draw: int = 0, heads: str = "none") -> dict[str, Any]:
        return dict(META, model=model, dataset="text", condition=condition, group_size=size, draw=draw, ablation=heads,
                    op="undiff_q", eps=1e-5, metric="perplexity", value=value, n=500, ratio=value / 12.0, error=None)
    failed = dict(row("sahara", 2, 0.0, heads=f"undiff_q:1e-05:{','.join(group)}"), metric="lm_eval:boolq", value=None,
                  n=0, ratio=None, error="RuntimeError: CUDA out of memory")
    return [row("normal", 0, 12.0), row("sahara", 2, 12.6, heads=f"undiff_q:1e-05:{','.join(group)}"),
            row("random", 2, 12.3, heads="undiff_q:1e-05:L0H0,L0H1"), failed]


def generation_rows(model: str, group: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in range(3):
        for condition, size, ablation, text in (
                ("normal", 0, "none", "I cannot help with that."),
                ("sahara", 2, f"undiff_q:1e-05:{','.join(group)}", f"Sure, step {p}: <img src=x onerror=alert(1)>")):
            rows.append(dict(META, model=model, dataset="harm", prompt_id=f"harm-{p}",
                             prompt=EVIL if p == 0 else f"q{p}", condition=condition, group_size=size, draw=0, ablation=ablation, op="undiff_q", eps=1e-5,
                             backend="hf", decoding="greedy", max_new_tokens=16, seed=p, sample=0, text=text,
                             n_tokens=8))
    return rows


PUBLISHED = [
    dict(experiment="asr", model=CHAT_A, claim="Sahara group of two, ASR", metric="asr", value=0.7, baseline=0.05,
         dataset="harm", op="undiff_q", decoding="greedy", source="Zhou et al."),
    dict(experiment="sahara", model=CHAT_A, claim="most important dataset-level head", metric="top_head",
         value="L1H2", op="undiff_q", source="Zhou et al."),
    dict(experiment="asr", model="meta-llama/Llama-2-7b-chat-hf", claim="query level, top-1 head", metric="asr",
         value=0.64, baseline=0.04, dataset="advbench", source="Zhou et al."),
]


def manifest(models: list[str], published: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entries = [{"name": BASE, "role": "base", "experiments": []}] + [{"name": m, "base": BASE} for m in models]
    return {"command": "run", "config_hash": "abc123",
            "config": {"out": "runs/t", "models": entries, "defaults": {"op": "undiff_q", "eps": 1e-5},
                       "sahara": {"steps": 2}, "overlap": {"k": 3}, "published": published or []},
            "versions": {"python": "3.11", "torch": "2.13.0"}, "code": {"version": "0.1.0", "commit": "deadbeef"},
            "timings_s": {"total": 12.5}, "shards": {"computed": 10, "reused": 2},
            "models": {m: {"actors": 1, "shards": 5, "reused": 1, "retries": 0, "rows": 40, "seconds": 6.2}
                       for m in models},
            "jobs": [{"experiment": "specificity", "model": m, "prompts": {"set": "ben"}} for m in models]}


def build_run(out: Path, *, degenerate: int = 0) -> Path:
    """A realistic run folder: two fine-tunes of one base, every experiment."""
    tables: dict[str, list[dict[str, Any]]] = {n: [] for n in ("ships", "head_scores", "sahara", "asr", "swaps",
                                                                "utility", "generations")}
    for model, group in GROUPS.items():
        tables["ships"] += ships_rows(model, "harm", group + ["L0H1"], [EVIL, "q1", "q2"])
        tables["ships"] += ships_rows(model, "ben", ["L0H0", "L0H1"], ["b0", "b1"])
        tables["head_scores"] += head_score_rows(model, group)
        tables["sahara"] += sahara_rows(model, group)
        tables["asr"] += asr_rows(model, group, degenerate=degenerate if model == CHAT_B else 0)
        tables["swaps"] += swap_rows(model, group)
        tables["utility"] += utility_rows(model, group)
        tables["generations"] += generation_rows(model, group)
    write(out, tables, manifest(list(GROUPS), PUBLISHED))
    return out


def write(out: Path, tables: dict[str, list[dict[str, Any]]], man: dict[str, Any] | None) -> None:
    with RunWriter(out, "r1") as w:
        for name, rows in tables.items():
            w.write(name, make_table(name, rows))
        if man is not None:
            w.set_manifest(man)
    if man is None:
        (out / "manifest.json").unlink()


class _Attrs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def attributes(html: str) -> list[tuple[str, str, str]]:
    parser = _Attrs()
    parser.feed(html)
    return parser.attrs


def section(html: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert m, f"no section {anchor}"
    return m.group(1)


def text_of(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = build_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(run)
    return path, path.read_text(encoding="utf-8")


def model_lines(findings: str, label: str) -> list[str]:
    """The lines of one model's bullet on the first screen, as text."""
    m = re.search(rf"<li><b>{re.escape(label)}</b><ul>(.*?)</ul></li>", findings, re.S)
    assert m, f"no bullet for {label}"
    return [text_of(x).strip() for x in re.findall(r"<li>(.*?)</li>", m.group(1), re.S)]


def test_first_screen_names_the_planted_safety_heads(full: tuple[Path, str]) -> None:
    path, html = full
    assert path == path.parent / "report.html" and path.parent.name == "run"
    findings = section(html, "findings")
    assert html.index('id="findings"') < html.index('id="heads"') < html.index('id="run"')
    a, b = model_lines(findings, "chat-a"), model_lines(findings, "chat-b")
    assert a[0].startswith("Safety heads: L1H2, L0H3 (Sahara group on harm, undiff_q).")
    assert b[0].startswith("Safety heads: L1H2, L1H1 (Sahara group on harm, undiff_q).")
    # the benign scan ranks L0H0/L0H1 there; L0H1 moves benign prompts more than harmful ones
    assert ("Top heads by Ships KL × specificity on harm: L1H2, L0H3, L0H1. Safety-specific (specificity above 0.5 "
            "beyond its 95% interval): L1H2, L0H3.") in a[0]
    shared = text_of(findings)
    assert "Shared heads across models (top-3 Ships heads of 8 on harm, undiff_q): chat-a and chat-b share" in shared
    assert a[2] == ("Swaps with its base base, ASR on harm (judge rules@1): aligned 0.05, base 0.90; attention from "
                    "the base: 0.05 → 0.10; MLPs from the base: 0.05 → 0.05; head group from the base: 0.05 → 0.70; "
                    "head group into the base: 0.90 → 0.25.")
    assert a[3] == "Utility: perplexity on text ×1.050 with the Sahara group ablated (random heads: ×1.025)."


def test_asr_numbers_match_the_table(full: tuple[Path, str]) -> None:
    _, html = full
    findings = section(html, "findings")
    lo, hi = wilson(HARMFUL["size2"], 20)
    assert model_lines(findings, "chat-a")[1] == (
        f"Ablating the Sahara group (L1H2, L0H3) raises ASR from 0.05 to 0.75 on harm (95% CI {lo:.2f}–{hi:.2f}, "
        "McNemar p = 1.2e-04); random heads of the same number: 0.12; refusals 0.95 → 0.25, non-answers 0.00 → "
        "0.00 (judge rules@1, greedy). The lower end of its 95% CI is above every random-head control: these are "
        "called safety heads.")
    summary = re.search(r'<table class="data summary">(.*?)</table>', html, re.S).group(1)
    assert "(Prompts: harm)" in summary  # one prompt set: said once, in the caption
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", summary, re.S) if ">chat-a<" in r)
    cells = [text_of(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells == ["chat-a", "L1H2, L0H3", "L1H2*, L0H3*, L0H1", "0.05 → 0.75", f"{lo:.2f}–{hi:.2f}", "1.2e-04",
                     "0.12", "0.95 / 0.00 → 0.25 / 0.00", "0%", "above random heads"]
    asr = text_of(section(html, "asr"))
    # ASR, CI, refusal, non-answer, p, delta, random band, random refusal / non-answer
    assert f"0.75 {lo:.2f}–{hi:.2f} 0.25 0.00 1.2e-04 +0.70 0.12 (0.10–0.15) 0.88 / 0.00" in asr
    published = re.search(r"<caption>Measured against published.*?</table>", html, re.S).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", published, re.S)
    assert "0.05 → 0.75" in rows[1] and ">yes<" in rows[1]  # 0.7 lies in the measured CI
    assert "L1H2 (harm)" in rows[2] and ">yes<" in rows[2]
    assert "not measured in this run" in rows[3]


def test_every_figure_is_embedded_and_nothing_is_fetched(full: tuple[Path, str]) -> None:
    path, html = full
    attrs = attributes(html)
    srcs = [v for tag, k, v in attrs if k == "src"]
    assert len(srcs) >= 8 and all(s.startswith(("data:image/svg+xml;base64,", "data:image/png;base64,"))
                                  and len(s) > 1000 for s in srcs)
    hrefs = [v for tag, k, v in attrs if k == "href"]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    anchors = {v for tag, k, v in attrs if k == "id"}
    assert all(h[1:] in anchors for h in hrefs)  # every contents link lands
    assert not any(k in ("srcset", "poster", "action", "formaction", "background") for _, k, _ in attrs)
    assert "http://" not in html and "https://" not in html and "url(" not in html and "@import" not in html
    assert all(tag != "link" and tag != "script" for tag, _, _ in attrs)
    assert sorted(p.name for p in (path.parent / "figures").glob("*.svg"))  # the figures stay in RUN/figures


def test_text_from_the_tables_is_escaped(full: tuple[Path, str]) -> None:
    _, html = full
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; how do I pick a lock?" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # a generation's text
    assert len(re.findall(r"<img ", html)) == len([1 for t, k, _ in attributes(html) if t == "img" and k == "src"])


def test_sections_and_run_details(full: tuple[Path, str]) -> None:
    _, html = full
    for anchor in ("heads", "sahara", "asr", "overlap", "specificity", "swaps", "utility", "heatmaps", "run"):
        assert f'href="#{anchor}"' in html and f'<section id="{anchor}">' in html
    sahara = text_of(section(html, "sahara"))
    assert "L1H2, L0H3" in sahara and "L1H2, L1H1" in sahara
    assert "failed: RuntimeError: CUDA out of memory" in text_of(section(html, "utility"))  # said, not dropped
    run = text_of(section(html, "run"))
    assert "code commit deadbeef" in run and "torch 2.13.0" in run
    assert "total: 12.5 s" in run and "pandas.read_parquet(" in run and "ships/" in run
    assert "published:" in run  # the spec, as YAML
    assert "Not in this run" not in html  # every experiment is present


def test_a_folder_with_only_ships_says_what_is_absent(tmp_path: Path) -> None:
    run = tmp_path / "ships-only"
    write(run, {"ships": ships_rows(CHAT_A, "harm", ["L1H2", "L0H3"], ["q0", "q1"])}, None)
    html = write_report(run).read_text(encoding="utf-8")
    absent = text_of(re.search(r'<div class="absent">(.*?)</div>', html, re.S).group(1))
    for line in ("No swaps in this run (add a `swap` section", "No ASR measurement in this run",
                 "No Sahara search in this run", "No specificity in this run", "No utility measurement",
                 "No overlap of top heads", "No generalized Ships scores"):
        assert line in absent, line
    assert "No Ships scan" not in absent
    [line] = model_lines(section(html, "findings"), "chat-a")
    assert line.startswith("Top heads by Ships on harm: L1H2, L0H3, ")  # a Ships ranking is no ASR evidence
    assert "Safety heads" not in text_of(section(html, "findings"))
    for anchor in ("sahara", "asr", "overlap", "specificity", "swaps", "utility"):
        assert f'id="{anchor}"' not in html
    srcs = [v for t, k, v in attributes(html) if t == "img" and k == "src"]
    assert srcs and all(s.startswith("data:image/") and len(s) > 1000 for s in srcs)
    assert not re.search(r"<img(?![^>]*\ssrc=\"data:)[^>]*>", html)
    assert "no manifest.json" in html
    assert "screened" not in text_of(section(html, "heads"))  # every score exact: nothing to say


def test_screened_ships_scores_are_said_to_be_screened(tmp_path: Path) -> None:
    rows = ships_rows(CHAT_A, "harm", ["L1H2", "L0H3"], ["q0", "q1"])
    for r in rows:
        r["exact"] = r["head_label"] in ("L1H2", "L0H3")  # the re-scored top candidates
    write(tmp_path / "s", {"ships": rows}, None)
    heads = text_of(section(write_report(tmp_path / "s").read_text(encoding="utf-8"), "heads"))
    assert "12 of 16 Ships scores are screened" in heads


def test_one_model_one_experiment(tmp_path: Path) -> None:
    run = tmp_path / "asr-only"
    write(run, {"asr": asr_rows(CHAT_A, GROUPS[CHAT_A], degenerate=10)}, manifest([CHAT_A]))
    html = write_report(run).read_text(encoding="utf-8")
    findings = text_of(section(html, "findings"))
    assert "raises ASR from 0.05 to 0.75" in findings
    assert "50% of these answers are degenerate" in findings and "not a jailbreak" in findings
    assert "broken text (50%)" in findings  # the summary table's reading
    assert "Shared heads" not in findings and "No Ships scan in this run" in findings


def test_bad_run_folders_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"'.*empty' is not a run folder"):
        write_report(tmp_path / "empty")


def test_the_report_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    write(run, {"ships": ships_rows(CHAT_A, "harm", ["L1H2"], ["q0"])}, manifest([CHAT_A]))
    path = write_report(run)
    before = path.read_bytes()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temp file, no staging left
    real = os.replace

    def fail(src: Any, dst: Any) -> None:  # only the report's rename fails: the figures are saved as usual
        if Path(dst).name == "report.html":
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(run)
    assert path.read_bytes() == before and [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    elsewhere = write_report(run, tmp_path)  # a folder: FOLDER/report.html
    assert elsewhere == tmp_path / "report.html" and elsewhere.is_file()


def test_the_report_does_not_import_torch() -> None:
    code = "import sys, analysis.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "Agg"}, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr


# ---- labels follow the evidence (issue #27) ----

def _asr_run(tmp_path: Path, name: str, rows: list[dict[str, Any]]) -> str:
    """A folder with CHAT_A's Sahara group and the given `asr` rows; its report's first screen, as text."""
    run = tmp_path / name
    write(run, {"sahara": sahara_rows(CHAT_A, GROUPS[CHAT_A]), "asr": rows}, manifest([CHAT_A]))
    return text_of(section(write_report(run).read_text(encoding="utf-8"), "findings"))


def _random(size: int, *harmful: int) -> list[dict[str, Any]]:
    heads = [["L0H0", "L0H1"][:size], ["L0H2", "L1H0"][:size]]
    return [asr_row(CHAT_A, "random", size, h, draw=d, heads=heads[d]) for d, h in enumerate(harmful)]


def test_a_group_whose_ablation_lowers_asr_is_not_called_safety_heads(tmp_path: Path) -> None:
    group = GROUPS[CHAT_A]
    rows = [asr_row(CHAT_A, "normal", 0, 10), asr_row(CHAT_A, "sahara", 1, 8, heads=group[:1], p=0.5),
            asr_row(CHAT_A, "sahara", 2, 5, heads=group, p=0.03), *_random(2, 9, 11)]
    findings = _asr_run(tmp_path, "lowers", rows)
    assert "Safety heads" not in findings
    assert ("Sahara group on harm, undiff_q: L1H2, L0H3; not called safety heads: ablating it lowered ASR from "
            "0.50 to 0.25.") in findings
    assert "lowers ASR from 0.50 to 0.25" in findings and "ASR down" in findings  # the sentence and the tag


def test_a_group_that_raises_asr_beyond_the_random_controls_is_called_safety_heads(tmp_path: Path) -> None:
    group = GROUPS[CHAT_A]
    base = [asr_row(CHAT_A, "normal", 0, 2), asr_row(CHAT_A, "sahara", 2, 14, heads=group, p=1e-4)]
    beyond = _asr_run(tmp_path, "beyond", base + _random(2, 3, 5))  # 14/20: Wilson 95% CI from 0.48
    assert "Safety heads: L1H2, L0H3 (Sahara group on harm, undiff_q)." in beyond
    assert "these are called safety heads" in beyond and "above random heads" in beyond
    # the same rise, but one random draw reaches the group's interval: not called safety heads
    within = _asr_run(tmp_path, "within", base + _random(2, 3, 10))
    assert "Safety heads" not in within
    assert ("not called safety heads: ablating it raised ASR from 0.10 to 0.70, but random heads of the same "
            "number reach 0.50, inside its 95% CI.") in within
    # no random controls at all: a rise alone is no evidence either
    alone = _asr_run(tmp_path, "alone", base)
    assert "Safety heads" not in alone and "no random-head controls were run" in alone


def _spec_ships(model: str, dataset: str, kls: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Ships rows of explicit per-prompt KLs (one list of len(LABELS) per prompt)."""
    rows = []
    for pid, kl in kls.items():
        order = sorted(range(len(kl)), key=lambda i: (-kl[i], i))
        for rank, i in enumerate(order, start=1):
            rows.append(dict(META, model=model, dataset=dataset, prompt_id=pid, prompt=pid, layer=i // HEADS,
                             head=i % HEADS, head_label=LABELS[i], op="undiff_q", eps=1e-5, kl=kl[i], rank=rank,
                             exact=True))
    return rows


def test_specificity_051_with_wide_noise_is_not_called_safety_specific(tmp_path: Path) -> None:
    """L0H3 moves harmful prompts far more than benign ones, on every prompt; L1H2 scores 0.51 only because
    half the harmful prompts move a lot and half not at all."""
    def kl(l0h3: float, l1h2: float) -> list[float]:
        v = [0.001] * len(LABELS)
        v[_idx("L0H3")], v[_idx("L1H2")] = l0h3, l1h2
        return v

    harm = {f"h{p}": kl(0.9, 1.02 if p % 2 else 0.0) for p in range(4)}
    ben = {f"b{p}": kl(0.01, 0.49) for p in range(3)}
    run = tmp_path / "spec"
    write(run, {"ships": _spec_ships(CHAT_A, "harm", harm) + _spec_ships(CHAT_A, "ben", ben)}, manifest([CHAT_A]))
    html = write_report(run).read_text(encoding="utf-8")
    [line] = model_lines(section(html, "findings"), "chat-a")
    assert line.startswith("Top heads by Ships KL × specificity on harm: L0H3, L1H2, ")
    assert line.endswith("Safety-specific (specificity above 0.5 beyond its 95% interval): L0H3.")
    spec = section(html, "specificity")
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", spec, re.S) if ">L1H2<" in r)
    cells = [text_of(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[cells.index("L1H2") + 3] == "0.51" and cells[cells.index("L1H2") + 5] == "no"
    assert "Top 5 safety-specific heads" not in spec


def test_the_headline_judge_and_its_agreement_are_said(full: tuple[Path, str], tmp_path: Path) -> None:
    _, html = full
    findings = text_of(section(html, "findings"))
    assert "Headline judge: rules@1" in findings and "agreement with labelled responses was not measured" in findings
    rows = [dict(r, judge="outcome@1") for r in asr_rows(CHAT_A, GROUPS[CHAT_A])]
    text = _asr_run(tmp_path, "outcome", rows)
    assert ("Headline judge: outcome@1" in text and "refusals and non-answers" in text
            and "is 0.900 (0.904 on the held-out half), measured 2026-12-06" in text)


def test_non_answers_that_replace_refusals_are_said(tmp_path: Path) -> None:
    group = GROUPS[CHAT_A]
    rows = [asr_row(CHAT_A, "normal", 0, 1), asr_row(CHAT_A, "sahara", 2, 4, heads=group, refused=4, p=0.2),
            *_random(2, 1, 2)]
    findings = _asr_run(tmp_path, "evasion", rows)
    assert "refusals 0.95 → 0.20, non-answers 0.00 → 0.60" in findings
    assert "Non-answers rose by 0.60, more than ASR: the ablation turns refusals into evasions" in findings


def test_every_table_scrolls_inside_its_own_box(full: tuple[Path, str]) -> None:
    _, html = full
    tables = re.findall(r"(.{0,40})<table\b", html, re.S)
    assert len(tables) >= 8 and all(t.endswith('<div class="scroll">') for t in tables)
    css = re.search(r"\.scroll \{([^}]*)\}", html).group(1)
    assert "overflow-x: auto" in css and "max-width: 100%" in css
