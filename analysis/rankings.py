"""Head rankings per condition (model, dataset, operator, ε, prompt format, source): the `rankings` table.

Two sources rank heads differently and both are kept, side by side, in one table:
- `ships`: query-level Ships KL averaged over a dataset's prompts, plus how often the head is in a prompt's
  top k (a head with a large mean driven by one prompt has a small `topk_frac`);
- `head_scores`: the dataset-level generalized Ships angle, with the rank its writer gave it (one ranking
  per subspace / rank r / centering variant).
`specificity` (see analysis.specificity) is filled for Ships rankings of harmful datasets with a benign
counterpart, so a reader sees at once whether a top head is safety-specific or generally important.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis import CODE_VERSION, NO_VALUE, frame, is_missing, rank_within, restore_missing, to_table
from analysis.specificity import pooled_specificity

__all__ = ["check_k", "head_score_rankings", "rankings_table", "ships_rankings", "variant_label"]

log = logging.getLogger(__name__)

CONDITION = ["model", "model_revision", "dataset", "prompt_format", "op", "eps"]
_HEAD = ["layer", "head", "head_label"]


def check_k(k: int) -> int:
    """k as an int >= 1; ValueError otherwise (a top-0 set compares nothing)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"bad k {k!r}: expected an integer >= 1 (heads per top-k set)")
    return int(k)


def variant_label(subspace: object, rank_r: object, centered: object) -> str | None:
    """`left:r1` (`:centered` appended when centred) for a head_scores ranking; None for a Ships one."""
    if is_missing(subspace) or subspace == NO_VALUE:
        return None
    return f"{subspace}:r{int(rank_r)}" + (":centered" if centered is True or centered == 1 else "")


def ships_rankings(ships: pa.Table | pd.DataFrame, k: int = 10, run_id: str | None = None) -> pd.DataFrame:
    """Per condition and head: mean KL over prompts (`score`), the share of prompts that put the head in their
    top min(k, heads) (`topk_frac`), and the rank by mean KL (ties by layer, head). A frame with the
    `rankings` columns; model_revision holds analysis.NO_VALUE for null, specificity is left null."""
    k = check_k(k)
    df = frame(ships, "ships")
    if df.empty:
        return df
    df["_n_heads"] = df.groupby(CONDITION, dropna=False)["head_label"].transform("nunique")
    df["_hit"] = (df["rank"] <= np.minimum(k, df["_n_heads"])).astype(float)
    g = (df.groupby([*CONDITION, *_HEAD], sort=True, dropna=False)
         .agg(score=("kl", "mean"), n_prompts=("prompt_id", "nunique"), topk_frac=("_hit", "mean"),
              n_heads=("_n_heads", "first"), run_id=("run_id", "max"))
         .reset_index())
    g["k"] = np.minimum(k, g["n_heads"])
    g["rank"] = rank_within(g, CONDITION, "score")
    g["source"] = "ships"
    g["subspace"], g["rank_r"], g["centered"] = None, None, None
    if run_id is not None:
        g["run_id"] = run_id
    return g


def head_score_rankings(head_scores: pa.Table | pd.DataFrame, k: int = 10,
                        run_id: str | None = None) -> pd.DataFrame:
    """Per condition, variant and head: the generalized Ships angle (`score`) and its stored rank. A head
    listed twice in one ranking (a table appended to) keeps its last row, with a warning."""
    k = check_k(k)
    df = frame(head_scores, "head_scores")
    if df.empty:
        return df
    variant = ["subspace", "rank_r", "centered"]
    dup = df.duplicated([*CONDITION, *variant, "layer", "head"], keep="last")
    if dup.any():
        log.warning("head_scores: %d duplicate head rows in one ranking; keeping the last of each", int(dup.sum()))
        df = df[~dup]
    df["n_heads"] = df.groupby([*CONDITION, *variant], dropna=False)["head_label"].transform("nunique")
    df = df.rename(columns={"angle_deg": "score"})
    df["k"] = np.minimum(k, df["n_heads"])
    df["n_prompts"], df["topk_frac"] = None, None
    df["source"] = "head_scores"
    if run_id is not None:
        df["run_id"] = run_id
    return df.sort_values([*CONDITION, *variant, "rank"], kind="stable").reset_index(drop=True)


def rankings_table(ships: pa.Table | pd.DataFrame | None = None,
                   head_scores: pa.Table | pd.DataFrame | None = None, *, k: int = 10,
                   specificity: pa.Table | pd.DataFrame | None = None, run_id: str | None = None) -> pa.Table:
    """Table `rankings` from whichever of `ships` and `head_scores` is given.

    `specificity` (a `specificity` table) fills the column of the same name for Ships rankings of harmful
    datasets: h / (h + mean benign KL) over the benign sets paired with that dataset. run_id None keeps the
    latest input run id of each condition; derived rows carry this code's version.
    """
    parts = []
    if ships is not None:
        s = ships_rankings(ships, k, run_id)
        if not s.empty and specificity is not None:
            spec = pooled_specificity(specificity)
            s = s.merge(spec, on=["model", "model_revision", "prompt_format", "op", "eps", "dataset", "layer", "head"],
                        how="left")
        parts.append(s)
    if head_scores is not None:
        parts.append(head_score_rankings(head_scores, k, run_id))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return to_table("rankings", pd.DataFrame())
    out = pd.concat([p.astype(object) for p in parts], ignore_index=True)
    if "specificity" not in out.columns:
        out["specificity"] = None
    out["code_version"] = CODE_VERSION
    out["_variant"] = [variant_label(*v) or "" for v in zip(out["subspace"], out["rank_r"], out["centered"])]
    out = out.sort_values([*CONDITION, "source", "_variant", "rank"], kind="stable")
    return to_table("rankings", restore_missing(out, ["model_revision"]))
