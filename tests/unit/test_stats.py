"""Wilson intervals and exact McNemar p-values against scipy/statsmodels-free closed forms and scipy."""

import math

import pytest
from scipy import stats as sps

from study.core.stats import mcnemar_exact, wilson


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 10), (32, 100), (1, 1), (50, 100)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_width_at_100_is_about_ten_points():
    lo, hi = wilson(50, 100)
    assert 0.09 < (hi - lo) / 2 < 0.1  # METHOD.md: at N = 100 a 95 % interval is about +-10 points


def test_wilson_empty_and_bad():
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(5, 3)


@pytest.mark.parametrize("b,c,same", [(0, 0, 5), (3, 0, 4), (2, 9, 10), (10, 10, 0), (1, 12, 30)])
def test_mcnemar_exact_is_a_two_sided_binomial_test_on_discordant_pairs(b, c, same):
    before = [True] * b + [False] * c + [True] * same
    after = [False] * b + [True] * c + [True] * same
    p = mcnemar_exact(before, after)
    if b + c == 0:
        assert p == 1.0
    else:
        assert p == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert mcnemar_exact(after, before) == p  # symmetric


def test_mcnemar_concordant_pairs_do_not_matter_and_lengths_must_match():
    assert mcnemar_exact([True, False, True], [False, False, True]) == mcnemar_exact([True], [False])
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])
