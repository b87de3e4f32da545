"""vLLM on a GPU, as the actors start it (CUDA graphs, tensor parallel over the GPUs the process sees, the KV
cache sized from the memory left): an edited and then restored engine still gives HF's greedy tokens, and an
edited one gives HF's under the same ablation by hooks. Marked `gpu`; skipped without CUDA or without a GPU build
of vLLM (the lent machines' image has none: this has not run yet)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a lent GPU machine)")]
vllm = pytest.importorskip("vllm", reason="needs a GPU build of vLLM")

from study.core.ablation import Ablation, Op  # noqa: E402
from study.core.heads import parse_heads  # noqa: E402
from study.core.interventions import ablated  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A small random Llama (head size 64, as attention kernels want) with a peaked LM head, so greedy choices are
    not near-ties that kernel rounding could flip; saved as a model folder vLLM loads without a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder, model.eval()


def _hf_greedy(model, prompts, ab: Ablation) -> list[list[int]]:
    out = []
    with torch.no_grad(), ablated(model, ab):
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
            out.append(y[0, len(ids):].tolist())
    return out


def test_an_edited_and_restored_engine_with_cuda_graphs_gives_hf_greedy_tokens(tiny_folder):
    from actors.vllm_engine import VllmGenerator, edits_for

    folder, model = tiny_folder
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 17, 33)]
    undiff = Ablation(heads=parse_heads("L0H1,L1H2"), op=Op.UNDIFF_Q, eps=1e-5)
    scale = Ablation(heads=parse_heads("L1H0,L1H3"), op=Op.SCALE_V, eps=0.0)
    with VllmGenerator(str(folder), dtype="float32", device="cuda", skip_tokenizer_init=True) as engine:
        assert engine.settings["enforce_eager"] is False  # CUDA graphs
        assert engine.settings["tensor_parallel_size"] == torch.cuda.device_count()
        assert 0 < engine.settings["gpu_memory_utilization"] <= 0.9
        first = engine.probe()

        def run(ab: Ablation) -> list[list[int]]:
            return [t[0] for t in engine.generate(prompts, edits_for(ab), max_new_tokens=NEW)]

        normal = _hf_greedy(model, prompts, Ablation())
        assert run(Ablation()) == normal
        for ab in (undiff, scale):
            want = _hf_greedy(model, prompts, ab)
            assert want != normal
            assert run(ab) == want
            assert engine.probe() == first  # restored bit for bit
            assert run(Ablation()) == normal  # and the captured graphs read the restored weights
