"""Base-weight swaps in memory (study.models.mixing) against slices written out by hand, on tiny models."""

from __future__ import annotations

import pytest
import torch

from study.core.errors import UsageError
from study.core.heads import Head
from study.models.mixing import check_pair, mix
from study.models.recipes import Recipe, Swap
from tests.tiny_models import CONFIGS, tiny_model

ATTN = ("self_attn", "attn", "attention")  # the attention module's name in each covered architecture


def _layer(name: str) -> int | None:
    segs = name.split(".")
    for i, seg in enumerate(segs[:-1]):
        if seg in ("layers", "h") and segs[i + 1].isdigit():
            return int(segs[i + 1])
    return None


def _pair(arch: str):
    return tiny_model(arch, seed=0), tiny_model(arch, seed=1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("recipe,part", [(Recipe.ATTN_FROM_BASE, "attn"), (Recipe.MLP_FROM_BASE, "mlp")])
def test_module_recipes_take_exactly_that_part(arch, recipe, part):
    """The authors' rule by parameter name: names with "attn"/"attention" (or "mlp") come from the donor,
    everything else (embeddings, norms, LM head) stays the target's."""
    target, donor = _pair(arch)
    before, theirs = _state(target), _state(donor)
    mix(target, donor, recipe)
    after = target.state_dict()
    words = ATTN if part == "attn" else ("mlp",)
    moved = 0
    for name, value in after.items():
        if not value.dtype.is_floating_point:
            continue  # buffers such as masks
        if any(w in name.split(".") for w in words):
            assert torch.equal(value, theirs[name]), name
            moved += 1
        else:
            assert torch.equal(value, before[name]), name
    assert moved > 0


def test_head_recipe_moves_the_head_slices_under_gqa():
    """Llama with 4 query heads over 2 KV groups: head L1H3 reads group 1."""
    target, donor = _pair("llama")
    before, theirs = _state(target), _state(donor)
    mix(target, donor, Recipe.HEADS_FROM_BASE, [Head(1, 3)])
    after = target.state_dict()
    d = 8  # 32 / 4
    expected = dict(before)
    p = "model.layers.1.self_attn."
    for name, rows in (("q_proj.weight", slice(3 * d, 4 * d)), ("k_proj.weight", slice(1 * d, 2 * d)),
                       ("v_proj.weight", slice(1 * d, 2 * d))):
        w = before[p + name].clone()
        w[rows] = theirs[p + name][rows]
        expected[p + name] = w
    o = before[p + "o_proj.weight"].clone()
    o[:, 3 * d:4 * d] = theirs[p + "o_proj.weight"][:, 3 * d:4 * d]
    expected[p + "o_proj.weight"] = o
    for name, value in after.items():
        assert torch.equal(value, expected[name]), name
    assert not torch.equal(after[p + "q_proj.weight"], before[p + "q_proj.weight"])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_head_of_a_layer_is_the_whole_attention_but_the_output_bias(arch):
    """Moving every head of layer 1 moves its whole q/k/v/o weights (fused layouts included); the o bias is
    no head's, so it stays."""
    target, donor = _pair(arch)
    before, theirs = _state(target), _state(donor)
    n_heads = target.config.num_attention_heads
    mix(target, donor, Recipe.HEADS_FROM_BASE, [Head(1, h) for h in range(n_heads)])
    after = target.state_dict()
    for name, value in after.items():
        if not value.dtype.is_floating_point:
            continue
        segs = name.split(".")
        in_attn = _layer(name) == 1 and any(w in segs for w in ATTN)
        is_o_bias = in_attn and segs[-1] == "bias" and any(o in segs for o in ("o_proj", "c_proj", "dense"))
        if in_attn and not is_o_bias:
            assert torch.equal(value, theirs[name]), name
        else:
            assert torch.equal(value, before[name]), name


def test_heads_into_base_is_the_mirror_of_heads_from_base():
    aligned, base = _pair("qwen2")
    heads = [Head(0, 1), Head(2, 2)]
    a_from_b = tiny_model("qwen2", seed=0)
    mix(a_from_b, base, Recipe.HEADS_FROM_BASE, heads)
    b_into = tiny_model("qwen2", seed=1)
    mix(b_into, aligned, Recipe.HEADS_INTO_BASE, heads)
    # the two mixes exchange exactly the same slices: their sum equals aligned + base everywhere
    for name, value in a_from_b.state_dict().items():
        assert torch.allclose(value + b_into.state_dict()[name], aligned.state_dict()[name] + base.state_dict()[name],
                              atol=1e-12), name


def test_a_pair_of_different_shapes_is_refused():
    small = tiny_model("llama")
    other = tiny_model("qwen2")
    with pytest.raises(UsageError, match="architectures differ"):
        check_pair(small, other)
    from transformers import AutoModelForCausalLM, LlamaConfig

    wider = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=70, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=3, num_attention_heads=4,
                                                         num_key_value_heads=2), dtype=torch.float64)
    with pytest.raises(UsageError, match="vocabulary"):
        check_pair(small, wider)


def test_swap_values_name_their_recipe_and_need_heads():
    s = Swap(recipe=Recipe.HEADS_FROM_BASE, aligned="a", base="b", heads=(Head(2, 1), Head(0, 3)))
    assert s.label == "heads-from-base[L0H3,L2H1]"
    with pytest.raises(UsageError, match="needs the safety heads"):
        Swap(recipe=Recipe.HEADS_INTO_BASE, aligned="a", base="b")
    with pytest.raises(ValueError):
        Swap(recipe=Recipe.ALIGNED, aligned="a", base="b")


def test_a_swap_with_another_vocabulary_is_refused_from_the_configs(tmp_path):
    """The swap job compares the two configs (no weights): a different vocabulary is one line, before any work."""
    from transformers import LlamaConfig

    from study.core.frozen import build
    from study.experiments.swap import SwapConfig, SwapJob

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
    LlamaConfig(vocab_size=61, **common).save_pretrained(tmp_path / "aligned")
    LlamaConfig(vocab_size=70, **common).save_pretrained(tmp_path / "base")
    cfg = build(SwapConfig, dict(model=str(tmp_path / "aligned"), base=str(tmp_path / "base"), heads="L0H1"))
    with pytest.raises(UsageError, match=r"differ \(vocab_size 61 vs 70\).*vocabulary"):
        SwapJob(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- a head recipe as a scoped edit


def _params(model):
    return {n: p.data for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_scoped_head_edit_is_the_mixed_model_and_is_undone(arch):
    """`swapped` with the donor's slices gives, inside the block, the very weights `mix` writes (every
    architecture: fused, Conv1D, GQA, q/k norms), and the target's own weights back after it, bit for bit."""
    from study.models.mixing import slices_from, swapped

    heads = [Head(1, 3), Head(2, 0), Head(1, 2)]  # two heads of one layer: shared key/value groups overlap
    target, donor = _pair(arch)
    before = _state(target)
    mixed = tiny_model(arch, seed=0)
    try:
        mix(mixed, donor, Recipe.HEADS_FROM_BASE, heads)
    except UsageError as err:  # a per-head q/k norm that differs: the edit refuses it as the mix does
        assert "norm" in str(err)
        with pytest.raises(UsageError, match="norm"):
            slices_from(target, _params(donor), heads)
        return
    with swapped(target, heads, slices_from(target, _params(donor), heads)):
        inside = target.state_dict()
        for name, value in mixed.state_dict().items():
            assert torch.equal(inside[name], value), name
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_scoped_head_edit_is_undone_after_an_error():
    from study.models.mixing import slices_from, swapped

    target, donor = _pair("llama")
    before = _state(target)
    with pytest.raises(RuntimeError, match="inside"):
        with swapped(target, [Head(0, 1)], slices_from(target, _params(donor), [Head(0, 1)])):
            assert not torch.equal(target.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                                   before["model.layers.0.self_attn.q_proj.weight"])
            raise RuntimeError("inside")
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_donor_slices_read_only_the_heads_layers_from_the_folder(tmp_path, monkeypatch):
    """From a saved donor the slices come from its safetensors (the heads' layers only, no model load), equal to
    the slices of the donor loaded whole."""
    import study.models.loading as loading
    from study.models.mixing import donor_slices, read_tensors, slices_from

    target, donor = _pair("llama")
    donor.save_pretrained(tmp_path / "donor")
    heads = [Head(2, 1)]
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the donor was loaded whole"))
    got = donor_slices(target, str(tmp_path / "donor"), None, heads)
    want = slices_from(target, _params(donor), heads)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    layer2 = [n for n in _params(target) if ".layers.2.self_attn." in n]
    assert set(read_tensors(tmp_path / "donor", layer2)) == set(layer2)
    assert read_tensors(tmp_path / "donor", layer2 + ["model.layers.9.self_attn.q_proj.weight"]) is None


def test_a_donor_of_another_width_is_refused():
    from study.models.mixing import slices_from

    target = tiny_model("llama")
    wider = tiny_model("llama", hidden_size=48)
    with pytest.raises(UsageError, match="different width"):
        slices_from(target, _params(wider), [Head(0, 0)])


def test_a_head_recipe_is_hosted_by_the_model_it_writes_into():
    """heads-from-base edits the aligned model, heads-into-base the base; whole-module recipes load their own."""
    from study.runtime.shards import ModelRef

    aligned = ModelRef(name="a", revision="r1", dtype="bfloat16", fingerprint="fa")
    swap = dict(aligned="a", base="b", base_revision="r0", base_fingerprint="fb", heads=(Head(1, 2),))
    base = ModelRef(name="b", revision="r0", dtype="bfloat16", fingerprint="fb")
    from_base = aligned.model_copy(update={"swap": Swap(recipe=Recipe.HEADS_FROM_BASE, **swap)})
    into_base = aligned.model_copy(update={"swap": Swap(recipe=Recipe.HEADS_INTO_BASE, **swap)})
    attn = aligned.model_copy(update={"swap": Swap(recipe=Recipe.ATTN_FROM_BASE, aligned="a", base="b")})
    assert from_base.host == aligned and from_base.donor == ("b", "r0")
    assert into_base.host == base and into_base.donor == ("a", "r1")
    assert attn.host == attn and attn.donor is None and aligned.host == aligned
    assert len({from_base.key["swap"]["recipe"], into_base.key["swap"]["recipe"]}) == 2  # still their own shard ids
