"""The scan engine on CUDA: the same exactness as on the CPU, and the accelerator's defaults. Marked `gpu`, skipped
without CUDA; run on a lent GPU machine by bench/gpu_check.sh (with the GPU benchmark)."""

import pytest
import torch

from study.core.ablation import Ablation, Op
from study.core.engine import ACCELERATOR_CACHE_SHARE, ACCELERATOR_TOKEN_BUDGET, ScanEngine, naive_scan
from study.core.heads import Head, all_heads
from tests.spread_checks import prompts as engine_prompts
from tests.tiny_models import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a lent GPU machine)")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "qwen3"])
@pytest.mark.parametrize("prefixed", [False, True], ids=["packed", "prefix+packed"])
def test_engine_equals_naive_on_cuda_float64(arch, prefixed):
    model = tiny_model(arch, **({"sliding_window": 64} if arch == "gemma2" else {})).cuda()
    shape = ScanEngine(model, 0).arch.shape
    ablations = [Ablation(heads=(h,), op=op, eps=eps) for op, eps in ((Op.UNDIFF_Q, 1e-5), (Op.SCALE_V, 0.3))
                 for h in all_heads(shape.n_layers, shape.n_heads)]
    prompts = engine_prompts(prefixed)
    fast = ScanEngine(model, 0, pack_tokens=20).scan(prompts, ablations)
    ref = naive_scan(model, prompts, ablations)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast.hidden, ref.hidden, atol=1e-9, rtol=0)
    assert ref.kl.max() > 1e-6


def test_sahara_base_on_cuda_equals_naive():
    model = tiny_model("llama").cuda()
    base = Ablation(heads=(Head(1, 2),))
    cands = [base.with_head(h) for h in all_heads(3, 4) if h not in base.heads]
    prompts = engine_prompts(True)
    fast = ScanEngine(model, 0, keep_bases=True).scan(prompts, cands, base=base)
    torch.testing.assert_close(fast.kl, naive_scan(model, prompts, cands).kl, atol=1e-9, rtol=0)


def test_float32_on_cuda_is_within_float32_noise_of_float64():
    model = tiny_model("llama")
    prompts = engine_prompts(True)
    ablations = [Ablation(heads=(h,)) for h in all_heads(3, 4)]
    exact = naive_scan(model, prompts, ablations).kl  # float64 on the CPU
    fast = ScanEngine(model.float().cuda(), 0).scan(prompts, ablations).kl
    big = exact > 1e-3 * exact.max()
    assert float(((fast - exact).abs()[big] / exact[big]).max()) < 1e-3


def test_accelerator_defaults():
    model = tiny_model("llama").cuda()
    engine = ScanEngine(model, 0)
    assert engine.token_budget == ACCELERATOR_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info()
    assert 0 < engine.cache_bytes <= free * ACCELERATOR_CACHE_SHARE * 1.01
