"""Families with a norm on q and k after the projections (Qwen3, Gemma3, OLMo2): the q/k operators act on the
norm's output, as the architecture table says, and the weight edits exist only where they can express that."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from study.core.ablation import Ablation, Op, Site
from study.core.architectures import Arch, arch_for, weight_view
from study.core.engine import ScanEngine, naive_scan
from study.core.errors import UsageError
from study.core.heads import Head, all_heads
from study.core.interventions import ablated, weights_edited
from study.core.shape import ModelShape
from study.generation.decoding import parse_decoding
from study.generation.hf import HFGenerator
from study.models.mixing import mix
from study.models.recipes import Recipe
from study.models.surgery import save_ablated
from tests.tiny_models import QK_NORM_CONFIGS, random_prompts, tiny_model

QK = sorted(QK_NORM_CONFIGS)
PER_HEAD = ("gemma3_text", "qwen3")  # one RMSNorm per head, its weight shared by the heads
HEADS = (Head(0, 1), Head(1, 3), Head(2, 0))  # several layers


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("arch", QK)
def test_shape_and_row(arch):
    model = tiny_model(arch)
    a = Arch.of(model)
    assert a.shape == ModelShape.from_config(model.config.to_dict())
    assert a.shape.d_head == (8 if arch == "olmo2" else 12)  # explicit head_dim differs from hidden / heads
    assert a.site_module(model, 1, Site.Q) is model.model.layers[1].self_attn.q_norm
    assert a.site_module(model, 1, Site.K) is model.model.layers[1].self_attn.k_norm
    assert a.projection(model, 1, Site.Q) is model.model.layers[1].self_attn.q_proj
    assert a.logit_softcap(model) == (5.0 if arch == "gemma3_text" else None)


def test_multimodal_gemma3_is_not_a_row():
    with pytest.raises(UsageError, match="gemma3_text"):
        arch_for("gemma3")


@pytest.mark.parametrize("arch", QK)
def test_engine_equals_naive(arch):
    model = tiny_model(arch)
    engine = ScanEngine(model, pad_id=0, token_budget=40)  # small budget: several groups and chunks
    shape = engine.arch.shape
    prompts = random_prompts(5, lo=3, hi=10)  # longer than Gemma3's sliding window of 4
    ops = [(Op.UNDIFF_Q, 1e-5), (Op.SCALE_V, 0.3), (Op.MEAN, 1e-5)]
    ablations = [Ablation(heads=(h,), op=op, eps=eps) for op, eps in ops
                 for h in all_heads(shape.n_layers, shape.n_heads)]
    ablations += [Ablation(heads=HEADS, op=op, eps=eps) for op, eps in ops] + [Ablation()]
    fast = engine.scan(prompts, ablations)
    ref = naive_scan(model, prompts, ablations)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    assert ref.kl[-4:-1].min() > 1e-7  # each operator on several heads does something on every prompt
    assert fast.kl[-1].abs().max() < 1e-12
    assert fast.layer_rows < ref.layer_rows


@pytest.mark.parametrize("arch", QK)
@pytest.mark.parametrize("layer", [0, 1])  # Gemma3: a sliding-window layer, then a full one
@pytest.mark.parametrize("op", [Op.UNDIFF_Q, Op.UNDIFF_K])
def test_undiff_makes_the_heads_attention_uniform(arch, layer, op):
    """Direct check of the site: the ablated head attends uniformly over the positions its mask allows.

    The norms' eps is 0 here so that a scale acting before the norm would be undone entirely (with an eps, a
    tiny enough pre-norm scale also flattens the attention, and this test could not tell the sites apart).
    undiff_k runs on a variant without GQA (one key head per query head)."""
    mha = {"num_key_value_heads": 4} if op is Op.UNDIFF_K else {}
    model = tiny_model(arch, attn="eager", rms_norm_eps=0.0, **mha)
    ids = torch.tensor(random_prompts(1, lo=7, hi=7))
    captured = {}
    attn = model.model.layers[layer].self_attn
    handle = attn.register_forward_hook(lambda m, a, o: captured.__setitem__("w", o[1]))
    try:
        with ablated(model, Ablation(heads=(Head(layer, 2),), op=op, eps=1e-12)):
            model(input_ids=ids, output_attentions=True)
    finally:
        handle.remove()
    w = captured["w"][0]  # (heads, seq, seq)
    allowed = (w[0] > 0).to(w.dtype)  # the mask, read off an untouched head
    expected = allowed / allowed.sum(-1, keepdim=True)
    torch.testing.assert_close(w[2], expected, atol=1e-6, rtol=0)  # eager softmax runs in float32
    assert (w[1] - expected).abs().max() > 1e-3  # the other heads are untouched
    if arch == "gemma3_text" and layer == 0:
        assert allowed[-1].sum() < ids.shape[1]  # the sliding window is in force


@pytest.mark.parametrize("arch", PER_HEAD)
def test_scaling_before_a_per_head_norm_is_a_no_op(arch):
    """Why the table names the norm: the same scale on q_proj's head rows (and bias) is undone by the norm.

    Exactly only without the norm's eps (set to 0 here; a power-of-two scale keeps float32 exact): with it,
    a pre-norm scale c gives c / sqrt(c^2 ms + eps), which depends on eps, not the operator."""
    model = tiny_model(arch, rms_norm_eps=0.0)
    a = Arch.of(model)
    ids = torch.tensor(random_prompts(2, lo=7, hi=7))
    normal = _logits(model, ids)
    ab = Ablation(heads=HEADS, eps=2.0 ** -10)
    with ablated(model, ab):
        hooked = _logits(model, ids)
    assert (hooked - normal).abs().max() > 1e-3
    state = _state(model)
    with torch.no_grad():
        for h in HEADS:
            q = a.projection(model, h.layer, Site.Q)
            for t in (weight_view(q, Site.Q), q.bias.data if q.bias is not None else None):
                if t is not None:
                    a.projection_view(t, Site.Q)[..., h.head, :] *= ab.eps
    torch.testing.assert_close(_logits(model, ids), normal, atol=1e-12, rtol=0)
    model.load_state_dict(state)


def test_scaling_before_a_norm_over_all_heads_changes_the_other_heads():
    """OLMo2's q norm spans every head: a pre-norm scale of one head moves the others' queries; the hook scales
    exactly that head's final query and leaves the others bit-equal."""
    model = tiny_model("olmo2")
    a = Arch.of(model)
    ids = torch.tensor(random_prompts(1, lo=6, hi=6))
    norm = a.site_module(model, 1, Site.Q)
    ab = Ablation(heads=(Head(1, 2),), eps=0.5)

    def final_q() -> torch.Tensor:
        """(batch, seq, heads, d_head) layer 1's final queries; hooked last, after any ablation's hook."""
        out = []
        handle = norm.register_forward_hook(lambda m, i, o: out.append(a.part_view(o.clone(), Site.Q)))
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
        return out[0]

    normal = final_q()
    with ablated(model, ab):
        hooked = final_q()
    with weights_edited(model, ab):  # the norm's weight slice
        edited = final_q()
    with torch.no_grad():
        a.projection_view(weight_view(a.projection(model, 1, Site.Q), Site.Q), Site.Q)[..., 2, :] *= 0.5
    before_norm = final_q()
    others = [0, 1, 3]
    assert torch.equal(hooked[..., others, :], normal[..., others, :])
    torch.testing.assert_close(hooked[..., 2, :], normal[..., 2, :] * 0.5, atol=1e-12, rtol=0)
    torch.testing.assert_close(edited, hooked, atol=1e-12, rtol=0)
    assert (before_norm[..., others, :] - normal[..., others, :]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", QK)
def test_weight_edits_equal_hooks_where_they_exist(arch):
    model = tiny_model(arch, num_key_value_heads=4)  # without GQA, so undiff_k is defined
    ids = torch.tensor(random_prompts(2, lo=6, hi=6))
    state = _state(model)
    normal = _logits(model, ids)
    ops = [Op.SCALE_V] + ([Op.UNDIFF_Q, Op.UNDIFF_K] if arch == "olmo2" else [])  # OLMo2: the norms' weight slices
    for op in ops:
        ab = Ablation(heads=HEADS, op=op, eps=0.01)
        with ablated(model, ab):
            hooked = _logits(model, ids)
        with weights_edited(model, ab):
            edited = _logits(model, ids)
        assert (hooked - normal).abs().max() > 1e-6, op
        torch.testing.assert_close(hooked, edited, atol=1e-9, rtol=0)
        _assert_state(model, state)


@pytest.mark.parametrize("arch,op", [(a, o) for a in PER_HEAD for o in (Op.UNDIFF_Q, Op.UNDIFF_K)]
                         + [(a, Op.MEAN) for a in QK])
def test_weight_edits_refuse_what_they_cannot_express(arch, op, tmp_path):
    model = tiny_model(arch, num_key_value_heads=4)
    name = Arch.of(model).spec.name
    state = _state(model)
    ab = Ablation(heads=HEADS, op=op, eps=1e-5)
    with pytest.raises(UsageError, match=f"{op.value} on {name} cannot be written into the weights.*hooks"):
        with weights_edited(model, ab):
            pass
    lm = SimpleNamespace(model=model, tokenizer=SimpleNamespace(save_pretrained=lambda p: None), model_id=arch)
    with pytest.raises(UsageError, match="cannot be written into the weights"):
        save_ablated(lm, ab, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _assert_state(model, state)  # refused before anything was written
    ids = torch.tensor(random_prompts(1, lo=5, hi=5))
    normal = _logits(model, ids)
    with ablated(model, ab):  # the hooks do it
        assert (_logits(model, ids) - normal).abs().max() > 1e-6


def test_surgery_on_olmo2_edits_the_q_norm_slices(tmp_path):
    model = tiny_model("olmo2")
    before = _state(model)
    lm = SimpleNamespace(model=model, tokenizer=SimpleNamespace(save_pretrained=lambda p: None), model_id="olmo2")
    info = save_ablated(lm, Ablation(heads=HEADS, eps=1e-10), tmp_path / "out")
    d = Arch.of(model).shape.d_head
    assert info["edited_parameters"] == len(HEADS) * d
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    for h in HEADS:
        key = f"model.layers.{h.layer}.self_attn.q_norm.weight"
        block = slice(h.head * d, (h.head + 1) * d)
        torch.testing.assert_close(saved[key][block], before[key][block] * 1e-10)
    after = _state(model)  # the model in memory is its own again, bit for bit (a worker keeps serving it)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", QK)
def test_hf_generation_keeps_the_norm_hooks_at_every_step(arch):
    """Per-row tables in one left-padded batch with a KV cache equal one ablation at a time with `model.generate`."""
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    lm = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=None), device="cpu")
    prompts = random_prompts(3, lo=3, hi=8)
    ablations = [Ablation(), Ablation(heads=HEADS, eps=1e-5), Ablation(heads=HEADS, op=Op.MEAN)]
    got = HFGenerator(lm).generate(prompts, ablations, parse_decoding("greedy", max_new_tokens=8), [0] * 3)
    for p, ab, tokens in zip(prompts, ablations, got):
        ids = torch.tensor([p])
        with ablated(model, ab):
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 min_new_tokens=8, pad_token_id=0)
        assert tokens == ref[0, len(p):].tolist(), ab.label


def test_head_swap_moves_the_olmo2_norm_slices():
    target, donor = tiny_model("olmo2", seed=0), tiny_model("olmo2", seed=1)
    before, theirs = _state(target), _state(donor)
    mix(target, donor, Recipe.HEADS_FROM_BASE, [Head(1, 3)])  # query head 3 reads key group 1
    after = target.state_dict()
    d = 8
    p = "model.layers.1.self_attn."
    for name, block in (("q_norm.weight", slice(3 * d, 4 * d)), ("k_norm.weight", slice(d, 2 * d))):
        expected = before[p + name].clone()
        expected[block] = theirs[p + name][block]
        assert torch.equal(after[p + name], expected), name
    assert torch.equal(after[p + "q_proj.weight"][3 * d:], theirs[p + "q_proj.weight"][3 * d:])


@pytest.mark.parametrize("arch", PER_HEAD)
def test_head_swap_refuses_a_different_shared_norm(arch):
    target, donor = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    state = _state(target)
    with pytest.raises(UsageError, match="norm .*shared by every head.*attn-from-base"):
        mix(target, donor, Recipe.HEADS_FROM_BASE, [Head(1, 3)])
    _assert_state(target, state)
    mix(target, donor, Recipe.ATTN_FROM_BASE)  # whole attention modules move, norms included
    assert torch.equal(target.model.layers[2].self_attn.q_norm.weight, donor.model.layers[2].self_attn.q_norm.weight)
    target.load_state_dict(state)
    with torch.no_grad():  # a fine-tune that left the norms alone (e.g. merged LoRA): the swap is exact
        for layer in (0, 1, 2):
            for n in ("q_norm", "k_norm"):
                t = getattr(target.model.layers[layer].self_attn, n)
                getattr(donor.model.layers[layer].self_attn, n).weight.copy_(t.weight)
    mix(target, donor, Recipe.HEADS_FROM_BASE, [Head(1, 3)])
    d = 12
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(target.state_dict()[q][3 * d:], donor.state_dict()[q][3 * d:])
    assert not torch.equal(target.state_dict()[q][:3 * d], donor.state_dict()[q][:3 * d])
