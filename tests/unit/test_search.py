"""Generalized Ships through the engine (prefix reuse across Sahara steps) and the greedy search."""

import itertools

import pytest
import torch

from study.core.ablation import Ablation
from study.core.engine import ScanEngine, naive_scan
from study.core.heads import Head, all_heads
from study.core.scores import generalized_ships
from study.core.search import final_group, sahara
from study.core.subspace import SubspaceSpec
from study.runtime.worker import GeneralizedShipsScorer
from tests.planted import GROUP, benign_prompts, harmful_prompts, planted_group_model
from tests.tiny_models import random_prompts, tiny_model


@pytest.mark.parametrize("spec", [SubspaceSpec.paper(), SubspaceSpec(rank=2, side="right", center=True)])
def test_scorer_equals_naive_generalized_ships(spec):
    model = tiny_model("llama")
    prompts = random_prompts(6)
    engine = ScanEngine(model, 0, token_budget=50)
    scorer = GeneralizedShipsScorer(engine, prompts, spec, op=Ablation().op, eps=1e-5)
    group = (Head(1, 3),)
    cands = [h for h in all_heads(3, 4) if h not in group]
    fast = scorer(group, cands)
    normal = naive_scan(model, prompts, [Ablation()]).hidden[0]
    ablated = naive_scan(model, prompts, [Ablation(heads=group + (h,)) for h in cands]).hidden
    slow = [generalized_ships(normal, ablated[i], spec) for i in range(len(cands))]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-7, rtol=1e-9)
    assert max(slow) > 1e-3


def test_search_finds_greedy_optimum_that_is_not_top_singles():
    heads = all_heads(3, 4)
    single = {h: 0.1 * (i % 5) for i, h in enumerate(heads)}
    x, a, b = Head(2, 3), Head(0, 3), Head(1, 1)
    single[x], single[a], single[b] = 5.0, 4.0, 1.0  # top-2 singles: x, a

    def score(group, cands):
        out = []
        for h in cands:
            g = set(group) | {h}
            s = sum(single[k] for k in g)
            if {x, b} <= g:
                s += 10.0  # x and b together matter far more than x and a
            out.append(s)
        return out

    steps = sahara(heads, score, steps=2)
    assert [s.chosen for s in steps] == [x, b]
    assert final_group(steps) == (x, b)
    # the greedy answer is the exhaustive optimum over pairs containing the best single head
    best_pair = max(itertools.combinations(heads, 2), key=lambda p: score((p[0],), [p[1]])[0])
    assert set(best_pair) == {x, b}
    assert steps[1].group == (x,) and len(steps[1].candidates) == len(heads) - 1


def test_search_min_gain_stops():
    heads = all_heads(2, 2)
    steps = sahara(heads, lambda g, c: [len(g) * 0.01 + 1.0 + 0.1 * i for i, _ in enumerate(c)], steps=4,
                   min_gain=0.5)
    assert len(steps) == 2  # step 2 gains < 0.5 and stops the search
    assert final_group(steps, 0.5) == (steps[0].chosen,)


def test_search_keeps_chosen_heads_ablated():
    seen = []

    def score(group, cands):
        seen.append(group)
        return [1.0] * len(cands)

    steps = sahara(all_heads(2, 2), score, steps=3)
    assert seen == [(), (steps[0].chosen,), (steps[0].chosen, steps[1].chosen)]


def test_sahara_recovers_planted_group():
    model = planted_group_model()
    prompts = harmful_prompts(6) + benign_prompts(3)
    engine = ScanEngine(model, 0)
    scorer = GeneralizedShipsScorer(engine, prompts, SubspaceSpec.paper(), op=Ablation().op, eps=1e-5)
    heads = all_heads(2, 4)
    steps = sahara(heads, scorer, steps=2)
    assert set(final_group(steps)) == set(GROUP)
    # the pair matters far more than its members alone: a group effect, not two strong singles
    singles = dict(zip(steps[0].candidates, steps[0].scores))
    pair = steps[1].best
    assert pair > 5 * (singles[GROUP[0]] + singles[GROUP[1]])


def test_a_screened_step_picks_among_exact_scores():
    from study.core.search import GreedySearch

    heads = all_heads(2, 2)
    search = GreedySearch(heads, 1)
    step = search.submit([5.0, 9.0, 4.0, 3.0], exact=[True, False, True, False])
    assert step.chosen == heads[0] and step.best == 5.0  # the screened 9.0 cannot win
    with pytest.raises(ValueError, match="exact"):
        GreedySearch(heads, 1).submit([1.0, 2.0, 3.0, 4.0], exact=[False] * 4)
