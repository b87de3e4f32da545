"""The HF generation backend against `model.generate` and against weight edits (an independent path)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from study.core.ablation import Ablation, Op
from study.core.errors import UsageError
from study.core.heads import all_heads, parse_heads
from study.core.interventions import weights_edited
from study.generation.decoding import parse_decoding, sample_seed
from study.generation.hf import HFGenerator
from tests.tiny_models import random_prompts, tiny_model

PAD = 0


def generator(model, batch_rows: int = 16) -> HFGenerator:
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=None)  # no stop token: every row runs to the limit
    lm = SimpleNamespace(model=model, tokenizer=tok, device="cpu")
    model.generation_config.eos_token_id = None
    return HFGenerator(lm, batch_rows=batch_rows)


def reference(model, prompt: list[int], new: int) -> list[int]:
    """Plain transformers greedy decoding of one unpadded prompt."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_model_generate_per_row_under_mixed_ablations(arch):
    model = tiny_model(arch)
    gen = generator(model)
    prompts = random_prompts(4, lo=3, hi=9)
    ablations = [Ablation(), Ablation(heads=parse_heads("L0H1,L2H3")),
                 Ablation(heads=parse_heads("L1H0"), op=Op.SCALE_V, eps=1e-3),
                 Ablation(heads=tuple(all_heads(3, 4)), op=Op.SCALE_V, eps=1e-3)]  # no attention at all
    decoding = parse_decoding("greedy", max_new_tokens=12)
    got = gen.generate(prompts, ablations, decoding, [0] * 4)  # one left-padded batch, four ablations
    for p, ab, tokens in zip(prompts, ablations, got):
        with weights_edited(model, ab):  # the ablation written into the weights: no hooks involved
            assert tokens == reference(model, p, 12), ab.label
    if arch != "gpt2":  # the tiny random GPT-2 repeats one token whatever its attention does
        assert got[3] != reference(model, prompts[3], 12)  # the ablation reached the decoding steps


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prefix_runs_once_per_ablation_and_decodes_like_model_generate(arch):
    """Prompts that start alike (a chat template): the prefix runs once per distinct ablation of the batch and
    every row still decodes what plain transformers decodes with that ablation in its weights."""
    model = tiny_model(arch)
    gen = generator(model)
    head = random_prompts(1, lo=6, hi=6, seed=3)[0]
    tails = random_prompts(5, lo=1, hi=5, seed=4)
    assert len({t[0] for t in tails}) > 1  # the prompts part after the head
    prompts = [head + tail for tail in tails]
    ab1, ab2 = Ablation(heads=parse_heads("L0H1,L2H3")), Ablation(heads=parse_heads("L1H0"), op=Op.SCALE_V, eps=1e-3)
    ablations = [ab1, Ablation(), ab2, ab1, Ablation()]  # three distinct ablations over five rows
    shapes: list[tuple[int, ...]] = []
    embed = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        got = gen.generate(prompts, ablations, parse_decoding("greedy", max_new_tokens=8), [0] * 5)
    finally:
        embed.remove()
    assert shapes[0] == (3, 6)  # the shared prefix: one row per distinct ablation
    assert shapes[1] == (5, max(map(len, tails)))  # then each prompt's own tokens, left padded to the longest
    for p, ab, tokens in zip(prompts, ablations, got):
        with weights_edited(model, ab):
            assert tokens == reference(model, p, 8), ab.label


def test_sampling_is_seeded_per_row_not_per_batch():
    model = tiny_model("llama")
    decoding = parse_decoding("topk", max_new_tokens=10)
    prompts = random_prompts(5)
    seeds = [sample_seed(0, f"p{i}", 0) for i in range(5)]
    ab = [Ablation()] * 5
    together = generator(model, batch_rows=5).generate(prompts, ab, decoding, seeds)
    alone = generator(model, batch_rows=1).generate(prompts, ab, decoding, seeds)
    assert together == alone  # the same (prompt, seed) gives the same text whatever the batch
    other = generator(model).generate(prompts, ab, decoding, [s + 1 for s in seeds])
    assert other != together


def test_topk_never_leaves_the_top_k():
    model = tiny_model("llama")
    gen = generator(model)
    prompt = random_prompts(1)[0]
    decoding = parse_decoding("topk", max_new_tokens=1)
    logits = model(torch.tensor([prompt])).logits[0, -1]
    top5 = set(logits.topk(5).indices.tolist())
    firsts = {gen.generate([prompt], [Ablation()], decoding, [s])[0][0] for s in range(40)}
    assert firsts <= top5 and len(firsts) > 1


def test_decoding_presets_and_bad_input():
    assert parse_decoding("greedy").label == "greedy" and parse_decoding("greedy").max_new_tokens == 128
    topk = parse_decoding("topk", samples=3, seed=7)
    assert (topk.top_k, topk.temperature, topk.samples, topk.seed, topk.label) == (5, 1.0, 3, 7, "topk5-t1")
    with pytest.raises(UsageError, match="valid decodings are greedy, topk"):
        parse_decoding("beam")
    with pytest.raises(UsageError, match="samples 2"):
        parse_decoding("greedy", samples=2)
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0) != sample_seed(0, "a", 1)
