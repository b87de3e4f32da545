"""Checks of a model spread over devices (`tests.tiny_models.spread`) against the same model on one device, shared
by the CPU test (accelerate's hooks with nothing to move) and the CUDA tests (layers on two devices)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from study.core.ablation import Ablation, Op
from study.core.engine import ScanEngine, naive_scan
from study.core.heads import all_heads, parse_heads
from study.generation.decoding import parse_decoding
from study.generation.hf import HFGenerator
from tests.tiny_models import random_prompts, spread, tiny_model


def prompts(prefixed: bool) -> list[list[int]]:
    if not prefixed:
        return random_prompts(7, lo=2, hi=12, seed=11)
    system = random_prompts(1, lo=9, hi=9, seed=12)[0]
    return [system + s for s in random_prompts(6, lo=1, hi=8, seed=13)]


def check_engine(arch: str, devices: list[str], prefixed: bool) -> None:
    """Every single-head ablation (both operators) scored on the spread model equals the naive scan of the
    one-device model, in float64, to rounding."""
    model = tiny_model(arch)
    ref_model = copy.deepcopy(model)
    shape = ScanEngine(model, 0).arch.shape
    ablations = [Ablation(heads=(h,), op=op, eps=eps) for op, eps in ((Op.UNDIFF_Q, 1e-5), (Op.SCALE_V, 0.3))
                 for h in all_heads(shape.n_layers, shape.n_heads)]
    ps = prompts(prefixed)
    engine = ScanEngine(spread(model, devices), 0, pack_tokens=20)
    assert [str(d) for d in engine.layer_devices] == [devices[i * len(devices) // shape.n_layers]
                                                      for i in range(shape.n_layers)]
    fast = engine.scan(ps, ablations)
    ref = naive_scan(ref_model, ps, ablations)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    assert ref.kl.max() > 1e-6


def check_generation(arch: str, devices: list[str]) -> None:
    """Greedy tokens of the spread model under mixed per-row ablations (shared prefix included) equal the
    one-device model's."""
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None  # every row runs to the limit
    ref_model = copy.deepcopy(model)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    head = random_prompts(1, lo=6, hi=6, seed=3)[0]
    ps = [head + t for t in random_prompts(5, lo=1, hi=5, seed=4)]
    ab = Ablation(heads=parse_heads("L0H1,L2H3"))
    ablations = [ab, Ablation(), Ablation(heads=parse_heads("L1H0"), op=Op.SCALE_V, eps=1e-3), ab, Ablation()]
    decoding = parse_decoding("greedy", max_new_tokens=8)
    got = HFGenerator(SimpleNamespace(model=spread(model, devices), tokenizer=tok, device=devices[0])).generate(
        ps, ablations, decoding, [0] * 5)
    ref = HFGenerator(SimpleNamespace(model=ref_model, tokenizer=tok, device="cpu"))
    assert got == ref.generate(ps, ablations, decoding, [0] * 5)
    if arch != "gpt2":  # the tiny random GPT-2 repeats one token whatever its attention does
        assert got != ref.generate(ps, [Ablation()] * 5, decoding, [0] * 5)  # the ablations reached the decoding
