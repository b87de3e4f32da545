"""One section per experiment the run holds (top heads, Sahara, the joint search, ASR, overlap, specificity,
swaps, utility, heatmaps): its numbers as tables and its figures. A section whose tables are absent is not
drawn (the first screen says so in one line)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from analysis import is_missing
from analysis.figures import FigureRecord
from analysis.report._facts import (
    ALPHA,
    CONDITION_NAMES,
    CONDITION_ORDER,
    DEGENERATE_WARN,
    JOINT_KEYS,
    RECIPE_NAMES,
    RECIPES,
    asr_headlines,
    heads_of,
    joint_groups,
    joint_variant,
    judge_note,
    objective_text,
    pick_judge,
    reading,
    sahara_groups,
)
from analysis.report._html import MISSING, Html, ci, esc, figure, num, para, pct, pval, rate, section, table
from analysis.report._load import RunData, generation_examples
from analysis.specificity import safety_specific

__all__ = ["SECTIONS", "experiment_sections"]

TOP_MIN, TOP_MAX = 5, 10
PROMPTS_PER_CONDITION, MAX_PROMPT_ROWS = 3, 40
MAX_EXAMPLE_MODELS, EXAMPLES_PER_MODEL = 4, 3
PROMPT_CHARS, ANSWER_CHARS = 160, 360


def _model(data: RunData, model: Any) -> Html:
    """A model's short label, its full id as a tooltip."""
    return Html(f'<span title="{esc(model)}">{esc(data.label(model))}</span>')


def _clip(text: Any, n: int) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _quote(text: Any, n: int) -> Html:
    return Html(f'<div class="quote">{esc(_clip(text, n))}</div>')


def _figures(records: Sequence[FigureRecord], kind: str) -> list[Html]:
    return [figure(r.name, r.title, r.caption, r.paths) for r in records if r.kind == kind]


def _dataset(data: RunData, d: Any) -> str:
    return f"{d} (benign)" if str(d) in data.benign else str(d)


def _sorted(df: pd.DataFrame, data: RunData, by: Sequence[str]) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(data.models())}
    return df.assign(_m=df["model"].map(lambda m: order.get(m, len(order)))).sort_values(["_m", *by], kind="stable")


# ---- top heads ----

def _top_table(data: RunData, ranks: pd.DataFrame, source: str, caption: str, score: Callable[[Any], str]) -> Html:
    r = ranks[ranks["source"] == source]
    if r.empty:
        return Html("")
    n = max(TOP_MIN, min(data.k, TOP_MAX))
    rows = []
    keys = ["model", "dataset", "op", "eps", "prompt_format", "subspace", "rank_r", "centered"]
    for key, g in _sorted(r, data, ["dataset", "op"]).groupby(keys, sort=False, dropna=False):
        g = g.sort_values("rank").head(n)
        heads = ", ".join(f"{h} {score(s)}" for h, s in zip(g["head_label"], g["score"]))
        variant = MISSING if is_missing(key[5]) else f"{key[5]}:r{int(key[6])}" + (":centered" if key[7] else "")
        extra = [variant] if source == "head_scores" else [int(g["n_prompts"].iloc[0])]
        rows.append([_model(data, key[0]), _dataset(data, key[1]), f"{key[2]} ε={key[3]:g}", *extra, heads])
    header = ["Model", "Prompts", "Operator", "Subspace" if source == "head_scores" else "n prompts",
              f"Top {n} heads (score)"]
    return table(header, rows, "lllrw" if source == "ships" else "llllw", caption=caption,
                 fold=("Operator", "n prompts", "Subspace"))


def _prompt_table(data: RunData) -> Html:
    ships = data.get("ships")
    if ships is None:
        return Html("")
    first = ships[ships["rank"] <= 2]
    rows = []
    for (model, dataset, op), g in _sorted(first, data, ["dataset", "op"]).groupby(["model", "dataset", "op"],
                                                                                   sort=False):
        for pid in list(dict.fromkeys(g["prompt_id"]))[:PROMPTS_PER_CONDITION]:
            p = g[g["prompt_id"] == pid].sort_values("rank")
            top, second = p.iloc[0], (p.iloc[1] if len(p) > 1 else None)
            rows.append([_model(data, model), _dataset(data, dataset), _quote(top["prompt"], PROMPT_CHARS),
                         top["head_label"], num(top["kl"]),
                         f"{second['head_label']} {num(second['kl'])}" if second is not None else MISSING])
    more = f" (first {MAX_PROMPT_ROWS} rows)" if len(rows) > MAX_PROMPT_ROWS else ""
    return table(["Model", "Prompts", "Prompt", "Top head", "KL (nats)", "Second"], rows[:MAX_PROMPT_ROWS],
                 "llwlrl", caption=f"Each prompt's own top heads (query level), up to {PROMPTS_PER_CONDITION} "
                                   f"prompts per set{more}")


def heads_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    ranks = data.get("rankings")
    if ranks is None:
        return None
    return section("heads", "Top heads", [
        para("Ships: the KL divergence (nats) between the normal and the ablated model's next-token distribution, "
             "averaged over a prompt set's prompts. Generalized Ships: the principal angle (degrees) between the "
             "normal and the ablated dataset-level representation subspaces. Larger means the model leans on "
             "the head more."),
        _screened_note(data),
        _top_table(data, ranks, "ships", "Ships (mean KL over prompts, nats)", num),
        _top_table(data, ranks, "head_scores", "Generalized Ships (angle, degrees)", lambda s: f"{float(s):.3g}°"),
        _prompt_table(data)])


def _screened_note(data: RunData) -> Html:
    """Say how many Ships scores are screened (low precision, not re-scored): a ranking's top is exact, its
    tail is not."""
    ships = data.get("ships")
    if ships is None or "exact" not in ships.columns or not (ships["exact"] == False).any():  # noqa: E712
        return Html("")
    n, screened = len(ships), int((ships["exact"] == False).sum())  # noqa: E712
    return para(f"{screened:,} of {n:,} Ships scores are screened: computed in low precision and not re-scored, "
                f"because no prompt had their head among its top candidates. Every prompt's top heads were "
                f"re-scored at the model's precision (the ships table's exact column).")


# ---- Sahara ----

def sahara_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    df = data.get("sahara")
    if df is None:
        return None
    groups = {(g.model, g.dataset, g.op): g for g in sahara_groups(data)}
    keys = ["model", "dataset", "op", "eps", "subspace", "rank_r", "centered", "step"]
    rows = []
    for key, g in _sorted(df, data, ["dataset", "op", "step"]).groupby(keys, sort=False, dropna=False):
        g = g.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        chosen = g[g["chosen"]]
        best = chosen.iloc[0] if not chosen.empty else g.iloc[0]
        runner = g[g["head_label"] != best["head_label"]].head(1)
        kept = groups.get((key[0], key[1], key[2]))
        added = kept is not None and best["head_label"] in kept.heads
        rows.append([_model(data, key[0]), key[1], f"{key[2]} {key[4]}:r{int(key[5])}", int(key[7]),
                     best["head_label"] + ("" if added else " (not added)"), num(best["score"], 4),
                     (f"{runner.iloc[0]['head_label']} {num(runner.iloc[0]['score'], 4)}" if not runner.empty
                      else MISSING), len(g), ", ".join([*best["group"], best["head_label"]]) if added else MISSING])
    return section("sahara", "Sahara groups", [
        para("Sahara grows a head group greedily: at each step every remaining head is scored by the generalized "
             "Ships angle (degrees) of the group with that head added, and the best is kept. A runner-up close to "
             "the chosen head means the choice was nearly a tie."),
        table(["Model", "Prompts", "Operator, subspace", "Step", "Chosen head", "Score", "Runner-up", "Candidates",
               "Group after the step"], rows, "lllrlrlrl", caption="Per-step scores of each Sahara search",
              fold=("Prompts", "Operator, subspace"))])


# ---- joint search ----

def _seeds_table(data: RunData, df: pd.DataFrame) -> Html:
    """Every seed's group beside the selected one: how much the seeds agree, and why one was taken."""
    rows = []
    keys = [*JOINT_KEYS, "seed"]
    for key, g in _sorted(df[df["in_group"]], data, ["dataset", "op", "objective", "seed"]).groupby(
            keys, sort=False, dropna=False):
        g = g.sort_values("rank")
        rows.append([_model(data, key[0]), _dataset(data, key[1]), f"{key[2]} ε={key[3]:g}", joint_variant(*key[4:8]),
                     int(key[8]), ", ".join(f"{h} {float(x):.2f}" for h, x in zip(g["head_label"], g["gate"])),
                     objective_text(str(key[4]), g["score"].iloc[-1]), "yes" if g["selected"].any() else "no"])
    return table(["Model", "Prompts", "Operator", "Objective", "Seed", "Group (gate)", "Objective of the group",
                  "Selected"], rows, "lllllwrl", caption="Each seed's group",
                 fold=("Prompts", "Operator", "Objective"))


def joint_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    df = data.get("joint")
    if df is None:
        return None
    groups = joint_groups(data)
    rows = [[_model(data, g.model), _dataset(data, g.dataset), f"{g.op} ε={g.eps:g}", g.variant, g.seed, i, head,
             f"{gate:.3f}", objective_text(g.objective, score), g.prompts_used]
            for g in groups for i, (head, gate, score) in enumerate(zip(g.heads, g.gates, g.scores), start=1)]
    several = len(df[["model", "dataset", "op", "eps", "objective", "seed"]].drop_duplicates()) > len(groups)
    return section("joint", "Joint search groups", [
        para("The joint search learns a gate for every head at once (0: the head as normal, 1: ablated) by gradient "
             "steps on a smooth objective with a sparsity penalty, from one or more seeds. A seed's group is its k "
             "heads with the largest gates; the search's group is the seed's group whose exact objective, with its "
             "heads ablated outright, is largest. Objective refusal: the drop of the probability of the model's own "
             "refusal openings (0 to 1), on the prompts it refused; subspace: the generalized Ships angle (degrees). "
             "The objective of heads 1..i shows what each head adds to those before it."),
        table(["Model", "Prompts", "Operator", "Objective", "Seed", "Rank", "Head", "Gate",
               "Objective, heads 1..rank ablated", "Prompts used"], rows, "lllllrlrrr",
              caption="The search's group: the selected seed's heads by gate",
              fold=("Prompts", "Operator", "Objective", "Seed", "Prompts used")),
        _seeds_table(data, df) if several else Html(""),
        *_figures(figs, "joint")])


# ---- ASR ----

def _asr_rows(data: RunData, curve: pd.DataFrame, kind: str) -> list[list[Any]]:
    df = curve[curve["kind"] == kind].copy()
    df["_c"] = df["condition"].map(CONDITION_ORDER).fillna(len(CONDITION_ORDER))
    rows = []
    for _, r in _sorted(df, data, ["dataset", "decoding", "judge", "op", "_c", "group_size"]).iterrows():
        cond = CONDITION_NAMES.get(str(r["condition"]), str(r["condition"]))
        common = [_model(data, r["model"]), r["dataset"], r["decoding"], r["judge"], cond, heads_of(r["ablation"]),
                  int(r["group_size"]), int(r["n"])]
        draws = int(r["random_draws"] or 0)
        if kind == "harmful":
            rand = (f"{rate(r['random_asr_mean'])} ({rate(r['random_asr_min'])}–{rate(r['random_asr_max'])})"
                    if draws else MISSING)
            rand_rates = (f"{rate(r['random_refusal_mean'])} / {rate(r.get('random_non_answer_mean'))}"
                          if draws else MISSING)
            normal = r["condition"] == "normal"
            cls, words = reading(r)
            rows.append(common + [rate(r["asr"]), ci(r["ci_low"], r["ci_high"]), rate(r["refusal_rate"]),
                                  rate(r.get("non_answer_rate")), pval(r["p_mcnemar"]),
                                  MISSING if normal or is_missing(r["delta_asr"]) else f"{float(r['delta_asr']):+.2f}",
                                  rand, rand_rates, pct(r["degenerate_frac"]),
                                  MISSING if normal else Html(f'<span class="tag {cls}">{esc(words)}</span>')])
        else:
            rand = rate(r["random_refusal_mean"]) if draws else MISSING
            rows.append(common + [rate(r["refusal_rate"]), rate(r["normal_refusal_rate"]), rand,
                                  rate(r.get("non_answer_rate")), pct(r["degenerate_frac"])])
    return rows


def _examples(data: RunData) -> Html:
    gens = generation_examples(data.run_dir)
    if gens is None:
        return Html("")
    rows = []
    for h in asr_headlines(data)[:MAX_EXAMPLE_MODELS]:
        r = h.row
        g = gens[(gens["model"] == r["model"]) & (gens["dataset"] == r["dataset"])
                 & (gens["decoding"] == r["decoding"])]
        ablated = g[g["ablation"] == r["ablation"]].drop_duplicates("prompt_id").set_index("prompt_id")
        normal = g[g["condition"] == "normal"].drop_duplicates("prompt_id").set_index("prompt_id")
        ids = [i for i in ablated.index if i in normal.index]
        ids.sort(key=lambda i: normal.loc[i, "text"] == ablated.loc[i, "text"])  # answers that changed first
        for pid in ids[:EXAMPLES_PER_MODEL]:
            rows.append([_model(data, r["model"]), _quote(ablated.loc[pid, "prompt"], PROMPT_CHARS),
                         _quote(normal.loc[pid, "text"], ANSWER_CHARS),
                         _quote(ablated.loc[pid, "text"], ANSWER_CHARS), heads_of(r["ablation"])])
    if not rows:
        return Html("")
    return table(["Model", "Prompt", "Normal answer", "Ablated answer", "Ablated heads"], rows, "lwwwl",
                 caption="Example answers under the headline ablation (first sample; answers that changed first)")


def asr_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    curve = data.get("asr_curve")
    if curve is None:
        return None
    harm = _asr_rows(data, curve, "harmful")
    benign = _asr_rows(data, curve, "benign")
    head = ["Model", "Prompts", "Decoding", "Judge", "Ablation", "Heads", "Size", "n"]
    fold = ("Prompts", "Decoding", "Judge", "n")
    body: list[Any] = [para(
        "Every answer is one of three outcomes: an answer that engages with the request (ASR: their share, "
        "Wilson 95% interval), a refusal, or a non-answer (neither: a generic offer, an echo, a bare preamble, "
        "broken text); the three rates add up to 1. McNemar p: exact, paired against the normal model on the "
        "same prompts. Random heads: controls of the same number of heads (ASR mean, min–max over draws; their "
        "mean refusal / non-answer rates). Degenerate: answers that are repetition, an echo of the prompt, or no "
        f"words. Reading: above random heads (p < {ALPHA} and the lower end of the 95% CI above every random "
        "control: what this report calls safety heads), random heads too, no random controls, not significant, "
        f"no change, ASR down, or broken text (at least {pct(DEGENERATE_WARN)} degenerate: no jailbreak)."),
        para(judge_note(pick_judge(curve["judge"])))]
    if harm:
        body.append(table(head + ["ASR", "95% CI", "Refusal", "Non-answer", "McNemar p", "Δ vs normal",
                                  "Random heads", "Random refusal / non-answer", "Degenerate", "Reading"], harm,
                          "llllllrrrrrrrrrrrl", caption="Harmful prompts: attack success rate", fold=fold))
    if benign:
        body.append(table(head + ["Refusal rate", "Normal", "Random heads", "Non-answer", "Degenerate"], benign,
                          "llllllrrrrrrr", caption="Benign prompts: over-refusal", fold=fold))
    body += _figures(figs, "asr_curve")
    body.append(_examples(data))
    return section("asr", "Attack success rate", body)


# ---- overlap ----

def overlap_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    ov = data.get("overlap")
    if ov is None:
        return None
    axis_order = {"models": 0, "datasets": 1, "ops": 2}
    df = ov.assign(_a=ov["axis"].map(axis_order).fillna(3)).sort_values(["_a", "source", "n_sets"],
                                                                         ascending=[True, True, False], kind="stable")
    rows = []
    for _, r in df.iterrows():
        axis = str(r["axis"])
        if axis == "models":
            sets = [data.label(m) for m in r["models"]]
            fixed = f"{r['datasets'][0]} · {r['ops'][0]}"
        elif axis == "datasets":
            sets, fixed = [str(d) for d in r["datasets"]], f"{data.label(r['models'][0])} · {r['ops'][0]}"
        else:
            sets, fixed = [str(o) for o in r["ops"]], f"{data.label(r['models'][0])} · {r['datasets'][0]}"
        src = "Ships" if r["source"] == "ships" else f"generalized Ships {r['variant']}"
        rows.append([axis, src, fixed, " ∩ ".join(sets), f"{int(r['k'])} of {int(r['n_heads'])}", int(r["shared"]),
                     ", ".join(r["shared_heads"]) or MISSING, f"{float(r['jaccard']):.2f}",
                     f"{float(r['expected_shared']):.2f}", pval(r["p_value"])])
    return section("overlap", "Shared heads (overlap)", [
        para("The top-k heads of each ranking compared across models, prompt sets and operators, every pair and "
             "all together. Expected: the intersection of independent random top-k sets of the same size; p: the "
             "exact probability of sharing at least as many by chance."),
        table(["Across", "Ranking", "Held fixed", "Sets", "Top k of N", "Shared", "Shared heads", "Jaccard",
               "Expected", "p"], rows, "llllrrwrrr", caption="Overlap of top-k heads", fold=("Top k of N",)),
        *_figures(figs, "overlap")])


# ---- specificity ----

def specificity_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    spec = data.get("specificity")
    if spec is None:
        return None
    n = max(TOP_MIN, min(data.k, TOP_MAX))
    rows = []
    keys = ["model", "dataset", "benign_dataset", "op"]
    for key, g in _sorted(spec, data, ["dataset", "op"]).groupby(keys, sort=False):
        for _, r in g.sort_values("rank_specific").head(n).iterrows():
            low, high = r.get("spec_ci_low"), r.get("spec_ci_high")
            rows.append([_model(data, key[0]), f"{key[1]} vs {key[2]}", int(r["rank_specific"]), r["head_label"],
                         num(r["kl_harmful"]), num(r["kl_benign"]), f"{float(r['specificity']):.2f}", ci(low, high),
                         "yes" if safety_specific(low) else ("no" if not is_missing(low) else MISSING),
                         MISSING if is_missing(r["log2_ratio"]) else f"{float(r['log2_ratio']):+.2f}",
                         int(r["rank_harmful"])])
    return section("specificity", "Safety specificity", [
        para("A head that changes every answer is not a safety head. Specificity = KL on harmful prompts / (KL on "
             "harmful + KL on benign prompts): 0.5 is no preference. A head is called safety-specific only where "
             "the whole 95% interval of its specificity (a bootstrap over prompts, harmful and benign resampled "
             "separately) lies above 0.5; with a single prompt on a side there is no interval and no claim. Heads "
             "are ranked by KL on harmful prompts x specificity."),
        table(["Model", "Harmful vs benign", "Rank", "Head", "KL harmful", "KL benign", "Specificity", "95% CI",
               "Safety-specific", "log2 ratio", "Rank by KL"], rows, "llrlrrrrlrr",
              caption=f"Top {n} heads by KL on harmful prompts × specificity", fold=("Harmful vs benign",)),
        *_figures(figs, "specificity")])


# ---- swaps ----

def _swap_groups(data: RunData) -> str:
    """Where the swaps' head group came from: a swap job records the search it took its group from."""
    searches = {str((job.get("config") or {}).get("search")) for m in data.manifests for job in m.get("jobs") or []
                if isinstance(job, dict) and job.get("experiment") == "swap"}
    return ("the Sahara group, the joint-search group or the given heads" if "joint" in searches
            else "the Sahara group or the given heads")


def swaps_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    sw = data.get("swaps")
    if sw is None:
        return None
    rows = []
    for aligned, g in sw.groupby("aligned", sort=False):
        judge = pick_judge(g["judge"])
        for recipe in [r for r in RECIPES if r in set(g["recipe"])] + sorted(set(g["recipe"]) - set(RECIPES)):
            r = g[g["recipe"] == recipe]

            def metric(kind: str, name: str, r: pd.DataFrame = r) -> pd.Series | None:
                m = r[(r["kind"] == kind) & (r["metric"] == name) & ((r["judge"] == judge) | (kind == "ships"))]
                return m.iloc[0] if not m.empty else None

            asr, refusal, non_answer, deg = (metric("harmful", x) for x in ("asr", "refusal_rate", "non_answer_rate",
                                                                             "degenerate_frac"))
            over, ships = metric("benign", "refusal_rate"), metric("ships", "ships:group")
            heads = [str(h) for h in r["heads"].iloc[0]]
            rows.append([_model(data, aligned), _model(data, r["base"].iloc[0]), RECIPE_NAMES.get(recipe, recipe),
                         ", ".join(heads) or MISSING, judge or MISSING,
                         rate(asr["value"]) if asr is not None else MISSING,
                         ci(asr["ci_low"], asr["ci_high"]) if asr is not None else MISSING,
                         rate(refusal["value"]) if refusal is not None else MISSING,
                         rate(non_answer["value"]) if non_answer is not None else MISSING,
                         pct(deg["value"]) if deg is not None else MISSING,
                         rate(over["value"]) if over is not None else MISSING,
                         num(ships["value"]) if ships is not None else MISSING])
    return section("swaps", "Base-weight swaps", [
        para("Each aligned model mixed with its base: attention (or MLPs, or only the head group: "
             f"{_swap_groups(data)}) taken from the base with the rest aligned, and the head group moved into the "
             "base. Refusal and non-answer: shares of the harmful prompts. Group's KL: mean Ships KL of ablating "
             "the head group together inside each mixed model."),
        table(["Aligned", "Base", "Recipe", "Heads moved", "Judge", "ASR", "95% CI", "Refusal", "Non-answer",
               "Degenerate", "Over-refusal (benign)", "Group's KL"], rows, "lllllrrrrrrr", caption="Swaps",
              fold=("Base", "Judge")),
        *_figures(figs, "swaps")])


# ---- utility ----

def utility_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    ut = data.get("utility")
    if ut is None:
        return None
    df = ut.assign(_c=ut["condition"].map(CONDITION_ORDER).fillna(len(CONDITION_ORDER)))
    rows = [[_model(data, r["model"]), r["dataset"], r["metric"], CONDITION_NAMES.get(r["condition"], r["condition"]),
             heads_of(r["ablation"]), int(r["group_size"]), int(r["draw"]),
             f"failed: {r['error']}" if not is_missing(r["error"]) else num(r["value"], 4), int(r["n"]),
             MISSING if is_missing(r["ratio"]) else f"{float(r['ratio']):.3f}"]
            for _, r in _sorted(df, data, ["dataset", "metric", "_c", "group_size", "draw"]).iterrows()]
    return section("utility", "Utility", [
        para("What the ablations cost on ordinary text: perplexity (and lm-eval scores where run) of each "
             "ablation, and its ratio to the normal model (1 = no cost; for perplexity, above 1 is worse). An lm-eval "
             "task that failed on a head set says why in place of its value."),
        table(["Model", "Text", "Metric", "Ablation", "Heads", "Size", "Draw", "Value", "n", "Ratio"], rows,
              "lllllrrrrr", caption="Utility", fold=("Text", "Metric", "Draw", "n")),
        *_figures(figs, "utility")])


def heatmaps_section(data: RunData, figs: Sequence[FigureRecord]) -> Html | None:
    maps = _figures(figs, "heatmap")
    if not maps:
        return None
    return section("heatmaps", "Heatmaps", [para("Every head of each model, per prompt set and operator."), *maps])


SECTIONS: tuple[tuple[str, str, Callable[[RunData, Sequence[FigureRecord]], Html | None]], ...] = (
    ("heads", "Top heads", heads_section),
    ("sahara", "Sahara groups", sahara_section),
    ("joint", "Joint search", joint_section),
    ("asr", "ASR", asr_section),
    ("overlap", "Overlap", overlap_section),
    ("specificity", "Specificity", specificity_section),
    ("swaps", "Swaps", swaps_section),
    ("utility", "Utility", utility_section),
    ("heatmaps", "Heatmaps", heatmaps_section),
)


def experiment_sections(data: RunData, figs: Sequence[FigureRecord]) -> list[tuple[str, str, Html]]:
    """(anchor, contents label, markup) of each section the run supports, in report order."""
    out = []
    for anchor, label, build in SECTIONS:
        html = build(data, figs)
        if html:
            out.append((anchor, label, html))
    return out
