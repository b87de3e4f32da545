"""Screening: score every ablation cheaply (a bfloat16 copy of the model), then re-score the candidates that
matter exactly (each prompt's top K under the screen), and say which scores are exact.

On big models most (head, prompt) scores are small and only their order near the top is used (rankings,
Sahara's next head). A bfloat16 scan is 2x faster on a CPU with AMX and more on accelerators, but it reorders
close scores (on SmolLM2 its top 10 equals the float32 top 10 on 5 of 8 prompts), so what a ranking reads
from the top is re-scored at full precision. A screened score is never passed off as exact: `exact` marks
the rows that were re-scored.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from study.core.ablation import Ablation
from study.core.dtypes import SCREEN_DTYPES
from study.core.engine import ScanEngine
from study.core.ranking import top_union

log = logging.getLogger(__name__)


@dataclass
class ScreenedResult:
    """kl: (ablations, prompts) float64, the exact value where `exact`, else the screen's; exact: same shape,
    bool; screen_kl: the screen's value everywhere (to measure what screening changes)."""

    kl: torch.Tensor
    exact: torch.Tensor
    screen_kl: torch.Tensor
    screen_seconds: float
    verify_seconds: float


def screen_copy(model: nn.Module, dtype: str) -> nn.Module:
    """A low-precision copy of `model` for screening (the original stays as it is for exact scores)."""
    if dtype not in SCREEN_DTYPES:
        raise ValueError(f"unknown screening dtype {dtype!r}: use one of {', '.join(SCREEN_DTYPES)}")
    return copy.deepcopy(model).to(getattr(torch, SCREEN_DTYPES[dtype]))


def candidates(screen_kl: torch.Tensor, verify_top: int) -> torch.Tensor:
    """(ablations, prompts) screened KLs -> (ablations,) bool: the ablations in any prompt's top `verify_top`."""
    chosen = torch.zeros(screen_kl.shape[0], dtype=torch.bool)
    chosen[torch.as_tensor(top_union(screen_kl.T.numpy(), verify_top))] = True
    return chosen


def screened_scan(exact: ScanEngine, screen: ScanEngine, prompts: Sequence[Sequence[int]],
                  ablations: Sequence[Ablation], *, verify_top: int, base: Ablation | None = None) -> ScreenedResult:
    """KL of every ablation on every prompt from `screen`, with each prompt's top `verify_top` re-scored by
    `exact`. The re-scored set is the union over prompts (so a candidate is exact on every prompt), which
    keeps the exact pass one batched scan."""
    if verify_top < 1:
        raise ValueError("verify_top must be >= 1")
    t0 = time.perf_counter()
    screen_kl = screen.scan(prompts, ablations, base=base, hidden=False).kl  # (ablations, prompts)
    t1 = time.perf_counter()
    chosen = candidates(screen_kl, verify_top)
    idx = torch.nonzero(chosen).flatten()
    exact_kl = exact.scan(prompts, [ablations[i] for i in idx.tolist()], base=base, hidden=False).kl
    t2 = time.perf_counter()
    kl = screen_kl.clone()
    kl[idx] = exact_kl
    mask = torch.zeros_like(kl, dtype=torch.bool)
    mask[idx] = True
    log.info("screened %d ablations x %d prompts in %.1f s; re-scored %d exactly in %.1f s",
             len(ablations), len(prompts), t1 - t0, len(idx), t2 - t1)
    return ScreenedResult(kl, mask, screen_kl, t1 - t0, t2 - t1)


def top_agreement(kl: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Share of prompts whose top-k ablations (as a set) equal the reference's: how often screening changed
    what a ranking reads."""
    k = min(k, kl.shape[0])
    a = kl.topk(k, dim=0).indices.T.sort(dim=1).values  # (prompts, k)
    b = reference.topk(k, dim=0).indices.T.sort(dim=1).values
    return float((a == b).all(dim=1).float().mean())

