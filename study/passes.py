"""Base passes the scan engine replays: one forward of the base model over a prompt group, kept layer by layer.

A group's prompts often begin with the same tokens (a chat template and its system prompt: ~45 of SmolLM2's
~64 chat-format tokens). A `BasePass` splits the group into that shared prefix, computed once (1 row), and
each prompt's own suffix (right padded), which attends to the prefix's keys and values through the layers'
own KV-cache interface (`Cache.update`). Replaying a layer on rows that carry different ablations swaps in a
`PrefixKV` (the prefix keys/values each row's ablation produced) or a `KVRecorder` (to capture them); the
model's own mask and position code built everything else in the base pass. Causal attention makes the split
exact: prefix states never depend on what follows them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from study.architectures import Arch

log = logging.getLogger(__name__)

# Layer-call arguments that carry the prompt batch on dim 0 (indexed per row) or never do (passed through).
BATCHED_ARGS = frozenset({"attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask"})
UNBATCHED_ARGS = frozenset({"cache_position", "past_key_values", "layer_past", "use_cache",
                            "output_attentions", "encoder_hidden_states"})


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own (its last position
    is what the engine reads, and it must be computed per prompt)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def sliding_window(model: nn.Module) -> int | None:
    """The smallest attention window any layer uses (None: all layers attend to everything)."""
    window = getattr(model.config, "sliding_window", None)
    types = getattr(model.config, "layer_types", None)
    if window and types is not None and all(t == "full_attention" for t in types):
        return None
    return window or None


def _index_batched(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Select prompt rows on dim 0 of a batched layer argument (tensors, or tuples such as (cos, sin))."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_index_batched(v, rows, batch) for v in value)
    return value


class KVRecorder:
    """Stands in for a layer's KV cache: keeps the keys and values the layer computed, attends to them only."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (rows, kv_heads, seq, d_head)
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        self.keys, self.values = keys, values
        return keys, values


class PrefixKV:
    """Stands in for a layer's KV cache holding each row's prefix: the layer attends to prefix + its own tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (rows, kv_heads, prefix, d_head)

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


class LayerCall:
    """One layer's call as the model made it in the base pass, re-playable on other rows and states."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict, batch: int) -> None:
        signature = inspect.signature(layer.forward)
        bound = signature.bind(*args, **kwargs)
        named: dict[str, Any] = {}
        for key, value in bound.arguments.items():
            kind = signature.parameters[key].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                named[key] = value
        self.hidden_name = next(iter(signature.parameters))
        self.hidden = named.pop(self.hidden_name)  # (batch, seq, d_model): the residual entering the layer
        for key, value in named.items():
            if key in BATCHED_ARGS or key in UNBATCHED_ARGS:
                continue
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
                raise RuntimeError(f"layer argument {key!r} looks batched but is not in the engine's table; "
                                   f"add it to BATCHED_ARGS or UNBATCHED_ARGS")
        # the argument through which the layer reaches its KV cache (past_key_values, or GPT-NeoX's layer_past)
        self.cache_name = next((k for k, v in named.items() if isinstance(v, Cache)), None)
        self.layer = layer
        self.named = named
        self.batch = batch

    def run(self, hidden: torch.Tensor, prompt_rows: torch.Tensor,
            cache: KVRecorder | PrefixKV | None = None) -> torch.Tensor:
        """The layer on `hidden` (rows, seq, d_model), row i being prompt `prompt_rows[i]` of the base pass."""
        kwargs = {k: (_index_batched(v, prompt_rows, self.batch) if k in BATCHED_ARGS else v)
                  for k, v in self.named.items()}
        if cache is not None:
            if self.cache_name is None:
                raise RuntimeError("this layer call was captured without a KV cache")
            kwargs[self.cache_name] = cache
        out = self.layer(**{self.hidden_name: hidden}, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def mlp_at(model: nn.Module, arch: Arch, layer: int, positions: torch.Tensor) -> Iterator[None]:
    """Run `layer`'s MLP at one position per row only (`positions`: (rows,)); the layer's residual add
    broadcasts its output back over the sequence, so only those positions of the layer's output are right.
    For the top layer, where only the last position is read, that skips the MLP everywhere else."""
    def keep(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (rows, seq, d_model)
        rows = torch.arange(x.shape[0], device=x.device)
        return (x[rows, positions.to(x.device)].unsqueeze(1), *args[1:])  # (rows, 1, d_model)

    handle = arch.mlp(model, layer).register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def _captured_forward(model: nn.Module, arch: Arch, **inputs: Any) -> tuple[list[LayerCall], torch.Tensor]:
    """Run the decoder stack once; return each layer's replayable call and the final norm's input."""
    layers = arch.layers(model)
    captured: list[tuple[tuple, dict] | None] = [None] * len(layers)
    final_in: list[torch.Tensor] = []
    handles = []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            captured[i] = (args, kwargs)
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(arch.final_norm(model).register_forward_pre_hook(lambda m, a: final_in.append(a[0])))
    try:
        arch.decoder(model)(**inputs)
    finally:
        for h in handles:
            h.remove()
    batch = inputs["input_ids"].shape[0]
    return [LayerCall(layer, *captured[i], batch=batch) for i, layer in enumerate(layers)], final_in[0]


@dataclass
class BasePass:
    """A group's base forward, layer by layer.

    prefix_len P > 0: `prefix_calls` ran the shared prefix (1 row); `calls` ran the suffixes (prompts, S)
    right padded, attending to the prefix through the model's own cache. P = 0: `calls` ran the whole prompts (right padded), no cache. `last[j]`: the index of prompt j's
    last token in the suffix axis; `final_in`: (prompts, S, d_model) the final norm's input.
    """

    prefix_len: int
    prefix_calls: list[LayerCall]
    calls: list[LayerCall]
    final_in: torch.Tensor
    last: torch.Tensor  # (prompts,) long

    @property
    def width(self) -> int:
        return self.final_in.shape[1]

    def last_states(self, states: torch.Tensor, prompt_rows: torch.Tensor) -> torch.Tensor:
        """(rows, S, d_model) -> (rows, 1, d_model): each row's state at its prompt's last token."""
        idx = self.last.to(states.device).index_select(0, prompt_rows)
        return states[torch.arange(states.shape[0], device=states.device), idx].unsqueeze(1)

    @classmethod
    def run(cls, model: nn.Module, arch: Arch, prompts: Sequence[Sequence[int]], pad_id: int,
            device: torch.device, reuse_prefix: bool = True) -> "BasePass":
        """The base forward of `prompts` on `model` as it stands (hooks or edits of a base ablation active)."""
        n = len(prompts)
        prefix = shared_prefix_len(prompts) if reuse_prefix and n > 1 else 0
        window = sliding_window(model)
        if prefix and window is not None and max(len(p) for p in prompts) > window - 1:
            prefix = 0  # a sliding-window cache keeps only part of the prefix: run whole prompts instead
        suffixes = [list(p[prefix:]) for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for j, s in enumerate(suffixes):
            ids[j, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[j, prefix:prefix + len(s)] = 1
        positions = (prefix + torch.arange(width)).expand(n, width)
        last = torch.as_tensor([len(s) - 1 for s in suffixes], dtype=torch.long)
        prefix_calls: list[LayerCall] = []
        cache = None
        if prefix:
            cache = DynamicCache(config=model.config)
            prefix_ids = torch.as_tensor([list(prompts[0][:prefix])], device=device)
            prefix_calls, _ = _captured_forward(
                model, arch, input_ids=prefix_ids, position_ids=torch.arange(prefix, device=device)[None],
                past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(n)  # every suffix attends to the same prefix
        calls, final_in = _captured_forward(
            model, arch, input_ids=ids.to(device), attention_mask=mask.to(device),
            position_ids=positions.to(device), past_key_values=cache, use_cache=bool(prefix))
        return cls(prefix, prefix_calls, calls, final_in, last)
