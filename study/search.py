"""Sahara: the greedy head-group search over an injected, batched scoring function.

The search knows nothing about models: `score_fn(group, candidates)` returns one score per candidate for
the group `group + (candidate,)`, always measured against the normal model. The same loop therefore runs
with a local engine, on a Ray pool, or on a synthetic score in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from study.heads import Head

log = logging.getLogger(__name__)

ScoreFn = Callable[[tuple[Head, ...], Sequence[Head]], Sequence[float]]


@dataclass(frozen=True)
class Step:
    """One greedy step: every candidate's score given the group chosen before it, and the winner."""

    step: int  # 1-based
    group: tuple[Head, ...]  # chosen before this step
    candidates: tuple[Head, ...]
    scores: tuple[float, ...]
    chosen: Head

    @property
    def best(self) -> float:
        return max(self.scores)


def sahara(candidates: Sequence[Head], score_fn: ScoreFn, steps: int, *, min_gain: float | None = None,
           on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Greedily grow a head group for up to `steps` steps.

    Each step scores G ∪ {h} for every h not in G and adds the best (ties: the first candidate in order).
    With `min_gain`, the search stops before taking a step whose best score improves on the previous
    step's best by less than `min_gain`; that step's scores are still returned (its `chosen` head is
    reported but not added). Returns the steps taken, in order.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    pool = list(dict.fromkeys(candidates))
    group: tuple[Head, ...] = ()
    done: list[Step] = []
    previous = None
    for s in range(1, min(steps, len(pool)) + 1):
        cands = tuple(h for h in pool if h not in group)
        scores = tuple(float(x) for x in score_fn(group, cands))
        if len(scores) != len(cands):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(cands)} candidates")
        best = max(range(len(cands)), key=lambda i: (scores[i], -i))
        step = Step(s, group, cands, scores, cands[best])
        done.append(step)
        if on_step:
            on_step(step)
        if min_gain is not None and previous is not None and step.best - previous < min_gain:
            log.info("sahara: step %d gains %.4g < min_gain %.4g, stopping", s, step.best - previous, min_gain)
            break
        group = group + (cands[best],)
        previous = step.best
    return done


def final_group(steps: Sequence[Step], min_gain: float | None = None) -> tuple[Head, ...]:
    """The group the search settled on (a last step that failed `min_gain` does not count)."""
    if not steps:
        return ()
    last = steps[-1]
    if min_gain is not None and len(steps) > 1 and last.best - steps[-2].best < min_gain:
        return last.group
    return last.group + (last.chosen,)
