"""Tiny random-config models of every covered architecture, built in-process (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Phi3Config, Qwen2Config)

VOCAB = 61

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),  # q/k/v biases
    "gemma": lambda: GemmaConfig(**_COMMON, num_key_value_heads=4, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=12, final_logit_softcapping=5.0,
                                   attn_logit_softcapping=20.0, sliding_window=4),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5),
}

MHA = ("gemma", "gpt2", "gpt_neox")  # no GQA: undiff_k is defined per head


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=dtype, attn_implementation=attn)
    model.eval().requires_grad_(False)
    # random biases too, so a missed bias in an edit cannot hide behind zeros
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point and bias.dim() == 1:
                bias.normal_(0, 0.1)
    return model


def random_prompts(n: int, lo: int = 3, hi: int = 9, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.randint(1, VOCAB, (length,), generator=g).tolist())
    return out
