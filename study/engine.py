"""The scan engine: last-position outputs of many (ablation, prompt) rows, fast and exact.

For each ablation A and prompt p the engine returns the final-norm hidden state at the last prompt
position and, on request, KL(normal || A) of the next-token distribution. It gets there by:

1. batching many rows, each with its own ablation (per-row hook tables), left padding, explicit position ids;
2. reusing prefixes: a base pass (the normal model, or a base ablation B such as Sahara's chosen group)
   caches the residual entering every layer; a row starts at the first layer where its ablation differs
   from B, from the cached residual, and only runs the layers after that (a growing "wavefront" batch);
3. computing the LM head at the last position only, log-softmax and KL in float32 or better;
4. chunking by a token budget (rows x padded length per forward), not by a fixed batch size.

`naive_scan` is the reference strategy (one full forward per ablation and prompt) the engine is tested
and benchmarked against.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from study.ablation import Ablation
from study.interventions import HeadHooks, HeadTables, ablated, first_divergent_layer
from study.architectures import Arch
from study.scores import kl_from_logprobs, log_softmax_fp

log = logging.getLogger(__name__)

# Layer-call arguments that carry the prompt batch on dim 0 (indexed per row) or never do (passed through).
BATCHED_ARGS = frozenset({"attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask"})
UNBATCHED_ARGS = frozenset({"cache_position", "past_key_values", "layer_past", "use_cache",
                            "output_attentions", "encoder_hidden_states"})

# rows x padded length per forward. On a CPU small blocks win (activations stay in cache and under glibc's
# mmap threshold: SmolLM2 runs ~2x faster at 2048 than at 16384); accelerators want large ones.
CPU_TOKEN_BUDGET = 2048
ACCELERATOR_TOKEN_BUDGET = 16384
# bytes for what a prompt group keeps while its rows run: the residual entering every layer (the prefix
# cache) and the reference/base log-probs. On an accelerator: this share of the memory free at start.
CPU_CACHE_BYTES = 2 << 30
ACCELERATOR_CACHE_SHARE = 0.25
LOGIT_BYTES = 256 << 20  # float64 log-probs computed at once (rows x vocab x 8 bytes)


def default_token_budget(device: torch.device | str) -> int:
    return CPU_TOKEN_BUDGET if torch.device(device).type == "cpu" else ACCELERATOR_TOKEN_BUDGET


def default_cache_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * ACCELERATOR_CACHE_SHARE)
    return CPU_CACHE_BYTES


@dataclass
class ScanResult:
    """hidden: (ablations, prompts, d_model) final-norm last-position states (float32, or float64 for
    float64 models); kl: (ablations, prompts) float64 KL(normal || ablated). Each is None if not requested."""

    hidden: torch.Tensor | None
    kl: torch.Tensor | None
    rows_run: int  # rows that needed compute (the others equal the base pass)
    layer_rows: int  # sum over computed rows of the layers they ran (the work actually done)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids, each (batch, seq), left padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _index_batched(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Select prompt rows on dim 0 of a batched layer argument (tensors, or tuples such as (cos, sin))."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_index_batched(v, rows, batch) for v in value)
    return value


class _LayerCall:
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
        self.hidden = named.pop(self.hidden_name)
        for key, value in named.items():
            if key in BATCHED_ARGS or key in UNBATCHED_ARGS:
                continue
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
                raise RuntimeError(f"layer argument {key!r} looks batched but is not in the engine's table; "
                                   f"add it to BATCHED_ARGS or UNBATCHED_ARGS")
        self.layer = layer
        self.named = named
        self.batch = batch

    def run(self, hidden: torch.Tensor, prompt_rows: torch.Tensor) -> torch.Tensor:
        kwargs = {k: (_index_batched(v, prompt_rows, self.batch) if k in BATCHED_ARGS else v)
                  for k, v in self.named.items()}
        out = self.layer(**{self.hidden_name: hidden}, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _BasePass:
    """A forward of the base model over a prompt group, keeping each layer's call and input residual."""

    def __init__(self, model: nn.Module, arch: Arch, ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> None:
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
            arch.decoder(model)(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        batch = ids.shape[0]
        self.calls = [_LayerCall(layer, *captured[i], batch=batch) for i, layer in enumerate(layers)]
        self.final_in = final_in[0]  # (batch, seq, d_model), before the final norm


class ScanEngine:
    """Scores (ablation, prompt) rows on one loaded model. Not thread-safe; one per device."""

    def __init__(self, model: nn.Module, pad_id: int, *, token_budget: int | None = None,
                 cache_bytes: int | None = None) -> None:
        """`token_budget`: rows x padded tokens per forward; `cache_bytes`: what a prompt group may keep
        (per-layer residuals, log-probs). None picks the device's default for each."""
        if token_budget is not None and token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        if cache_bytes is not None and cache_bytes < 1:
            raise ValueError("cache_bytes must be >= 1")
        self.model = model
        self.arch = Arch.of(model)
        self.pad_id = pad_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.token_budget = token_budget or default_token_budget(self.device)
        self.cache_bytes = cache_bytes or default_cache_bytes(self.device)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.out_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._unembed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, d_model) final-norm states -> (rows, vocab) log-probs, LM head in float32 or better."""
        step = max(1, LOGIT_BYTES // (self.vocab * 8))
        if hidden.shape[0] > step:  # bound the float64 (rows, vocab) blocks held at once
            return torch.cat([self._logprobs(hidden[i:i + step]) for i in range(0, hidden.shape[0], step)])
        if self._unembed is None:
            head = self.model.get_output_embeddings()
            bias = getattr(head, "bias", None)
            self._unembed = (head.weight.detach().to(self.out_dtype),
                             None if bias is None else bias.detach().to(self.out_dtype))
        weight, bias = self._unembed
        logits = hidden.to(self.out_dtype) @ weight.T  # (rows, vocab)
        if bias is not None:
            logits = logits + bias
        # log-softmax and KL in float64: small KLs are differences of nearly equal log-probs
        return log_softmax_fp(logits.double(), self.arch.logit_softcap(self.model))

    def _final(self, resid_last: torch.Tensor) -> torch.Tensor:
        """(rows, 1, d_model) pre-norm last-position residual -> (rows, d_model) final-norm state."""
        return self.arch.final_norm(self.model)(resid_last)[:, -1].to(self.out_dtype)

    def group_bytes(self, n_prompts: int, width: int) -> int:
        """What a prompt group keeps while its rows run: the residual entering every layer and the final
        norm's input, (layers + 1) x prompts x width x d_model, plus two float64 (prompts, vocab) log-probs."""
        s = self.arch.shape
        elem = torch.finfo(self.dtype).bits // 8
        return n_prompts * (width * (s.n_layers + 1) * s.d_model * elem + 2 * self.vocab * 8)

    def _groups(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Prompt groups sorted by length, each within the token budget (one base forward) and the cache."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        groups: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = len(prompts[i])  # sorted ascending: the newest prompt is the widest
            n = len(current) + 1
            if current and (n * width > self.token_budget or self.group_bytes(n, width) > self.cache_bytes):
                groups.append(current)
                current = []
            current.append(i)
        if current:
            groups.append(current)
        return groups

    # --------------------------------------------------------------------------------------------- scan
    @torch.no_grad()
    def scan(self, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation], *,
             base: Ablation | None = None, kl: bool = True, hidden: bool = True,
             progress: Callable[[int], None] | bool | None = None) -> ScanResult:
        """Score every ablation on every prompt (rows = ablations x prompts).

        `base`: an ablation whose residuals are cached and shared (default: the normal model). KL is always
        against the NORMAL model. `kl`/`hidden` choose the outputs (the (ablations, prompts, d_model) hidden
        block is large: ask for it only when it is used). `progress(n)` is called with rows finished;
        `progress=True` shows a bar on stderr.
        """
        if progress is True:
            from study.executor import progress_bar

            with progress_bar(len(ablations) * len(prompts), "scan") as bar:
                return self.scan(prompts, ablations, base=base, kl=kl, hidden=hidden, progress=bar.update)
        if not (kl or hidden):
            raise ValueError("scan needs kl=True or hidden=True")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("scan needs at least one prompt and no empty prompt")
        base = base or Ablation()
        for ab in (base, *ablations):
            ab.check(self.arch.shape)
        n_layers = self.arch.shape.n_layers
        n_abl, n_prompts = len(ablations), len(prompts)
        start = first_divergent_layer(ablations, base, self.arch)  # (ablations,)
        tables = HeadTables.build(list(ablations), self.arch)
        hidden_out = (torch.empty(n_abl, n_prompts, self.arch.shape.d_model, dtype=self.out_dtype)
                      if hidden else None)
        kl_out = torch.empty(n_abl, n_prompts, dtype=torch.float64) if kl else None
        rows_run = layer_rows = 0

        with HeadHooks(self.model, self.arch) as hooks:
            for group in self._groups(prompts):
                ids, mask, positions = (t.to(self.device) for t in pad_left([prompts[i] for i in group],
                                                                                self.pad_id))
                width = ids.shape[1]
                ref_logp = None
                if kl:
                    if base.heads:
                        normal = _BasePass(self.model, self.arch, ids, mask, positions)
                        ref_logp = self._logprobs(self._final(normal.final_in[:, -1:]))
                        del normal
                with ablated(self.model, base, self.arch) if base.heads else contextlib.nullcontext():
                    bp = _BasePass(self.model, self.arch, ids, mask, positions)
                base_final = self._final(bp.final_in[:, -1:])  # (group, d_model)
                base_logp = self._logprobs(base_final) if kl else None
                if ref_logp is None:  # the base is the normal model: its distribution is the reference
                    ref_logp = base_logp

                # rows of this group: (ablation a, prompt slot j), sorted by start layer for the wavefront
                a_idx = torch.arange(n_abl).repeat_interleave(len(group))
                j_idx = torch.arange(len(group)).repeat(n_abl)
                row_start = start[a_idx]
                order = torch.argsort(row_start, stable=True)
                a_idx, j_idx, row_start = a_idx[order], j_idx[order], row_start[order]
                g_idx = torch.as_tensor(group)

                same = row_start >= n_layers  # rows identical to the base pass
                if same.any():
                    if hidden:
                        hidden_out[a_idx[same], g_idx[j_idx[same]]] = base_final[j_idx[same]].cpu()
                    if kl:
                        kl_out[a_idx[same], g_idx[j_idx[same]]] = kl_from_logprobs(
                            ref_logp[j_idx[same]], base_logp[j_idx[same]]).double().cpu()
                todo = torch.nonzero(~same).flatten()
                chunk_rows = max(1, self.token_budget // width)
                for c0 in range(0, len(todo), chunk_rows):
                    rows = todo[c0:c0 + chunk_rows]
                    out, work = self._wavefront(hooks, bp, tables, a_idx[rows], j_idx[rows], row_start[rows])
                    layer_rows += work
                    rows_run += len(rows)
                    if hidden:
                        hidden_out[a_idx[rows], g_idx[j_idx[rows]]] = out.cpu()
                    if kl:
                        logp = self._logprobs(out)
                        kl_out[a_idx[rows], g_idx[j_idx[rows]]] = kl_from_logprobs(
                            ref_logp[j_idx[rows].to(self.device)], logp).double().cpu()
                    if progress:
                        progress(len(rows))
                if progress and same.any():
                    progress(int(same.sum()))
                del bp
        return ScanResult(hidden_out, kl_out, rows_run, layer_rows)

    def _wavefront(self, hooks: HeadHooks, bp: _BasePass, tables: HeadTables, a_idx: torch.Tensor,
                   j_idx: torch.Tensor, row_start: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run rows (sorted by start layer) from their start layer to the top; return final-norm states.

        At layer l the active rows are those with start <= l: a prefix of the sorted rows. A row joins with
        the base pass's residual entering its start layer, which equals its own residual there.
        """
        n_layers = self.arch.shape.n_layers
        first = int(row_start[0])
        counts = torch.bincount(row_start, minlength=n_layers + 1).cumsum(0)  # active rows per layer
        row_tables = tables.select(a_idx)
        j_dev = j_idx.to(self.device)
        h: torch.Tensor | None = None
        work = 0
        for layer in range(first, n_layers):
            n_active = int(counts[layer])
            n_have = 0 if h is None else h.shape[0]
            if n_active > n_have:
                joining = bp.calls[layer].hidden.index_select(0, j_dev[n_have:n_active])
                h = joining if h is None else torch.cat([h, joining], dim=0)  # (active, seq, d_model)
            hooks.clear()
            hooks.set_layer(layer, row_tables.select(torch.arange(n_active)), self.device, self.dtype)
            h = bp.calls[layer].run(h, j_dev[:n_active])
            work += n_active
        hooks.clear()
        return self._final(h[:, -1:]), work


@torch.no_grad()
def naive_scan(model: nn.Module, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation], *,
               kl: bool = True) -> ScanResult:
    """The reference strategy: one full model forward per (ablation, prompt), batch 1, LM head everywhere."""
    arch = Arch.of(model)
    param = next(model.parameters())
    out_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    final: list[torch.Tensor] = []
    handle = arch.final_norm(model).register_forward_hook(lambda m, a, o: final.append(o))

    def run(p: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        final.clear()
        logits = model(input_ids=torch.as_tensor([list(p)], device=param.device), use_cache=False).logits
        return final[-1][0, -1].to(out_dtype), log_softmax_fp(logits[0, -1].double())  # the model applied any softcap

    try:
        normal = [run(p)[1] for p in prompts] if kl else []
        hidden = torch.empty(len(ablations), len(prompts), arch.shape.d_model, dtype=out_dtype)
        kl_out = torch.empty(len(ablations), len(prompts), dtype=torch.float64) if kl else None
        for a, ab in enumerate(ablations):
            with ablated(model, ab, arch):
                for j, p in enumerate(prompts):
                    h, logp = run(p)
                    hidden[a, j] = h.cpu()
                    if kl:
                        kl_out[a, j] = kl_from_logprobs(normal[j], logp).double().cpu()
    finally:
        handle.remove()
    return ScanResult(hidden, kl_out, len(ablations) * len(prompts), len(ablations) * len(prompts) * arch.shape.n_layers)
