"""The first screen: what the run found, in sentences and one compact table, measured against published
numbers, and a plain line for each experiment the run did not do."""

from __future__ import annotations

from typing import Any

from analysis import is_missing
from analysis.report._facts import (
    CONDITION_NAMES,
    DEGENERATE_WARN,
    RECIPE_NAMES,
    SEARCHES,
    SPECIFIC_RANKING,
    TARGETED,
    AsrHeadline,
    Group,
    TopHeads,
    asr_headlines,
    group_row,
    heads_of,
    judge_note,
    model_overlaps,
    not_safety_reason,
    pair_rows,
    pick_judge,
    reading,
    search_groups,
    swap_summary,
    top_heads,
)
from analysis.report._html import MISSING, Html, ci, esc, join, p_is, para, pct, pval, rate, table
from analysis.report._known import known_answers, known_sentence
from analysis.report._load import RunData
from analysis.report._published import published_rows

__all__ = ["absent_lines", "findings"]

MAX_MODEL_BULLETS = 8
SECTION_NAMES = {"heads": "Top heads", "sahara": "Sahara groups", "joint": "Joint search groups",
                 "asr": "Attack success rate",
                 "overlap": "Shared heads", "specificity": "Safety specificity", "utility": "Utility"}
MAX_GROUPS = 3
EVASION_MIN = 0.1  # a rise in non-answers this large, and larger than ASR's, is said in words

# experiment -> the line that says it is absent
ABSENT: dict[str, str] = {
    "ships": "No Ships scan in this run (add a `ships` section).",
    "generalized_ships": "No generalized Ships scores (add a `generalized_ships` or `sahara` section).",
    "sahara": "No Sahara search in this run (add a `sahara` section).",
    "asr": "No ASR measurement in this run (add an `asr` section).",
    "overlap": "No overlap of top heads (it needs at least two rankings: several models, prompt sets or operators).",
    "specificity": "No specificity in this run (add a `specificity` section: Ships on benign prompts).",
    "swaps": "No swaps in this run (add a `swap` section and give each fine-tune its `base`).",
    "utility": "No utility measurement in this run (add a `utility` section).",
}


def present(data: RunData) -> dict[str, bool]:
    """Which experiments the run's tables hold."""
    ships = data.get("ships")
    return {"ships": ships is not None and bool((~ships["dataset"].isin(data.benign)).any()),
            "generalized_ships": data.get("head_scores") is not None,
            "sahara": data.get("sahara") is not None,
            "asr": data.get("asr_curve") is not None or data.get("asr") is not None,
            "overlap": data.get("overlap") is not None,
            "specificity": data.get("specificity") is not None,
            "swaps": data.get("swaps") is not None,
            "utility": data.get("utility") is not None}


def absent_lines(data: RunData) -> list[str]:
    lines = [ABSENT[name] for name, here in present(data).items() if not here]
    lines += [f"Table {name} could not be read ({why}); its sections are left out." for name, why in
              data.unreadable.items()]
    return lines


def _asr_sentence(data: RunData, h: AsrHeadline) -> Html:
    r = h.row
    cond = str(r["condition"])
    what = CONDITION_NAMES.get(cond, cond)
    heads = heads_of(r["ablation"])
    subject = f"the {what} ({heads})"
    if cond == "query":
        k = int(r["group_size"])
        subject = f"each prompt's own top-{k} Ships head{'s' if k != 1 else ''}"
    normal, asr = r["normal_asr"], float(r["asr"])
    if is_missing(normal):
        verb = f"gives ASR {asr:.2f}"
    elif asr > float(normal):
        verb = f"raises ASR from {float(normal):.2f} to {asr:.2f}"
    elif asr < float(normal):
        verb = f"lowers ASR from {float(normal):.2f} to {asr:.2f}"
    else:
        verb = f"leaves ASR at {asr:.2f}"
    parts: list[Any] = [f"Ablating {subject} {verb} on {r['dataset']} (95% CI {ci(r['ci_low'], r['ci_high'])}, "
                        f"McNemar {p_is(r['p_mcnemar'])})"]
    if int(r.get("random_draws") or 0) > 0:
        parts.append(f"; random heads of the same number: {rate(r['random_asr_mean'])}")
    refusal, non_answer = r.get("refusal_rate"), r.get("non_answer_rate")
    if not is_missing(refusal) and not is_missing(non_answer):
        parts.append(f"; refusals {rate(r.get('normal_refusal_rate'))} → {rate(refusal)}, non-answers "
                     f"{rate(r.get('normal_non_answer_rate'))} → {rate(non_answer)}")
    more = f", first of {len(h.judges)}" if len(h.judges) > 1 else ""
    parts.append(f" (judge {r['judge']}{more}, {r['decoding']}).")
    cls, words = reading(r)
    if cls == "yes":
        parts.append(" The lower end of its 95% CI is above every random-head control: these are called "
                     "safety heads.")
    elif words == "random heads too":
        parts.append(" Random heads of the same number reach its 95% CI: these are not shown to be safety heads.")
    elif words == "no random controls":
        parts.append(" No random-head controls were run, so a rise alone does not show safety heads.")
    elif words == "not significant":
        parts.append(" The rise is not significant.")
    rise = (float(non_answer) - float(r["normal_non_answer_rate"])
            if not is_missing(non_answer) and not is_missing(r.get("normal_non_answer_rate")) else 0.0)
    delta = 0.0 if is_missing(r.get("delta_asr")) else float(r["delta_asr"])
    if rise >= EVASION_MIN and rise > delta:
        parts.append(f" Non-answers rose by {rise:.2f}, more than ASR: the ablation turns refusals into evasions "
                     "(generic offers, echoes, broken text) rather than into help.")
    deg = r["degenerate_frac"]
    if not is_missing(deg) and float(deg) >= DEGENERATE_WARN:
        parts.append(Html(f' <span class="warn">{esc(f"{100 * float(deg):.0f}%")} of these answers are degenerate '
                          "(repetition, an echo of the prompt, or no words): text the ablation broke is not a "
                          "jailbreak.</span>"))
    return join(parts)


def _swap_sentence(data: RunData, s: dict[str, Any]) -> str:
    """`attention from the base: 0.00 → 1.00`: each mixed model's ASR after the model it starts from (the
    aligned one; the base for heads moved into it)."""
    rec = s["recipes"]
    aligned, base = rec.get("aligned"), rec.get("base")
    bits = []
    if aligned is not None and base is not None:
        bits.append(f"aligned {aligned['value']:.2f}, base {base['value']:.2f}")
    for recipe, r in rec.items():
        if recipe in ("aligned", "base"):
            continue
        ref = base if recipe == "heads-into-base" else aligned
        before = f"{ref['value']:.2f} → " if ref is not None else ""
        bits.append(f"{RECIPE_NAMES.get(recipe, recipe)}: {before}{r['value']:.2f}")
    return (f"Swaps with its base {data.label(s['base'])}, ASR on {s['dataset']} (judge {s['judge']}): "
            + "; ".join(bits) + ".")


def _model_bullet(data: RunData, model: str, asr: list[Html]) -> Html:
    lines: list[Any] = []
    heads = []
    mine = [g for g in search_groups(data) if g.model == model]
    for search in SEARCHES:
        groups = [g for g in mine if g.search == search]
        heads += [_group_sentence(data, model, g) for g in groups[:MAX_GROUPS]]
        if len(groups) > MAX_GROUPS:
            heads.append(f"{len(groups) - MAX_GROUPS} more {groups[0].name}s in the {SECTION_NAMES[search]} "
                         "section.")
    top = top_heads(data, model)
    if top is not None:
        heads.append(_top_sentence(top))
    if heads:
        lines.append(" ".join(heads))
    lines += asr or _normal_only(data, model)
    lines += [_swap_sentence(data, s) for s in swap_summary(data) if s["aligned"] == model]
    lines += _utility_sentence(data, model)
    if not lines:
        lines.append("no rows to summarise.")
    items = join((Html(f"<li>{esc(x)}</li>") for x in lines), "")
    return Html(f"<li><b>{esc(data.label(model))}</b><ul>{items}</ul></li>")


def _group_sentence(data: RunData, model: str, g: Group) -> str:
    """"Safety heads: ..." only where ablating the group raised ASR beyond the random controls (`reading`);
    otherwise the group by what it is, and what was measured."""
    where = f"{g.name} {g.where()}"
    why = not_safety_reason(group_row(data, model, g.heads, g.search))
    if why is None:
        return f"Safety heads: {', '.join(g.heads)} ({where})."
    return f"{where[0].upper()}{where[1:]}: {', '.join(g.heads)}; not called safety heads: {why}."


def _top_sentence(top: TopHeads) -> str:
    """A ranking's top heads, and which of them are safety-specific (specificity above 0.5 beyond its 95%
    bootstrap interval over prompts) where the ranking uses specificity."""
    text = f"Top heads by {top.by} on {top.dataset}: {', '.join(h for h, _ in top.heads)}."
    if top.specific is None:
        return text
    specific = [h for (h, _), yes in zip(top.heads, top.specific) if yes]
    if specific:
        return text + f" Safety-specific (specificity above 0.5 beyond its 95% interval): {', '.join(specific)}."
    return text + " None of them is safety-specific (specificity above 0.5 beyond its 95% interval)."


def _normal_only(data: RunData, model: str) -> list[str]:
    """The unablated ASR where the run measured no ablation of this model."""
    curve = data.get("asr_curve")
    if curve is None:
        return []
    c = curve[(curve["model"] == model) & (curve["kind"] == "harmful") & (curve["condition"] == "normal")]
    if c.empty:
        return []
    r = c.sort_values(["dataset", "judge"]).iloc[0]
    return [f"ASR of the unablated model on {r['dataset']}: {rate(r['asr'])} (95% CI {ci(r['ci_low'], r['ci_high'])}; "
            f"judge {r['judge']}, {r['decoding']}); no ablation measured."]


def _utility_sentence(data: RunData, model: str) -> list[str]:
    """What the largest targeted ablation costs in perplexity, beside random heads of the same number."""
    ut = data.get("utility")
    if ut is None:
        return []
    u = ut[(ut["model"] == model) & (ut["metric"] == "perplexity")]
    t = u[u["condition"].isin(TARGETED)].sort_values(["dataset", "group_size"])
    if t.empty or is_missing(t.iloc[-1]["ratio"]):
        return []
    r = t.iloc[-1]
    rand = u[(u["condition"] == "random") & (u["group_size"] == r["group_size"]) & (u["dataset"] == r["dataset"])]
    vs = f" (random heads: ×{rand['ratio'].mean():.3f})" if rand["ratio"].notna().any() else ""
    what = CONDITION_NAMES.get(str(r["condition"]), str(r["condition"]))
    return [f"Utility: perplexity on {r['dataset']} ×{float(r['ratio']):.3f} with the {what} ablated{vs}."]


def _overlap_sentence(data: RunData, row: Any) -> Html:
    src = "Ships" if row["source"] == "ships" else f"generalized Ships ({row['variant']})"
    lead = (f"top-{int(row['k'])} {src} heads of {int(row['n_heads'])} on {row['datasets'][0]}, "
            f"{row['ops'][0]}")
    shared = ", ".join(row["shared_heads"]) or "none"
    chance = f"chance alone would give {float(row['expected_shared']):.2f} ({p_is(row['p_value'])})"
    verdict = "more than chance" if float(row["p_value"]) < 0.05 else "no more than chance"
    if int(row["n_sets"]) == 2:
        a, b = (data.label(m) for m in row["models"])
        text = (f"{a} and {b} share {int(row['shared'])} ({shared}; Jaccard {float(row['jaccard']):.2f}); "
                f"{chance}: {verdict}.")
    else:
        pairs = pair_rows(data, row)
        sig = int((pairs["p_value"] < 0.05).sum())
        span = (f"; pairs share {int(pairs['shared'].min())}–{int(pairs['shared'].max())} heads, {sig} of "
                f"{len(pairs)} pairs more than chance (p < 0.05)") if len(pairs) else ""
        text = f"all {int(row['n_sets'])} models share {int(row['shared'])} ({shared}); {chance}{span}."
    return Html(f"<li><b>Shared heads across models</b> ({esc(lead)}): {esc(text)}</li>")


def _top_cell(top: TopHeads, say_by: bool) -> Html:
    """The top heads, each safety-specific one marked with an asterisk (explained in the caption)."""
    marked = [f"{h}*" if top.specific and top.specific[i] else h for i, (h, _) in enumerate(top.heads)]
    return esc(", ".join(marked) + (f" ({top.by})" if say_by else ""))


def _same_heads(a: str, b: str) -> bool:
    """The same head set, whatever the order (a group's column lists heads in the search's order)."""
    return sorted(a.split(", ")) == sorted(b.split(", "))


def _summary_table(data: RunData, headlines: list[AsrHeadline]) -> Html:
    by_model: dict[str, list[AsrHeadline]] = {}
    for h in headlines:
        by_model.setdefault(str(h.row["model"]), []).append(h)
    tops = {m: top_heads(data, m) for m in data.models()}
    bys = {t.by for t in tops.values() if t is not None}
    groups = search_groups(data)
    rows = []
    for model in data.models():
        mine = [g for g in groups if g.model == model]
        top = tops[model]
        searched = ["; ".join(", ".join(g.heads) for g in [g for g in mine if g.search == search][:MAX_GROUPS])
                    or MISSING for search in SEARCHES]  # a column per search
        top_text = MISSING if top is None else _top_cell(top, len(bys) > 1)
        hs: list[AsrHeadline | None] = list(by_model.get(model, [])) or [None]
        for h in hs:
            if h is None:
                rows.append([data.label(model), *searched, top_text] + [MISSING] * 9)
                continue
            r = h.row
            cls, words = reading(r)
            ablated = heads_of(r["ablation"])
            rand = rate(r["random_asr_mean"]) if int(r.get("random_draws") or 0) > 0 else MISSING
            rows.append([data.label(model), *searched, top_text, r["dataset"],
                         MISSING if any(c != MISSING and _same_heads(ablated, c) for c in searched) else ablated,
                         f"{rate(r['normal_asr'])} → {rate(r['asr'])}", ci(r["ci_low"], r["ci_high"]),
                         pval(r["p_mcnemar"]), rand,
                         f"{rate(r.get('normal_refusal_rate'))} / {rate(r.get('normal_non_answer_rate'))} → "
                         f"{rate(r.get('refusal_rate'))} / {rate(r.get('non_answer_rate'))}",
                         pct(r["degenerate_frac"]), Html(f'<span class="tag {cls}">{esc(words)}</span>')])
    top_head = f"Top heads ({bys.pop()})" if len(bys) == 1 else "Top heads"
    header = ["Model", *(CONDITION_NAMES[s][0].upper() + CONDITION_NAMES[s][1:] for s in SEARCHES), top_head,
              "Prompts", "Ablated", "ASR normal → ablated", "95% CI", "McNemar p", "Random heads",
              "Refusal / non-answer", "Degenerate", "Reading"]
    align = "l" + "w" * len(SEARCHES) + "wllrrrrrrl"
    keep = [i for i in range(len(header)) if any(row[i] != MISSING for row in rows)]
    return table([header[i] for i in keep], [[row[i] for i in keep] for row in rows], "".join(align[i] for i in keep),
                 caption="Summary per model" + (" (ASR: the headline ablation; every row is in the ASR section; "
                                                "Reading: “above random heads” is what this report calls "
                                                "safety heads)" if headlines else "")
                 + (" (* safety-specific: specificity above 0.5 beyond its 95% interval)"
                    if any(t is not None and t.by == SPECIFIC_RANKING for t in tops.values()) else ""),
                 cls="summary", fold=("Prompts",))


def _published_table(data: RunData) -> Html:
    rows = published_rows(data)
    if not rows:
        return Html("")
    body = []
    for p in rows:
        agree = {True: "yes", False: "no", None: MISSING}[p["agrees"]]
        if p["measured"] is not None:
            measured: Any = p["measured"]
        elif p["see"]:
            measured = Html(f'see <a href="#{esc(p["see"])}">{esc(SECTION_NAMES.get(p["see"], p["see"]))}</a>')
        else:
            measured = Html('<span class="absent">not measured in this run</span>')
        body.append([p.get("claim", ""), data.label(p["model"]) if p["model"] in data.labels else p["model"],
                     p.get("dataset") or MISSING, p.get("metric", ""), p["published"], measured, agree,
                     p.get("source") or MISSING])
    return table(["Claim", "Model", "Prompts", "Metric", "Published", "Measured", "Agrees", "Source"], body,
                 "wllllwlw",
                 caption="Measured against published (ASR agrees: the published value lies in the measured 95% CI)")


def findings(data: RunData) -> list[Html]:
    """The blocks of the first screen."""
    headlines = asr_headlines(data)
    models = data.models()
    # a known answer first: where the run holds a model whose safety heads are known, whether they were found
    bullets = [Html(f'<li class="known">{esc(known_sentence(data, k))}</li>') for k in known_answers(data)]
    for model in models[:MAX_MODEL_BULLETS]:
        mine = [_asr_sentence(data, h) for h in headlines if str(h.row["model"]) == model][:2]
        bullets.append(_model_bullet(data, model, mine))
    if len(models) > MAX_MODEL_BULLETS:
        bullets.append(Html(f"<li>… and {len(models) - MAX_MODEL_BULLETS} more models: see the table below.</li>"))
    bullets += [_overlap_sentence(data, row) for row in model_overlaps(data)[:3]]
    if not bullets:
        bullets.append(Html("<li>The run's tables hold no rows to summarise.</li>"))
    out = [Html('<div class="findings"><ul>' + join(bullets, "\n") + "</ul></div>")]
    curve = data.get("asr_curve")
    note = judge_note(pick_judge(curve["judge"]) if curve is not None else None)
    if note:
        out.append(para(note, cls="judge"))
    if models:
        out.append(_summary_table(data, headlines))
    out.append(_published_table(data))
    absent = absent_lines(data)
    if absent:
        out.append(Html('<div class="absent"><b>Not in this run:</b><ul>'
                        + join((Html(f"<li>{esc(a)}</li>") for a in absent), "") + "</ul></div>"))
    return [o for o in out if o]
