"""Operators, hooks and weight edits on tiny models of every covered architecture."""

import pytest
import torch

from study.core.ablation import Ablation, Op
from study.core.architectures import Arch
from study.core.errors import UsageError
from study.core.heads import Head, all_heads
from study.core.interventions import ablated, apply_heads, first_divergent_layer, weights_edited
from tests.tiny_models import CONFIGS, MHA, random_prompts, tiny_model

ARCHS = sorted(CONFIGS)


def _ops(arch: str) -> list[Op]:
    return [Op.UNDIFF_Q, Op.SCALE_V, Op.MEAN] + ([Op.UNDIFF_K] if arch in MHA else [])


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_equal_weight_edits_and_restore(arch):
    model = tiny_model(arch)
    ids = torch.tensor(random_prompts(2, lo=6, hi=6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    normal = _logits(model, ids)
    for op in _ops(arch):
        ab = Ablation(heads=(Head(0, 1), Head(2, 3)), op=op, eps=0.01 if op is not Op.MEAN else 1e-5)
        with ablated(model, ab):
            hooked = _logits(model, ids)
        with weights_edited(model, ab):
            edited = _logits(model, ids)
            assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert (hooked - normal).abs().max() > 1e-6, f"{op} changed nothing"
        torch.testing.assert_close(hooked, edited, atol=1e-9, rtol=0)
        # everything restored: weights bit-exact, outputs identical
        for k, v in model.state_dict().items():
            assert torch.equal(state[k], v), k
        assert torch.equal(_logits(model, ids), normal)


def test_hooks_removed_after_exception():
    model = tiny_model("llama")
    ids = torch.tensor(random_prompts(1, lo=5, hi=5))
    normal = _logits(model, ids)
    with pytest.raises(RuntimeError):
        with ablated(model, Ablation(heads=(Head(1, 1),))):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with weights_edited(model, Ablation(heads=(Head(1, 1),))):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids), normal)


def test_undiff_q_makes_attention_uniform():
    model = tiny_model("llama", attn="eager")
    ids = torch.tensor(random_prompts(1, lo=7, hi=7))
    weights = {}
    attn = model.model.layers[1].self_attn
    handle = attn.register_forward_hook(lambda m, a, o: weights.__setitem__("w", o[1]))
    try:
        with ablated(model, Ablation(heads=(Head(1, 2),), eps=1e-12)):
            model(input_ids=ids, output_attentions=True)
    finally:
        handle.remove()
    w = weights["w"][0]  # (heads, seq, seq)
    seq = w.shape[-1]
    expected = torch.tril(torch.ones(seq, seq, dtype=w.dtype)) / torch.arange(1, seq + 1, dtype=w.dtype)[:, None]
    # HF eager attention takes the softmax in float32, hence 1e-6 and not 1e-9
    torch.testing.assert_close(w[2], expected, atol=1e-6, rtol=0)
    assert (w[1] - expected).abs().max() > 1e-3  # other heads untouched


def test_qwen2_q_bias_is_scaled_and_restored():
    model = tiny_model("qwen2")
    bias = model.model.layers[0].self_attn.q_proj.bias
    before = bias.clone()
    d = Arch.of(model).shape.d_head
    with weights_edited(model, Ablation(heads=(Head(0, 1),), eps=0.5)):
        torch.testing.assert_close(bias[d:2 * d], before[d:2 * d] * 0.5)
        assert torch.equal(bias[:d], before[:d]) and torch.equal(bias[2 * d:], before[2 * d:])
    assert torch.equal(bias, before)


def test_apply_heads_math():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)  # (rows, heads, d_head)
    scale = torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    out = apply_heads(x, scale, None)
    torch.testing.assert_close(out[0, 1], x[0, 1] * 0.5)
    torch.testing.assert_close(out[1, 2], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], x[0, 0])
    mean = torch.tensor([[False, True, False], [False, False, False]])
    out = apply_heads(x, None, mean)
    torch.testing.assert_close(out[0, 1], x[0].mean(0))
    torch.testing.assert_close(out[1], x[1])


def test_undiff_k_under_gqa_refuses_and_works_for_mha():
    gqa = tiny_model("llama")
    with pytest.raises(UsageError, match="GQA"):
        Ablation(heads=(Head(0, 0),), op=Op.UNDIFF_K).check(Arch.of(gqa).shape)
    mha = tiny_model("gemma")
    Ablation(heads=(Head(0, 3),), op=Op.UNDIFF_K).check(Arch.of(mha).shape)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_eps_outside_unit_interval_rejected(eps):
    with pytest.raises(UsageError, match="eps"):
        Ablation(heads=(Head(0, 0),), op=Op.UNDIFF_Q, eps=eps)


def test_out_of_range_head_rejected():
    arch = Arch.of(tiny_model("llama"))
    with pytest.raises(UsageError, match="L3H0"):
        Ablation(heads=(Head(3, 0),)).check(arch.shape)
    with pytest.raises(UsageError, match="L0H4"):
        Ablation(heads=(Head(0, 4),)).check(arch.shape)


def test_first_divergent_layer():
    arch = Arch.of(tiny_model("llama"))
    base = Ablation(heads=(Head(1, 0),))
    rows = [base.with_head(Head(2, 1)), base.with_head(Head(0, 3)), base, Ablation(), Ablation(heads=(Head(1, 0),),
                                                                                              eps=1e-3)]
    assert first_divergent_layer(rows, base, arch).tolist() == [2, 0, 3, 1, 1]


def test_ablation_label_and_order():
    ab = Ablation(heads=(Head(3, 8), Head(2, 26), Head(3, 8)), op=Op.UNDIFF_Q, eps=1e-5)
    assert ab.heads == (Head(2, 26), Head(3, 8))
    assert ab.label == "undiff_q:1e-05:L2H26,L3H8"
    assert Ablation().label == "none"
    assert {h.label for h in all_heads(2, 2)} == {"L0H0", "L0H1", "L1H0", "L1H1"}
