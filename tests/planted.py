"""A small Llama whose refusal signal runs through known heads, built weight by weight in the test suite.

Vocabulary: 1 BOS, 2-9 neutral words, 10-13 harmful triggers, 14 the answer marker, 20 REFUSE.
The planted head L1H2 sits at the answer marker and attends to trigger tokens (to BOS when there is none);
its value/output path writes the REFUSE direction into the residual stream, which the LM head reads.
Every other head is small and random. Undifferentiated attention on L1H2 spreads its attention evenly,
dilutes the REFUSE signal and changes the next-token distribution far more than any other head.
RoPE uses a huge base so the planted query/key dimensions (not the first rotary pair) barely rotate.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from study.core.heads import Head

BOS, MARKER, REFUSE = 1, 14, 20
NEUTRAL = list(range(2, 10))
TRIGGERS = [10, 11, 12, 13]
PLANTED = Head(1, 2)
D_HEAD = 8


def _config(initializer_range: float) -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=D_HEAD, rope_theta=1e12,
                       tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=BOS, pad_token_id=0,
                       eos_token_id=2, initializer_range=initializer_range)


def _identity_model(initializer_range: float, seed: int, dtype: torch.dtype):
    """Random layers between a one-hot embedding (token t -> e_t) and an identity LM head."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(initializer_range), dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(32, dtype=dtype))
        model.lm_head.weight.copy_(torch.eye(32, dtype=dtype))
    return model


def _plant_trigger_head(model, head: Head, write: float, cancel_on_marker: bool) -> None:
    """Make `head` attend from MARKER to a trigger (else BOS) and write `write` x REFUSE from a trigger.

    With `cancel_on_marker` the MARKER's value is the opposite of a trigger's, so undifferentiated attention
    over one trigger and one marker cancels to zero and ablation removes the head's signal entirely.
    """
    attn = model.model.layers[head.layer].self_attn
    rows = slice(head.head * D_HEAD, (head.head + 1) * D_HEAD)
    with torch.no_grad():
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            w[rows] = 0.0
        attn.o_proj.weight[:, rows] = 0.0
        qk_dim = head.head * D_HEAD + 3  # a low-frequency rotary dimension
        attn.q_proj.weight[qk_dim, MARKER] = 3.0
        for t in TRIGGERS:
            attn.k_proj.weight[qk_dim, t] = 3.0
        attn.k_proj.weight[qk_dim, BOS] = 1.5
        v_dim = head.head * D_HEAD + 1
        for t in TRIGGERS:
            attn.v_proj.weight[v_dim, t] = 1.0
        if cancel_on_marker:
            attn.v_proj.weight[v_dim, MARKER] = -1.0
        attn.o_proj.weight[REFUSE, v_dim] = write


def planted_model(seed: int = 0, dtype: torch.dtype = torch.float64):
    """One refusal head (PLANTED) among noisy random heads (init 0.15)."""
    model = _identity_model(0.15, seed, dtype)
    with torch.no_grad():
        for layer in model.model.layers:  # keep the MLPs quiet
            layer.mlp.down_proj.weight.mul_(0.1)
    _plant_trigger_head(model, PLANTED, 12.0, cancel_on_marker=False)
    return model


def harmful_prompts(n: int = 6, seed: int = 3) -> list[list[int]]:
    """[BOS, words..., a trigger, words..., MARKER] with varied lengths and trigger positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        before = torch.randint(0, len(NEUTRAL), (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        after = torch.randint(0, len(NEUTRAL), (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
        trigger = TRIGGERS[int(torch.randint(0, len(TRIGGERS), (1,), generator=g))]
        out.append([BOS, *[NEUTRAL[i] for i in before], trigger, *[NEUTRAL[i] for i in after], MARKER])
    return out


# ---------------------------------------------------------------------------------- a group that matters together
GROUP = (Head(1, 1), Head(1, 2))  # both write REFUSE; either one alone saturates the final norm


def planted_group_model(seed: int = 0, dtype: torch.dtype = torch.float64):
    """Two redundant refusal heads in layer 1 (GROUP) over quiet random heads (init 0.02)."""
    model = _identity_model(0.02, seed, dtype)
    # the normed one-hot input is sqrt(32) = 5.657: each head alone writes about 12 or 10 x REFUSE
    _plant_trigger_head(model, GROUP[0], 12.0 / 5.657, cancel_on_marker=True)
    _plant_trigger_head(model, GROUP[1], 10.0 / 5.657, cancel_on_marker=True)
    return model


def benign_prompts(n: int = 4, seed: int = 5) -> list[list[int]]:
    """[BOS, words..., MARKER] without a trigger."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = torch.randint(0, len(NEUTRAL), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        out.append([BOS, *[NEUTRAL[i] for i in words], MARKER])
    return out
