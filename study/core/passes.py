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
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from study.core.architectures import Arch

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
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
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
    """Run `layer`'s MLP at a few positions per row only (`positions`: (rows,) or (rows, k)); the layer's
    output is right at those positions only. For the top layer, where only the last position of each prompt is
    read, that skips the MLP everywhere else."""
    positions = positions.view(positions.shape[0], -1)  # (rows, k)
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
    width: list[int] = []

    def keep(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (rows, seq, d_model)
        width[:] = [x.shape[1]]
        return (x[rows, positions], *args[1:])  # (rows, k, d_model)

    def spread(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # one position: the layer's residual add broadcasts it over the sequence; several: put them back
        if positions.shape[1] == 1:
            return out
        full = out.new_zeros((out.shape[0], width[0], out.shape[2]))
        full[rows, positions] = out
        return full

    handles = [arch.mlp(model, layer).register_forward_pre_hook(keep),
               arch.mlp(model, layer).register_forward_hook(spread)]
    try:
        yield
    finally:
        for handle in handles:
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


def pack_rows(lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Prompts (by suffix length) packed into the fewest rows of about `cap` tokens, balanced so that the
    longest row (what every row is padded to) is short: longest prompt first, each into the emptiest row.
    Each row lists its prompts; empty rows are dropped."""
    n_rows = min(len(lengths), max(1, -(-sum(lengths) // max(cap, 1))))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = min(range(n_rows), key=load.__getitem__)
        rows[k].append(j)
        load[k] += lengths[j]
    return [r for r in rows if r]


# attention implementations whose mask transformers materializes from a mask function (so a packed row's
# prompts can be kept apart); flash attention takes only padding or position-based packing
PACKABLE_ATTENTION = ("sdpa", "eager")


def takes_packed_rows(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) in PACKABLE_ATTENTION


def _segment_mask(model: nn.Module, segments: torch.Tensor, prefix: int, cache: Cache | None,
                  positions: torch.Tensor) -> Any:
    """The 4D mask of packed rows, in the form the model's attention implementation takes (built by
    transformers' own mask code): causal, and a token sees the shared prefix and its own prompt's tokens only.

    `segments`: (rows, S) each token's prompt slot within its row (padding: a slot of its own)."""
    from transformers.masking_utils import create_causal_mask

    rows = segments.shape[0]
    seen = torch.cat([segments.new_full((rows, prefix), -1), segments], dim=1)  # (rows, prefix + S)

    def same_prompt(batch_idx, head_idx, q_idx, kv_idx):
        kv = seen[batch_idx, kv_idx]
        return (kv < 0) | (kv == seen[batch_idx, q_idx])

    dtype = next(model.parameters()).dtype
    shape_only = torch.empty((rows, segments.shape[1], 0), dtype=dtype, device=segments.device)
    return create_causal_mask(config=model.config, inputs_embeds=shape_only, attention_mask=None,
                              past_key_values=cache, position_ids=positions, and_mask_function=same_prompt,
                              allow_is_causal_skip=False)


@dataclass
class BasePass:
    """A group's base forward, layer by layer.

    prefix_len P > 0: `prefix_calls` ran the shared prefix (1 row); `calls` ran the suffixes (rows, S) right
    padded, attending to the prefix through the model's own cache. P = 0: `calls` ran the whole prompts, no cache.
    A row holds one prompt, or several packed one after another (`pack_rows`; a mask keeps each to itself and
    the prefix), which saves the padding of short prompts. Prompt j is row `row_of[j]`, its last token at
    `last[j]` there; `final_in`: (rows, S, d_model) the final norm's input.
    """

    prefix_len: int
    prefix_calls: list[LayerCall]
    calls: list[LayerCall]
    final_in: torch.Tensor
    row_of: torch.Tensor  # (prompts,) long
    last: torch.Tensor  # (prompts,) long
    row_lasts: torch.Tensor  # (rows, k) long: the last tokens of each row's prompts, repeated to the most a row has

    @property
    def width(self) -> int:
        return self.final_in.shape[1]

    @property
    def n_rows(self) -> int:
        return self.final_in.shape[0]

    @property
    def nbytes(self) -> int:
        """What the pass holds: the residual entering every layer (prefix and rows) and the final norm's input."""
        return self.final_in.nbytes + sum(c.hidden.nbytes for c in (*self.prefix_calls, *self.calls))

    def prompts_per_row(self) -> torch.Tensor:
        """(rows,) how many prompts each row holds."""
        return torch.bincount(self.row_of, minlength=self.n_rows)

    def members(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows of states that replay base rows `rows` ((R,) long): every (state row r, prompt j) pair with
        prompt j in base row rows[r], as two (pairs,) tensors, r ascending."""
        hit = self.row_of.unsqueeze(0) == rows.cpu().unsqueeze(1)  # (R, prompts)
        return torch.nonzero(hit, as_tuple=True)

    def last_states(self, states: torch.Tensor, state_rows: torch.Tensor,
                    prompts: torch.Tensor) -> torch.Tensor:
        """(R, S, d_model) -> (pairs, 1, d_model): the state at prompt prompts[i]'s last token in row state_rows[i]."""
        idx = self.last.to(states.device).index_select(0, prompts.to(states.device))
        return states[state_rows.to(states.device), idx].unsqueeze(1)

    @classmethod
    def run(cls, model: nn.Module, arch: Arch, prompts: Sequence[Sequence[int]], pad_id: int,
            device: torch.device, reuse_prefix: bool = True, pack_tokens: int = 0) -> "BasePass":
        """The base forward of `prompts` on `model` as it stands (hooks or edits of a base ablation active).
        `pack_tokens` > 0 packs prompts into rows of up to that many suffix tokens (0: a row per prompt)."""
        n = len(prompts)
        prefix = shared_prefix_len(prompts) if reuse_prefix and n > 1 else 0
        window = sliding_window(model)
        fits_window = window is None or max(len(p) for p in prompts) <= window - 1
        if prefix and not fits_window:
            prefix = 0  # a sliding-window cache keeps only part of the prefix: run whole prompts instead
        suffixes = [list(p[prefix:]) for p in prompts]
        # packed rows carry a full causal mask to every layer: only where no window cuts a prompt
        packable = pack_tokens and fits_window and takes_packed_rows(model)
        rows = pack_rows([len(s) for s in suffixes], pack_tokens) if packable else []
        if not rows or all(len(r) == 1 for r in rows):
            rows = [[j] for j in range(n)]
        packed = len(rows) < n
        width = max(sum(len(suffixes[j]) for j in r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        positions = (prefix + torch.arange(width)).repeat(len(rows), 1)
        segments = torch.full((len(rows), width), n, dtype=torch.long)  # padding: a slot of its own
        row_of = torch.empty(n, dtype=torch.long)
        last = torch.empty(n, dtype=torch.long)
        for i, members in enumerate(rows):
            at = 0
            for j in members:
                s = suffixes[j]
                ids[i, at:at + len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, prefix + at:prefix + at + len(s)] = 1
                positions[i, at:at + len(s)] = prefix + torch.arange(len(s))
                segments[i, at:at + len(s)] = j
                row_of[j], last[j] = i, at + len(s) - 1
                at += len(s)
            positions[i, at:] = prefix + torch.arange(width - at)  # padding: within every position table
        prefix_calls: list[LayerCall] = []
        cache = None
        if prefix:
            cache = DynamicCache(config=model.config)
            prefix_ids = torch.as_tensor([list(prompts[0][:prefix])], device=device)
            prefix_calls, _ = _captured_forward(
                model, arch, input_ids=prefix_ids, position_ids=torch.arange(prefix, device=device)[None],
                past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(rows))  # every row attends to the same prefix
        positions = positions.to(device)
        attention = (_segment_mask(model, segments.to(device), prefix, cache, positions) if packed
                     else mask.to(device))
        calls, final_in = _captured_forward(
            model, arch, input_ids=ids.to(device), attention_mask=attention, position_ids=positions,
            past_key_values=cache, use_cache=bool(prefix))
        k = max(len(r) for r in rows)
        row_lasts = torch.stack([last[torch.as_tensor(r * k)[:k]] for r in rows])  # (rows, k)
        return cls(prefix, prefix_calls, calls, final_in, row_of, last, row_lasts)
