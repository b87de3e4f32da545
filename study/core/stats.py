"""Statistics for attack success rates: Wilson intervals and the exact McNemar test.

Pure functions over counts and paired outcomes (no numpy needed), so the `asr` table, the report and a
user's notebook compute the same numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which is where
    a refusing model's ASR lives.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at 0/n and n/n (no rounding)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes (the same prompts, two conditions).

    Only discordant pairs carry information: with b = before-only and c = after-only, under the null each
    discordant pair is a fair coin, so p = min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)]). 1.0 when no
    pair is discordant.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes of different lengths: {len(before)} and {len(after)}")
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)
