"""Published numbers beside the run's own: each claim of the spec's `published` list matched to the tables
(by model, prompt set, operator and decoding) and said to agree or not where a number compares."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from analysis import is_missing, style
from analysis.report._facts import RECIPES, TARGETED, pick_judge, sahara_groups, swap_summary
from analysis.report._load import RunData

__all__ = ["SECTION_OF", "published_rows", "same_dataset", "same_model"]


def same_model(a: Any, b: Any) -> bool:
    return str(a) == str(b) or style.short_model(str(a)).lower() == style.short_model(str(b)).lower()


def same_dataset(want: Any, got: Any) -> bool:
    if is_missing(want) or want in (None, ""):
        return True
    w, g = str(want).lower(), str(got).lower()
    return w == g or PurePath(g).stem == w or g.split(":")[-1] == w


def _same_decoding(want: Any, got: Any) -> bool:
    if want in (None, "") or is_missing(want):
        return True
    return str(got) == str(want) or str(got).startswith(str(want)) or str(want).startswith(str(got))


def _values(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def published_text(p: Mapping[str, Any]) -> str:
    vals = ", ".join(_fmt(v) for v in _values(p.get("value")))
    base = p.get("baseline")
    return f"{_fmt(float(base))} → {vals}" if base is not None and p.get("metric") == "asr" else vals


def _asr_measured(data: RunData, p: Mapping[str, Any]) -> tuple[str, bool | None] | None:
    curve = data.get("asr_curve")
    if curve is None:
        return None
    c = curve[(curve["kind"] == "harmful") & curve["condition"].isin(TARGETED)]
    c = c[[same_model(p["model"], m) and same_dataset(p.get("dataset"), d) and _same_decoding(p.get("decoding"), x)
           for m, d, x in zip(c["model"], c["dataset"], c["decoding"])]]
    if p.get("op"):
        c = c[c["op"] == p["op"]]
    want = "query" if "query" in str(p.get("claim", "")).lower() else None
    c = c[c["condition"] == want] if want else c[c["condition"] != "query"]
    if c.empty:
        return None
    c = c[c["judge"] == pick_judge(c["judge"])]
    c = c[c["condition"] == next(x for x in TARGETED if (c["condition"] == x).any())]
    c = c.sort_values(["dataset", "group_size"]).drop_duplicates(["group_size"])
    metric = p.get("metric")
    if metric == "asr":
        parts = [f"{float(r.normal_asr):.2f} → {float(r.asr):.2f}" for r in c.itertuples()]
        vals = [v for v in _values(p.get("value")) if isinstance(v, (int, float))]
        agree = (any(float(r.ci_low) <= float(v) <= float(r.ci_high) for r in c.itertuples() for v in vals)
                 if vals else None)
    else:
        parts = [f"{float(r.delta_asr):+.2f}" for r in c.itertuples()]
        agree = None
    sizes = [int(s) for s in c["group_size"]]
    text = "; ".join(parts) if len(parts) == 1 else "; ".join(f"{s}: {t}" for s, t in zip(sizes, parts))
    where = f" ({c['dataset'].iloc[0]}, {c['judge'].iloc[0]}" + (", group sizes" if len(parts) > 1 else "") + ")"
    return text + where, agree


def _sahara_measured(data: RunData, p: Mapping[str, Any]) -> tuple[str, bool | None] | None:
    groups = [g for g in sahara_groups(data) if same_model(p["model"], g.model)
              and same_dataset(p.get("dataset"), g.dataset) and (not p.get("op") or p["op"] == g.op)]
    if not groups:
        return None
    want = [str(v) for v in _values(p.get("value"))]
    n = 1 if p.get("metric") == "top_head" else len(want)
    got = [list(g.heads[:n]) for g in groups]
    text = "; ".join(f"{', '.join(h)} ({g.dataset})" for h, g in zip(got, groups))
    return text, any(h == want for h in got) if p.get("metric") in ("top_head", "group") else None


def _swap_measured(data: RunData, p: Mapping[str, Any]) -> tuple[str, bool | None] | None:
    claim = str(p.get("claim") or "")
    recipe = p.get("recipe") or next((r for r in RECIPES[2:] if r in claim), None)
    for s in swap_summary(data):
        if same_model(p["model"], s["aligned"]) and same_dataset(p.get("dataset"), s["dataset"]):
            if recipe and recipe in s["recipes"] and p.get("metric") == "asr":
                r = s["recipes"][recipe]
                ok = (not is_missing(r["ci_low"]) and isinstance(p.get("value"), (int, float))
                      and float(r["ci_low"]) <= float(p["value"]) <= float(r["ci_high"]))
                return f"{recipe}: ASR {r['value']:.2f} ({s['dataset']})", ok
            text = ", ".join(f"{k} {v['value']:.2f}" for k, v in s["recipes"].items())
            return f"ASR {text} ({s['dataset']})", None
    return None


# experiment of a published claim the report cannot compare by number -> the tables that show it, best first
_SHOWN_IN = {"generalized_ships": ("overlap", "rankings"), "ships": ("rankings",), "specificity": ("specificity",),
             "utility": ("utility",), "sahara": ("sahara",), "joint": ("joint",), "asr": ("asr_curve",)}
# table -> the anchor of the section that shows it
SECTION_OF = {"overlap": "overlap", "rankings": "heads", "specificity": "specificity", "utility": "utility",
              "sahara": "sahara", "joint": "joint", "asr_curve": "asr"}


def published_rows(data: RunData) -> list[dict[str, Any]]:
    """Each published number with the run's measurement of it (`measured` None: not measured in this run;
    `agrees` None: not comparable automatically)."""
    out = []
    for p in data.published:
        if "model" not in p:
            continue
        exp, metric = p.get("experiment"), p.get("metric")
        got: tuple[str, bool | None] | None = None
        see = None  # the section to read where no number compares
        if exp == "asr" and metric in ("asr", "delta_asr"):
            got = _asr_measured(data, p)
        elif exp == "sahara" and metric in ("top_head", "group"):
            got = _sahara_measured(data, p)
        elif exp == "swap":
            got = _swap_measured(data, p)
        elif str(exp) in _SHOWN_IN and any(same_model(p["model"], m) for m in data.models()):
            see = next((SECTION_OF[t] for t in _SHOWN_IN[str(exp)] if data.get(t) is not None), None)
        out.append(dict(p, measured=got[0] if got else None, agrees=got[1] if got else None, see=see,
                        published=published_text(p)))
    return out
