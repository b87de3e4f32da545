"""Head specificity: does ablating a head move the output on harmful prompts more than on benign ones?

Goes beyond the paper. A head whose ablation changes the next-token distribution for every prompt (a head
the model needs to function at all) ranks high in Ships on a harmful set without being a *safety* head.
Comparing its mean Ships KL on a harmful set with the same on a benign set, for the same model, operator, ε
and prompt format, separates the two.

The score is s = h / (h + b) with h, b the mean KL on the harmful and benign prompts:
- bounded in [0, 1], 0.5 = no preference, 1 = only harmful prompts are affected;
- symmetric: swapping the two sets maps s to 1 - s;
- scale-free: multiplying every KL by a constant leaves it unchanged, so heads, models and operators whose
  KL magnitudes differ by orders of magnitude compare on one axis;
- defined when one side is 0 (unlike the ratio h / b). The log2 ratio is kept beside it for readers who
  think in fold changes (null where it is undefined).
`rank_specific` ranks heads by h * s ("safety-specific importance"): large only for a head that both
matters (large h) and matters mostly on harmful prompts (s near 1).

A score of 0.51 from a handful of prompts says nothing: `spec_ci_low` / `spec_ci_high` are the 95% percentile
bootstrap interval of s over prompts (harmful and benign prompts resampled separately, BOOTSTRAP_DRAWS draws,
a fixed seed, so a table is reproducible). The report calls a head safety-specific only where the interval
lies above 0.5 (`safety_specific`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis import CODE_VERSION, frame, rank_within, restore_missing, to_table

__all__ = ["BOOTSTRAP_DRAWS", "CONDITION", "bootstrap_interval", "mean_kl", "pooled_specificity",
           "safety_specific", "specificity_frame", "specificity_score", "specificity_table"]

log = logging.getLogger(__name__)

CONDITION = ["model", "model_revision", "prompt_format", "op", "eps"]  # what must match across the two sets
_HEAD = ["layer", "head", "head_label"]
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0
NO_PREFERENCE = 0.5


def safety_specific(ci_low: object) -> bool:
    """A head is safety-specific where its specificity's 95% interval lies above 0.5 (no preference); an
    unknown interval (too few prompts, an older table) is no evidence."""
    try:
        low = float(ci_low)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return low == low and low > NO_PREFERENCE


def bootstrap_interval(harmful: np.ndarray, benign: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5th and 97.5th percentiles, per head, of h / (h + b) over `draws` resamplings of the prompts:
    `harmful` is (harmful prompts x heads) of KL, `benign` (benign prompts x heads). NaN with fewer than 2
    prompts on a side (a single prompt has no spread to resample)."""
    nh, nb = len(harmful), len(benign)
    heads = harmful.shape[1] if harmful.ndim == 2 else 0
    if nh < 2 or nb < 2:
        return np.full(heads, np.nan), np.full(heads, np.nan)
    rng = np.random.default_rng(seed)
    wh = rng.multinomial(nh, np.full(nh, 1 / nh), size=draws) / nh  # draws x prompts: a resample's weights
    wb = rng.multinomial(nb, np.full(nb, 1 / nb), size=draws) / nb
    h, b = np.clip(wh @ harmful, 0.0, None), np.clip(wb @ benign, 0.0, None)  # draws x heads of mean KL
    total = h + b
    s = np.divide(h, total, out=np.full_like(total, NO_PREFERENCE), where=total > 0)
    return np.percentile(s, 2.5, axis=0), np.percentile(s, 97.5, axis=0)


def _per_prompt(df: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """(condition..., dataset) -> prompts x (layer, head) KL (a head a prompt lacks: its mean over prompts)."""
    out = {}
    for key, g in df.groupby([*CONDITION, "dataset"], sort=False, dropna=False):
        m = g.pivot_table(index="prompt_id", columns=["layer", "head"], values="kl", aggfunc="mean")
        out[key] = m.fillna(m.mean())
    return out


def _intervals(ships: pd.DataFrame, p: pd.DataFrame) -> pd.DataFrame:
    """`spec_ci_low` / `spec_ci_high` for every (harmful, benign, head) row of `p`."""
    kl = _per_prompt(ships)
    low = pd.Series(np.nan, index=p.index)
    high = pd.Series(np.nan, index=p.index)
    for key, g in p.groupby([*CONDITION, "dataset", "benign_dataset"], sort=False, dropna=False):
        h, b = kl[key[:-1]], kl[(*key[:-2], key[-1])]
        heads = list(zip(g["layer"], g["head"]))
        lo, hi = bootstrap_interval(h[heads].to_numpy(float), b[heads].to_numpy(float))
        low[g.index], high[g.index] = lo, hi
    p["spec_ci_low"], p["spec_ci_high"] = low, high
    return p


def specificity_score(kl_harmful: float, kl_benign: float) -> float:
    """h / (h + b) with negative KL (float noise) read as 0; 0.5 when both are 0 (no evidence either way)."""
    h, b = max(kl_harmful, 0.0), max(kl_benign, 0.0)
    return 0.5 if h + b == 0 else h / (h + b)


def _score(h: pd.Series, b: pd.Series) -> pd.Series:
    h, b = h.clip(lower=0.0), b.clip(lower=0.0)
    total = h + b
    return (h / total.where(total > 0)).fillna(0.5)


def mean_kl(ships: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """Per (model, revision, format, op, eps, dataset, head): mean KL over prompts (`kl`), prompts (`n`) and
    the latest run id. model_revision holds analysis.NO_VALUE for a null."""
    df = frame(ships, "ships")
    return (df.groupby([*CONDITION, "dataset", *_HEAD], sort=True, dropna=False)
            .agg(kl=("kl", "mean"), n=("prompt_id", "nunique"), run_id=("run_id", "max"))
            .reset_index())


def _benign_set(benign_datasets: Collection[str]) -> set[str]:
    if isinstance(benign_datasets, str) or not all(isinstance(d, str) for d in benign_datasets):
        raise ValueError(f"benign_datasets must be a collection of dataset names, got {benign_datasets!r}")
    return set(benign_datasets)


def specificity_frame(ships: pa.Table | pd.DataFrame, benign_datasets: Collection[str],
                      run_id: str | None = None) -> pd.DataFrame:
    """The `specificity` rows as a frame: every harmful dataset paired with every benign one of the same
    model, revision, operator, ε and format, on the heads both were scanned on."""
    benign = _benign_set(benign_datasets)
    m = mean_kl(ships)
    is_benign = m["dataset"].isin(benign)
    absent = sorted(benign - set(m["dataset"]))
    if absent:
        log.info("benign datasets without Ships rows (skipped): %s", ", ".join(absent))
    p = m[~is_benign].merge(m[is_benign], on=[*CONDITION, *_HEAD], suffixes=("_h", "_b"))
    if p.empty:
        return p
    p = p.rename(columns={"dataset_h": "dataset", "dataset_b": "benign_dataset", "kl_h": "kl_harmful",
                          "kl_b": "kl_benign", "n_h": "n_harmful", "n_b": "n_benign"})
    p["specificity"] = _score(p["kl_harmful"], p["kl_benign"])
    both = (p["kl_harmful"] > 0) & (p["kl_benign"] > 0)
    ratio = p["kl_harmful"].where(both) / p["kl_benign"].where(both)
    p["log2_ratio"] = np.log2(ratio.astype(float))
    group = [*CONDITION, "dataset", "benign_dataset"]
    p["rank_harmful"] = rank_within(p, group, "kl_harmful")
    p["_importance"] = p["kl_harmful"].clip(lower=0.0) * p["specificity"]
    p["rank_specific"] = rank_within(p, group, "_importance")
    p = _intervals(frame(ships, "ships"), p)
    latest = p["run_id_h"].where(p["run_id_h"] >= p["run_id_b"], p["run_id_b"])  # run ids sort by start time
    p["run_id"] = latest if run_id is None else run_id
    p["code_version"] = CODE_VERSION
    return p.sort_values([*group, "rank_harmful"], kind="stable").reset_index(drop=True)


def specificity_table(ships: pa.Table | pd.DataFrame, benign_datasets: Collection[str], *,
                      run_id: str | None = None) -> pa.Table:
    """Table `specificity` from a `ships` table; `benign_datasets` names the benign prompt sets (every other
    dataset is harmful). run_id None keeps the latest input run id of each pair."""
    df = specificity_frame(ships, benign_datasets, run_id)
    return to_table("specificity", restore_missing(df, ["model_revision"]) if not df.empty else df)


def pooled_specificity(spec: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """One specificity per (harmful dataset, head): h / (h + mean of b over its benign datasets), which is the
    table's own value when there is one benign set. Keyed like `mean_kl` (dataset = the harmful one)."""
    df = frame(spec, "specificity")
    if df.empty:
        return pd.DataFrame(columns=[*CONDITION, "dataset", "layer", "head", "specificity"])
    g = (df.groupby([*CONDITION, "dataset", "layer", "head"], sort=False, dropna=False)
         .agg(h=("kl_harmful", "first"), b=("kl_benign", "mean")).reset_index())
    g["specificity"] = _score(g["h"], g["b"])
    return g.drop(columns=["h", "b"])
