"""A known answer, checked first: for a model whose safety was planted in named heads (a family member's card,
recorded in the manifest), whether the run's Ships ranking and searched groups (Sahara's, the joint search's)
found those heads, and what ablating them did beside random heads of the same number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis import is_missing
from analysis.report._facts import job_models, joint_groups, pick_judge, prefer, sahara_groups
from analysis.report._html import ci, p_is, rate
from analysis.report._load import RunData

__all__ = ["KnownAnswer", "known_answers", "known_sentence"]


@dataclass(frozen=True)
class KnownAnswer:
    model: str
    planted: tuple[str, ...]
    ships_ranks: tuple[int, ...] | None  # each planted head's rank (1 = top) by Ships on a harmful set
    n_heads: int | None
    ships_dataset: str | None
    sahara: tuple[str, ...] | None  # the model's first Sahara group on a harmful set
    asr: pd.Series | None  # the asr_curve row of ablating the planted heads (harmful prompts, headline judge)
    joint: tuple[str, ...] | None = None  # the model's first joint-search group on a harmful set


def planted_by_model(data: RunData) -> dict[str, tuple[str, ...]]:
    """Model (as the tables name it) -> its planted heads, from the manifests' job records."""
    out: dict[str, tuple[str, ...]] = {}
    for m in data.manifests:
        for job in m.get("jobs") or []:
            if isinstance(job, dict) and job.get("planted_heads"):
                for name in job_models(job):
                    out[name] = tuple(str(h) for h in job["planted_heads"])
    return out


def _ships_ranks(data: RunData, model: str, planted: tuple[str, ...]) -> tuple[tuple[int, ...], int, str] | None:
    ranks = data.get("rankings")
    if ranks is None:
        return None
    r = ranks[(ranks["model"] == model) & (ranks["source"] == "ships") & ~ranks["dataset"].isin(data.benign)]
    if r.empty:
        return None
    dataset, op = str(sorted(r["dataset"])[0]), prefer(r["op"], ["undiff_q"])
    r = r[(r["dataset"] == dataset) & (r["op"] == op)].drop_duplicates("head_label")
    by = dict(zip(r["head_label"].astype(str), r["rank"].astype(int)))
    if any(h not in by for h in planted):
        return None
    return tuple(by[h] for h in planted), int(r["n_heads"].iloc[0]), dataset


def _planted_row(data: RunData, model: str) -> pd.Series | None:
    curve = data.get("asr_curve")
    if curve is None:
        return None
    c = curve[(curve["model"] == model) & (curve["kind"] == "harmful") & (curve["condition"] == "planted")]
    if c.empty:
        return None
    c = c[(c["judge"] == pick_judge(c["judge"])) & (c["decoding"] == prefer(c["decoding"], ["greedy"]))]
    return c.sort_values("dataset").iloc[0]


def known_answers(data: RunData) -> list[KnownAnswer]:
    out = []
    planted = planted_by_model(data)
    for model in data.models():
        if model not in planted:
            continue
        heads = planted[model]
        ships = _ships_ranks(data, model, heads)
        sahara, joint = (next((g.heads for g in groups if g.model == model and g.dataset not in data.benign), None)
                         for groups in (sahara_groups(data), joint_groups(data)))
        out.append(KnownAnswer(model, heads, ships[0] if ships else None, ships[1] if ships else None,
                               ships[2] if ships else None, sahara, _planted_row(data, model), joint))
    return out


def _ships_words(k: KnownAnswer) -> str:
    if k.ships_ranks is None:
        return "no Ships ranking of them in this run"
    n = len(k.planted)
    within = sum(r <= n for r in k.ships_ranks)
    ranks = ", ".join(str(r) for r in k.ships_ranks)
    found = ("all of them at the top: recovered" if within == n
             else f"{within} of {n} in its top {n}" + ("" if within else ": not recovered"))
    return f"Ships (mean over prompts, {k.ships_dataset}) ranks them {ranks} of {k.n_heads} ({found})"


def _group_words(whose: str, heads: tuple[str, ...], planted: tuple[str, ...]) -> str:
    """Whether a searched group (`whose`: "Sahara's") is the planted heads, some of them, or others."""
    hit = [h for h in heads if h in planted]
    group = ", ".join(heads)
    if set(heads) == set(planted):
        return f"{whose} group ({group}) is exactly the planted heads"
    if len(hit) == len(heads):
        return f"{whose} {len(heads)}-head group ({group}) holds only planted heads ({len(hit)} of {len(planted)})"
    return f"{whose} group ({group}) holds {len(hit)} of the {len(planted)} planted heads"


def _search_words(k: KnownAnswer) -> list[str]:
    """What each search made of the planted heads; a run with neither search says Sahara is missing."""
    words = [_group_words(whose, heads, k.planted)
             for whose, heads in (("Sahara's", k.sahara), ("the joint search's", k.joint)) if heads is not None]
    return words or ["no Sahara search of it in this run"]


def _asr_words(row: Any) -> str:
    if row is None:
        return "ASR with them ablated was not measured"
    normal, asr = row["normal_asr"], float(row["asr"])
    move = ("gives" if is_missing(normal) else
            "raises" if asr > float(normal) else "lowers" if asr < float(normal) else "leaves")
    frm = "" if is_missing(normal) else f" from {float(normal):.2f}"
    text = (f"ablating them {move} ASR{frm} to {asr:.2f} on {row['dataset']} (95% CI {ci(row['ci_low'], row['ci_high'])}, "
            f"McNemar {p_is(row['p_mcnemar'])}")
    if int(row.get("random_draws") or 0) > 0:
        text += f"; random heads of the same number: {rate(row['random_asr_mean'])}"
    return text + f"; judge {row['judge']})"


def known_sentence(data: RunData, k: KnownAnswer) -> str:
    """One sentence: the planted heads, what Ships and the searches made of them, and what ablating them did."""
    said = "; ".join([_ships_words(k), *_search_words(k), _asr_words(k.asr)])
    return (f"Known answer: {data.label(k.model)}'s safety was planted in {', '.join(k.planted)}. "
            f"{said[0].upper()}{said[1:]}.")
