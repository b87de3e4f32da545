"""The scan engine against the naive strategy (one full forward per ablation and prompt), float64."""

import pytest
import torch

from study.core.ablation import Ablation, Op
from study.core.engine import ScanEngine, naive_scan
from study.core.heads import Head, all_heads
from tests.planted import PLANTED, harmful_prompts, planted_model
from tests.spread_checks import check_engine, check_generation
from tests.tiny_models import CONFIGS, MHA, QK_NORM_CONFIGS, random_prompts, tiny_model


def _all_single(arch_name, shape, op, eps):
    return [Ablation(heads=(h,), op=op, eps=eps) for h in all_heads(shape.n_layers, shape.n_heads)]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_engine_equals_naive(arch):
    model = tiny_model(arch)
    engine = ScanEngine(model, pad_id=0, token_budget=40)  # small budget: several groups and chunks
    shape = engine.arch.shape
    prompts = random_prompts(5, lo=3, hi=10)
    ops = [(Op.UNDIFF_Q, 1e-5), (Op.SCALE_V, 0.3), (Op.MEAN, 1e-5)] + ([(Op.UNDIFF_K, 1e-5)] if arch in MHA else [])
    ablations = [a for op, eps in ops for a in _all_single(arch, shape, op, eps)]
    ablations += [Ablation(heads=(Head(0, 1), Head(2, 0)), op=Op.UNDIFF_Q, eps=1e-4), Ablation()]
    fast = engine.scan(prompts, ablations)
    ref = naive_scan(model, prompts, ablations)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    assert ref.kl.max() > 1e-6  # the ablations do something
    assert fast.kl[-1].abs().max() < 1e-12  # the empty ablation is the normal model
    # prefix reuse: a head at layer l only runs layers l..L-1
    assert fast.layer_rows < ref.layer_rows


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_engine_with_base_ablation_equals_naive(arch):
    model = tiny_model(arch)
    engine = ScanEngine(model, pad_id=0, token_budget=64)
    shape = engine.arch.shape
    base = Ablation(heads=(Head(1, 2),), eps=1e-5)
    cands = [base.with_head(h) for h in all_heads(shape.n_layers, shape.n_heads) if h not in base.heads]
    prompts = random_prompts(4)
    fast = engine.scan(prompts, [*cands, base], base=base)
    ref = naive_scan(model, prompts, [*cands, base])
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)  # KL is against the NORMAL model
    assert fast.kl[-1].min() > 0


def test_left_padding_does_not_change_results():
    model = tiny_model("llama")
    short, long = [5, 9, 11], random_prompts(1, lo=12, hi=12)[0]
    ablations = _all_single("llama", ScanEngine(model, 0).arch.shape, Op.UNDIFF_Q, 1e-5)
    alone = ScanEngine(model, 0, token_budget=10_000).scan([short], ablations)
    padded = ScanEngine(model, 0, token_budget=10_000).scan([long, short], ablations)
    torch.testing.assert_close(padded.hidden[:, 1], alone.hidden[:, 0], atol=1e-9, rtol=0)
    torch.testing.assert_close(padded.kl[:, 1], alone.kl[:, 0], atol=1e-9, rtol=0)


def test_budget_does_not_change_results():
    model = tiny_model("qwen2")
    prompts = random_prompts(6)
    ablations = _all_single("qwen2", ScanEngine(model, 0).arch.shape, Op.UNDIFF_Q, 1e-5)
    a = ScanEngine(model, 0, token_budget=9).scan(prompts, ablations)
    b = ScanEngine(model, 0, token_budget=100_000).scan(prompts, ablations)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-9, rtol=0)


def _prefixed_prompts(prefix_len: int = 7) -> list[list[int]]:
    """A shared prefix (a 'system block') and suffixes of 1 to 6 tokens: one prompt is prefix + one token."""
    prefix = random_prompts(1, lo=prefix_len, hi=prefix_len, seed=5)[0]
    return [prefix + s for s in ([11], *random_prompts(4, lo=2, hi=6, seed=6))]


def _every_op(arch, shape):
    ops = [(Op.UNDIFF_Q, 1e-5), (Op.SCALE_V, 0.3), (Op.MEAN, 1e-5)] + ([(Op.UNDIFF_K, 1e-5)] if arch in MHA else [])
    return [a for op, eps in ops for a in _all_single(arch, shape, op, eps)]


# gemma2's tiny config slides a 4-token window: the prompts above are longer, so give it a wide one here
# (the narrow one is the fallback test below)
_WIDE = {"gemma2": {"sliding_window": 64}, "gemma3_text": {"sliding_window": 64}}


@pytest.mark.parametrize("arch", sorted(CONFIGS) + sorted(QK_NORM_CONFIGS))
def test_shared_prefix_reuse_equals_naive(arch):
    """Prompts sharing a prefix: the prefix runs once per ablation (prefix rows), the suffixes attend to its
    keys and values, and every score equals one full forward per (ablation, prompt)."""
    model = tiny_model(arch, **_WIDE.get(arch, {}))
    prompts = _prefixed_prompts()
    engine = ScanEngine(model, pad_id=0, token_budget=40)  # several chunks: an ablation may straddle two
    ablations = _every_op(arch, engine.arch.shape) + [Ablation(heads=(Head(0, 1), Head(2, 0)), eps=1e-4)]
    fast = engine.scan(prompts, ablations)
    ref = naive_scan(model, prompts, ablations)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    assert ref.kl.max() > 1e-6
    whole = ScanEngine(model, pad_id=0, token_budget=40, prefix_reuse=False).scan(prompts, ablations)
    torch.testing.assert_close(fast.kl, whole.kl, atol=1e-9, rtol=0)
    assert fast.token_layers < 0.8 * whole.token_layers  # the prefix really was computed once per ablation


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_shared_prefix_with_base_ablation_equals_naive(arch):
    """Sahara's step: every row carries the chosen group G, which is also the cached base."""
    model = tiny_model(arch, **_WIDE.get(arch, {}))
    engine = ScanEngine(model, pad_id=0, token_budget=64)
    shape = engine.arch.shape
    base = Ablation(heads=(Head(0, 2), Head(1, 1)), eps=1e-5)
    cands = [base.with_head(h) for h in all_heads(shape.n_layers, shape.n_heads) if h not in base.heads]
    prompts = _prefixed_prompts()
    fast = engine.scan(prompts, [*cands, base], base=base)
    ref = naive_scan(model, prompts, [*cands, base])
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)


def test_sliding_window_shorter_than_the_prompts_runs_whole_prompts():
    """A sliding-window cache keeps only part of a long prefix: the engine then runs whole prompts (exact)."""
    model = tiny_model("gemma2")  # window 4
    prompts = _prefixed_prompts()
    ablations = _all_single("gemma2", ScanEngine(model, 0).arch.shape, Op.UNDIFF_Q, 1e-5)
    fast = ScanEngine(model, 0, token_budget=64).scan(prompts, ablations)
    whole = ScanEngine(model, 0, token_budget=64, prefix_reuse=False).scan(prompts, ablations)
    ref = naive_scan(model, prompts, ablations)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    assert fast.token_layers == whole.token_layers


@pytest.mark.parametrize("arch", sorted(CONFIGS) + sorted(QK_NORM_CONFIGS))
@pytest.mark.parametrize("shared", [False, True], ids=["no-prefix", "prefix"])
def test_packed_rows_equal_naive(arch, shared):
    """Short prompts packed into shared rows (each masked to itself and the shared prefix): the same scores as
    one full forward per (ablation, prompt) and as a row per prompt, with less work; small packs force several
    rows of several prompts each (the top layer then reads several last positions per row)."""
    model = tiny_model(arch, **_WIDE.get(arch, {}))
    prompts = _prefixed_prompts() if shared else random_prompts(7, lo=2, hi=9, seed=3)
    shape = ScanEngine(model, 0).arch.shape
    ablations = _every_op(arch, shape) + [Ablation(heads=(Head(0, 1), Head(2, 0)), eps=1e-4), Ablation()]
    ref = naive_scan(model, prompts, ablations)
    padded = ScanEngine(model, 0, token_budget=64, pack_tokens=0).scan(prompts, ablations)
    for pack in (12, 256):
        packed = ScanEngine(model, 0, token_budget=64, pack_tokens=pack).scan(prompts, ablations)
        torch.testing.assert_close(packed.hidden, ref.hidden, atol=1e-9, rtol=0)
        torch.testing.assert_close(packed.kl, ref.kl, atol=1e-9, rtol=0)
        assert packed.token_layers < padded.token_layers  # the padding was not computed
        assert packed.rows_run == padded.rows_run == ref.rows_run - len(prompts)  # the empty ablation: base
    torch.testing.assert_close(padded.kl, ref.kl, atol=1e-9, rtol=0)
    assert ref.kl.max() > 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_packed_rows_with_base_ablation_equal_naive(arch):
    model = tiny_model(arch)
    shape = ScanEngine(model, 0).arch.shape
    base = Ablation(heads=(Head(1, 2),), eps=1e-5)
    cands = [base.with_head(h) for h in all_heads(shape.n_layers, shape.n_heads) if h not in base.heads]
    prompts = random_prompts(6, lo=2, hi=9, seed=4)
    fast = ScanEngine(model, 0, token_budget=64, pack_tokens=10).scan(prompts, [*cands, base], base=base)
    ref = naive_scan(model, prompts, [*cands, base])
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)


def test_pack_rows_balances_rows_and_places_every_prompt_once():
    from study.core.passes import pack_rows

    lengths = [25, 20, 19, 19, 19, 19, 15, 14]  # SmolLM2's chat suffixes of 8 AdvBench prompts
    assert pack_rows(lengths, 256) == [[0, 1, 2, 3, 4, 5, 6, 7]]
    rows = pack_rows(lengths, 64)
    assert sorted(j for r in rows for j in r) == list(range(8)) and len(rows) == 3
    loads = [sum(lengths[j] for j in r) for r in rows]
    assert max(loads) - min(loads) <= max(lengths)  # balanced: the longest row is what every row is padded to
    assert pack_rows([300, 5], 64) == [[0], [1]]  # a prompt longer than a row gets one of its own


def test_shared_prefix_len():
    from study.core.passes import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every prompt keeps a token of its own
    assert shared_prefix_len([[1, 2], [3, 2]]) == 0
    assert shared_prefix_len([[4, 4, 4]]) == 2


def test_planted_head_has_the_largest_kl():
    model = planted_model()
    prompts = harmful_prompts(8)
    heads = all_heads(2, 4)
    result = ScanEngine(model, 0).scan(prompts, [Ablation(heads=(h,)) for h in heads])
    top = result.kl.argmax(dim=0)  # (prompts,)
    assert [heads[i] for i in top] == [PLANTED] * len(prompts)


def test_token_budget_defaults_by_device() -> None:
    from study.core.engine import CPU_TOKEN_BUDGET, default_token_budget

    model = tiny_model("llama")
    assert ScanEngine(model, 0).token_budget == CPU_TOKEN_BUDGET == default_token_budget("cpu")
    assert default_token_budget("cuda:0") > CPU_TOKEN_BUDGET
    assert ScanEngine(model, 0, token_budget=77).token_budget == 77


def test_cache_budget_bounds_prompt_groups_and_outputs_on_request():
    """The per-layer residual cache counts against `cache_bytes`: a budget for one prompt gives groups of one
    (same values); only the requested outputs are allocated."""
    model = tiny_model("llama")
    prompts = random_prompts(4, lo=6, hi=6)
    ablations = [Ablation(heads=(h,)) for h in all_heads(3, 4)]
    wide = ScanEngine(model, pad_id=0, token_budget=10_000)
    one = ScanEngine(model, pad_id=0, token_budget=10_000, cache_bytes=wide.group_bytes(1, 6))
    assert len(wide._groups(prompts)) == 1 and len(one._groups(prompts)) == 4
    assert wide.group_bytes(2, 6) == 2 * wide.group_bytes(1, 6) > 4 * 6 * 32 * 8  # (layers + 1) x width x d
    done: list[int] = []
    a = wide.scan(prompts, ablations, hidden=False, progress=done.append)  # rows reported, same values
    b = one.scan(prompts, ablations, hidden=False)
    assert sum(done) == len(ablations) * len(prompts)
    assert a.hidden is None and b.hidden is None
    torch.testing.assert_close(a.kl, b.kl, atol=1e-12, rtol=0)
    h = one.scan(prompts, ablations, kl=False)
    assert h.kl is None and h.hidden.shape == (12, 4, 32)
    with pytest.raises(ValueError):
        one.scan(prompts, ablations, kl=False, hidden=False)


def test_kept_base_passes_serve_later_scans_and_stay_within_the_cache(monkeypatch):
    """`keep_bases`: shards of one prompt block (and Sahara's candidate blocks over one group) reuse the group's
    base pass and the normal reference instead of running them again; the values are those of a fresh engine."""
    from study.core import passes

    model = tiny_model("llama")
    prompts = random_prompts(5, lo=3, hi=9, seed=7)
    heads = all_heads(3, 4)
    base = Ablation(heads=(Head(0, 1),))
    blocks = [[Ablation(heads=(h,)) for h in heads[:6]], [Ablation(heads=(h,)) for h in heads[6:]]]
    sahara = [base.with_head(h) for h in heads if h not in base.heads]
    runs = []
    monkeypatch.setattr(passes.BasePass, "run", classmethod(
        lambda cls, *a, _run=passes.BasePass.run.__func__, **k: runs.append(1) or _run(cls, *a, **k)))

    kept = ScanEngine(model, 0, token_budget=10_000, keep_bases=True)
    got = [kept.scan(prompts, b) for b in blocks] + [kept.scan(prompts, sahara[:5], base=base),
                                                     kept.scan(prompts, sahara[5:], base=base)]
    assert len(runs) == 2  # the normal pass once, the base ablation's once
    fresh = ScanEngine(model, 0, token_budget=10_000)
    want = [fresh.scan(prompts, b) for b in blocks] + [fresh.scan(prompts, sahara[:5], base=base),
                                                       fresh.scan(prompts, sahara[5:], base=base)]
    assert len(runs) == 2 + 6  # a fresh engine runs them for every call (with a base: the normal one too)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.kl, b.kl, atol=0, rtol=0)
        torch.testing.assert_close(a.hidden, b.hidden, atol=0, rtol=0)
    torch.testing.assert_close(got[2].kl, naive_scan(model, prompts, sahara[:5]).kl, atol=1e-9, rtol=0)

    kept.forget()
    kept.scan(prompts, blocks[0])
    assert len(runs) == 9
    tight = ScanEngine(model, 0, token_budget=10_000, keep_bases=True, cache_bytes=1)  # room for one pass only
    tight.scan(prompts, blocks[0])
    tight.scan(prompts[:3], blocks[0])
    assert len(tight._bases) == 1


def test_packing_with_eager_attention_and_only_where_the_mask_can_say_it():
    """Eager attention takes the packed mask as an additive float mask: still equal to naive. An attention
    implementation whose mask transformers does not build from a mask function (flash) gets a row per prompt."""
    from study.core.passes import BasePass, takes_packed_rows

    model = tiny_model("llama", attn="eager")
    prompts = random_prompts(6, lo=2, hi=9, seed=8)
    ablations = _all_single("llama", ScanEngine(model, 0).arch.shape, Op.UNDIFF_Q, 1e-5)
    packed = ScanEngine(model, 0, pack_tokens=16).scan(prompts, ablations)
    torch.testing.assert_close(packed.kl, naive_scan(model, prompts, ablations).kl, atol=1e-9, rtol=0)
    assert takes_packed_rows(model)
    arch = ScanEngine(model, 0).arch
    assert BasePass.run(model, arch, prompts, 0, torch.device("cpu"), pack_tokens=256).n_rows == 1
    model.config._attn_implementation = "flash_attention_2"  # only read by the decision (no forward runs)
    try:
        assert not takes_packed_rows(model)
    finally:
        model.config._attn_implementation = "eager"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_dispatched_by_device_map_scores_and_generates_like_the_plain_model(arch):
    """accelerate's device hooks (what a model spread over GPUs runs with) leave the engine and the HF generator
    exact: the base pass captures layer calls before the hooks move their inputs. Over two real devices:
    tests/gpu/test_spread.py."""
    check_engine(arch, ["cpu", "cpu"], prefixed=True)
    check_generation(arch, ["cpu", "cpu"])
