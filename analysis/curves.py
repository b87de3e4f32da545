"""ASR against the number of heads ablated, with its controls: the `asr_curve` table.

One row per (model, dataset, format, decoding, judge, kind, targeted condition, group size): the targeted
ablation's own numbers (ASR with its Wilson CI and McNemar p; refusal and degenerate rates) beside
- the unablated model's level (all `normal` rows of the key pooled), drawn as the curve's group-size-0 point;
- the random-head controls of the same size: mean, min and max over draws (the band a targeted curve must
  clear before it says anything about *safety* heads rather than heads in general).
kind `harmful` reads as ASR; kind `benign` reads `refusal_rate` as over-refusal. `non_answer_rate` (neither
refused nor answered) shows an ablation that turns refusals into evasions rather than into help, and
`degenerate_frac` a broken model (repetition, no words); neither passes for a jailbroken one.

Random controls pair with the targeted conditions of their level: query-level draws (ablation label
`query:random…`, one draw per prompt) with `query`, every other draw with the dataset-level groups (`sahara`,
`joint`, `ships`, `heads`, `planted`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis import CODE_VERSION, frame, restore_missing, to_table
from study.core.stats import wilson

__all__ = ["TARGETED", "asr_curve_frame", "asr_curve_table"]

log = logging.getLogger(__name__)

# joint: the joint search's group; ships: the top heads by mean Ships; planted: a member's known heads (its card)
TARGETED = ("heads", "sahara", "joint", "ships", "planted", "query")
_BASE = ["model", "model_revision", "dataset", "prompt_format", "decoding", "judge", "kind"]
_KNOWN = {*TARGETED, "normal", "random"}


def _level(df: pd.DataFrame) -> pd.Series:
    query = (df["condition"] == "query") | ((df["condition"] == "random")
                                           & df["ablation"].astype(str).str.startswith("query:"))
    return pd.Series(np.where(query, "query", "dataset"), index=df.index)


def _non_answers(df: pd.DataFrame) -> pd.DataFrame:
    """Fill `non_answer` where an older table has none: every verdict is a refusal, an answer (harmful) or
    neither, so it is n - harmful - refused exactly."""
    derived = df["n"] - df["harmful"] - df["refused"]
    df["non_answer"] = pd.to_numeric(df["non_answer"]).fillna(derived).astype("int64")
    df["non_answer_rate"] = df["non_answer"] / df["n"]
    return df


def _normal(df: pd.DataFrame) -> pd.DataFrame:
    """One pooled normal row per key: counts summed, rates and the Wilson CI recomputed from them."""
    g = (df[df["condition"] == "normal"].groupby(_BASE, sort=True, dropna=False)
         .agg(n=("n", "sum"), harmful=("harmful", "sum"), refused=("refused", "sum"),
              degenerate=("degenerate", "sum"), non_answer=("non_answer", "sum"), ablation=("ablation", "first"),
              op=("op", "first"),
              eps=("eps", "first"), run_id=("run_id", "max"), rows=("n", "size"))
         .reset_index())
    pooled = g[g["rows"] > 1]
    if not pooled.empty:
        log.info("asr: %d key(s) with several normal rows; pooled their counts", len(pooled))
    g["asr"] = g["harmful"] / g["n"]
    g["refusal_rate"] = g["refused"] / g["n"]
    g["degenerate_frac"] = g["degenerate"] / g["n"]
    g["non_answer_rate"] = g["non_answer"] / g["n"]
    cis = [wilson(int(h), int(n)) for h, n in zip(g["harmful"], g["n"])]
    g["ci_low"] = [lo for lo, _ in cis]
    g["ci_high"] = [hi for _, hi in cis]
    g["p_mcnemar"] = None
    g["condition"], g["group_size"] = "normal", 0
    return g.drop(columns=["rows", "refused", "degenerate", "non_answer"])


def _random(df: pd.DataFrame) -> pd.DataFrame:
    """The band of the random controls per key, level, operator, ε and group size."""
    r = df[df["condition"] == "random"]
    return (r.groupby([*_BASE, "_level", "op", "eps", "group_size"], sort=False, dropna=False)
            .agg(random_draws=("draw", "size"), random_asr_mean=("asr", "mean"), random_asr_min=("asr", "min"),
                 random_asr_max=("asr", "max"), random_refusal_mean=("refusal_rate", "mean"),
                 random_refusal_min=("refusal_rate", "min"), random_refusal_max=("refusal_rate", "max"),
                 random_degenerate_mean=("degenerate_frac", "mean"),
                 random_non_answer_mean=("non_answer_rate", "mean"))
            .reset_index())


def asr_curve_frame(asr: pa.Table | pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """The `asr_curve` rows as a frame (model_revision holds analysis.NO_VALUE for null)."""
    df = frame(asr, "asr")
    if df.empty:
        return df
    odd = sorted(set(df["condition"]) - _KNOWN)
    if odd:
        log.warning("asr: conditions %s are not part of a curve (known: %s)", odd, ", ".join(sorted(_KNOWN)))
    df["_level"] = _level(df)
    df = _non_answers(df)
    normal = _normal(df)
    levels = normal[[*_BASE, "asr", "refusal_rate", "degenerate_frac", "non_answer_rate"]].rename(
        columns={"asr": "normal_asr", "refusal_rate": "normal_refusal_rate",
                 "degenerate_frac": "normal_degenerate_frac", "non_answer_rate": "normal_non_answer_rate"})
    target = df[df["condition"].isin(TARGETED)]
    target = target.merge(_random(df), on=[*_BASE, "_level", "op", "eps", "group_size"], how="left")
    out = pd.concat([normal.astype(object), target.astype(object)], ignore_index=True)
    out = out.merge(levels, on=_BASE, how="left")
    out["random_draws"] = out.get("random_draws", pd.Series(np.nan, index=out.index)).fillna(0).astype(int)
    for c in ("random_asr_mean", "random_asr_min", "random_asr_max", "random_refusal_mean", "random_refusal_min",
              "random_refusal_max", "random_degenerate_mean", "random_non_answer_mean"):
        if c not in out.columns:
            out[c] = None
    out["delta_asr"] = pd.to_numeric(out["asr"]) - pd.to_numeric(out["normal_asr"])
    if run_id is not None:
        out["run_id"] = run_id
    out["code_version"] = CODE_VERSION
    out["_order"] = out["condition"].map({"normal": 0}).fillna(1)
    # judges keep the study's order (its first is the headline), not the alphabet's
    out["_judge"] = out["judge"].map({j: i for i, j in enumerate(dict.fromkeys(df["judge"]))})
    keys = [k if k != "judge" else "_judge" for k in _BASE]
    out = out.sort_values([*keys, "_order", "condition", "group_size"], kind="stable")
    return out.drop(columns=["_order", "_level", "_judge"], errors="ignore").reset_index(drop=True)


def asr_curve_table(asr: pa.Table | pd.DataFrame, *, run_id: str | None = None) -> pa.Table:
    """Table `asr_curve` from an `asr` table. run_id None keeps each input row's run id (the latest for the
    pooled normal rows); derived rows carry this code's version."""
    df = asr_curve_frame(asr, run_id)
    return to_table("asr_curve", restore_missing(df, ["model_revision"]) if not df.empty else df)
