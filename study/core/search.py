"""Sahara: the greedy head-group search over an injected, batched scoring function.

The search knows nothing about models: `score_fn(group, candidates)` returns one score per candidate for
the group `group + (candidate,)`, always measured against the normal model. The same loop therefore runs
with a local engine, on a Ray pool, or on a synthetic score in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from study.core.heads import Head

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
    exact: tuple[bool, ...] | None = None  # a screened step: which scores are exact (the winner is one)

    @property
    def best(self) -> float:
        if self.exact is None:
            return max(self.scores)
        return max(s for s, e in zip(self.scores, self.exact) if e)


class GreedySearch:
    """The greedy loop as a state machine, so a driver can advance many searches at once (one per model)
    and resume one from stored scores: `request()` is the current step's (group, candidates); `submit()`
    takes one score per candidate (for `group + (candidate,)`, against the normal model).

    Each step adds the best candidate (ties: the first in order). With `min_gain`, the search stops before
    taking a step whose best score improves on the previous step's best by less than `min_gain`; that
    step's scores are still kept (its `chosen` head is reported but not added).
    """

    def __init__(self, candidates: Sequence[Head], steps: int, *, min_gain: float | None = None) -> None:
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.pool = list(dict.fromkeys(candidates))
        self.max_steps = min(steps, len(self.pool))
        self.min_gain = min_gain
        self.group: tuple[Head, ...] = ()
        self.steps: list[Step] = []
        self._stopped = False

    @property
    def done(self) -> bool:
        return self._stopped or len(self.steps) >= self.max_steps

    def request(self) -> tuple[tuple[Head, ...], tuple[Head, ...]]:
        if self.done:
            raise RuntimeError("the search is done")
        return self.group, tuple(h for h in self.pool if h not in self.group)

    def submit(self, scores: Sequence[float], exact: Sequence[bool] | None = None) -> Step:
        """Record one step's scores; `exact` (screening): only exact scores may win."""
        group, cands = self.request()
        scores = tuple(float(x) for x in scores)
        if len(scores) != len(cands):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(cands)} candidates")
        flags = None if exact is None else tuple(bool(e) for e in exact)
        eligible = [i for i in range(len(cands)) if flags is None or flags[i]]
        if not eligible:
            raise ValueError("a screened step needs at least one exact score")
        best = max(eligible, key=lambda i: (scores[i], -i))
        step = Step(len(self.steps) + 1, group, cands, scores, cands[best], flags)
        previous = self.steps[-1].best if self.steps else None
        self.steps.append(step)
        if self.min_gain is not None and previous is not None and step.best - previous < self.min_gain:
            log.info("sahara: step %d gains %.4g < min_gain %.4g, stopping", step.step, step.best - previous,
                     self.min_gain)
            self._stopped = True
        else:
            self.group = group + (step.chosen,)
        return step


def sahara(candidates: Sequence[Head], score_fn: ScoreFn, steps: int, *, min_gain: float | None = None,
           on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Greedily grow a head group for up to `steps` steps with a batched `score_fn(group, candidates)`.

    See `GreedySearch` for the rule. Returns the steps taken, in order.
    """
    search = GreedySearch(candidates, steps, min_gain=min_gain)
    while not search.done:
        step = search.submit(score_fn(*search.request()))
        if on_step:
            on_step(step)
    return search.steps


def final_group(steps: Sequence[Step], min_gain: float | None = None) -> tuple[Head, ...]:
    """The group the search settled on (a last step that failed `min_gain` does not count)."""
    if not steps:
        return ()
    last = steps[-1]
    if min_gain is not None and len(steps) > 1 and last.best - steps[-2].best < min_gain:
        return last.group
    return last.group + (last.chosen,)
