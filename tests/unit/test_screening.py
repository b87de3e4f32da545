"""Screening: every ablation scored in low precision, each prompt's top candidates re-scored exactly."""

import pytest
import torch

from study.core.ablation import Ablation
from study.core.engine import ScanEngine, naive_scan
from study.core.heads import all_heads
from study.core.screening import candidates, screen_copy, screened_scan, top_agreement
from tests.planted import PLANTED, harmful_prompts, planted_model
from tests.tiny_models import random_prompts, tiny_model


def test_rescored_rows_are_exact_and_marked():
    model = tiny_model("llama")
    prompts = random_prompts(5, lo=4, hi=9)
    ablations = [Ablation(heads=(h,)) for h in all_heads(3, 4)]
    exact, screen = ScanEngine(model, 0), ScanEngine(screen_copy(model, "bf16"), 0)
    res = screened_scan(exact, screen, prompts, ablations, verify_top=2)
    ref = naive_scan(model, prompts, ablations).kl
    chosen = candidates(res.screen_kl, 2)
    assert 2 <= int(chosen.sum()) < len(ablations)  # a real subset was re-scored
    assert torch.equal(res.exact, chosen[:, None].expand_as(res.exact))
    torch.testing.assert_close(res.kl[res.exact], ref[res.exact], atol=1e-9, rtol=0)
    assert torch.equal(res.kl[~res.exact], res.screen_kl[~res.exact])
    assert ((res.screen_kl - ref).abs() / ref).max() > 1e-3  # the screen really is approximate
    for j in range(len(prompts)):  # each prompt's screened top 2 were re-scored
        assert res.exact[res.screen_kl[:, j].topk(2).indices, j].all()


def test_screened_ranking_finds_the_planted_head():
    model = planted_model()
    prompts = harmful_prompts(6)
    heads = all_heads(2, 4)
    ablations = [Ablation(heads=(h,)) for h in heads]
    res = screened_scan(ScanEngine(model, 0), ScanEngine(screen_copy(model, "bf16"), 0), prompts, ablations,
                        verify_top=3)
    top = res.kl.argmax(dim=0)
    assert [heads[i] for i in top] == [PLANTED] * len(prompts)
    assert res.exact[top, torch.arange(len(prompts))].all()  # the winner's score is an exact one


def test_verifying_everything_is_the_exact_scan():
    model = tiny_model("qwen2")
    prompts = random_prompts(3)
    ablations = [Ablation(heads=(h,)) for h in all_heads(3, 4)]
    res = screened_scan(ScanEngine(model, 0), ScanEngine(screen_copy(model, "bf16"), 0), prompts, ablations,
                        verify_top=len(ablations))
    assert res.exact.all()
    torch.testing.assert_close(res.kl, naive_scan(model, prompts, ablations).kl, atol=1e-9, rtol=0)


def test_top_agreement_and_bad_input():
    ref = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])  # (ablations, prompts)
    same_sets = torch.tensor([[2.0, 1.5], [3.0, 2.0], [1.0, 3.0]])  # prompt 0: order changed, set kept
    assert top_agreement(same_sets, ref, k=2) == 1.0
    assert top_agreement(torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 3.0]]), ref, k=2) == 0.5  # prompt 0 differs
    with pytest.raises(ValueError, match="screening dtype"):
        screen_copy(tiny_model("llama"), "int8")
    with pytest.raises(ValueError, match="verify_top"):
        screened_scan(None, None, [[1]], [Ablation()], verify_top=0)
