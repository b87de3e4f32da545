"""Tiny random-config models of every covered architecture, built in-process (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

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

# Families with a norm on q and k after the projections (study.core.architectures.QKNorm). Kept out of CONFIGS: their
# q/k operators have no weight edit, which the tests over CONFIGS compare the hooks with (tests/unit/test_qknorm.py
# covers them). head_dim 12 differs from hidden / heads (8), as Qwen3's and Gemma3's real configs do.
QK_NORM_CONFIGS = {
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=12, attention_bias=True),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
                                            sliding_window=4, final_logit_softcapping=5.0,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "olmo2": lambda: Olmo2Config(**_COMMON, num_key_value_heads=2, eos_token_id=0),  # one q norm over all heads
}


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa", **config):
    """`config` overrides attributes of the family's tiny config (e.g. sliding_window, rms_norm_eps)."""
    torch.manual_seed(seed)
    cfg = QK_NORM_CONFIGS[arch]() if arch in QK_NORM_CONFIGS else CONFIGS[arch]()
    for key, value in config.items():
        if not hasattr(cfg, key):
            raise AttributeError(f"{type(cfg).__name__} has no setting {key!r}")
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.eval().requires_grad_(False)
    # random biases too, so a missed bias in an edit cannot hide behind zeros; random q/k norm weights, so an
    # operator acting on the wrong side of the norm cannot hide behind ones
    with torch.no_grad():
        for name, module in model.named_modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point and bias.dim() == 1:
                bias.normal_(0, 0.1)
            if name.endswith(("q_norm", "k_norm")):
                module.weight.normal_(1.0, 0.5)
    return model


def random_prompts(n: int, lo: int = 3, hi: int = 9, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.randint(1, VOCAB, (length,), generator=g).tolist())
    return out


def spread(model: torch.nn.Module, devices: list[str]) -> torch.nn.Module:
    """`model` dispatched over `devices` as `device_map` places a model bigger than one GPU: the embedding on the
    first, the layers in contiguous runs, the final norm and LM head on the last; accelerate's hooks move the
    activations between them. On the CPU (`["cpu", "cpu"]`) the same hooks run with nothing to move."""
    from accelerate import dispatch_model

    from study.core.architectures import Arch

    arch = Arch.of(model)
    decoder_path, layers_path = arch.spec.decoder, arch.spec.layers
    n = arch.shape.n_layers
    prefix = f"{decoder_path}." if decoder_path else ""
    device_map: dict[str, str] = {}
    for name, _ in arch.decoder(model).named_children():
        if name == layers_path:
            for i in range(n):
                device_map[f"{prefix}{layers_path}.{i}"] = devices[i * len(devices) // n]
        else:
            device_map[f"{prefix}{name}"] = devices[0] if "emb" in name or name == "wte" else devices[-1]
    for name, _ in model.named_children():
        if f"{name}." != prefix and name != decoder_path:
            device_map[name] = devices[-1]
    return dispatch_model(model, device_map=device_map)
