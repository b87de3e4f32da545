"""The scan engine: last-position outputs of many (ablation, prompt) rows, fast and exact.

For each ablation A and prompt p the engine returns the final-norm hidden state at the last prompt
position and, on request, KL(normal || A) of the next-token distribution. It gets there by:

1. batching many rows, each with its own ablation (per-row hook tables), right padding, explicit positions;
2. reusing layers: a base pass (the normal model, or a base ablation B such as Sahara's chosen group)
   caches the residual entering every layer; a row starts at the first layer where its ablation differs
   from B, from the cached residual, and only runs the layers after that (a growing "wavefront" batch);
3. reusing tokens: the prefix a group's prompts share (a chat template and system prompt) runs once per
   ablation, and each prompt's own suffix attends to its keys and values (`study.core.passes`);
4. packing: short prompts share a row, one after another, each masked to itself (no padding to compute);
5. computing the LM head at the last position only, log-softmax and KL in float32 or better;
6. chunking by a token budget (rows x padded length per forward), not by a fixed batch size.

`naive_scan` is the reference strategy (one full forward per ablation and prompt) the engine is tested
and benchmarked against.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from study.core.ablation import Ablation
from study.core.architectures import Arch
from study.core.interventions import HeadHooks, HeadTables, ablated, first_divergent_layer
from study.core.passes import BasePass, KVRecorder, PrefixKV, mlp_at
from study.core.scores import kl_from_logits, kl_from_logprobs, log_softmax_fp

# rows x padded length per forward. On a CPU small blocks win (activations stay in cache and under glibc's
# mmap threshold: SmolLM2 runs ~2x faster at 2048 than at 16384); accelerators want large ones.
CPU_TOKEN_BUDGET = 2048
ACCELERATOR_TOKEN_BUDGET = 16384
# bytes for what a prompt group keeps while its rows run: the residual entering every layer (the prefix
# cache) and the reference/base log-probs. On an accelerator: this share of the memory free at start.
CPU_CACHE_BYTES = 2 << 30
ACCELERATOR_CACHE_SHARE = 0.25
LOGIT_BYTES = 256 << 20  # float64 (rows, vocab) blocks held at once (rows x vocab x 8 bytes)
# suffix tokens packed into one row at most: packing saves the padding of short prompts, and costs attention
# scores between the prompts of a row that the mask then discards (rows x (prefix + row)); a few hundred keeps
# that a small share of a layer's work
PACK_TOKENS = 256


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
    token_layers: int = 0  # tokens x layers computed for those rows (shared prefix rows counted once each)


class ScanEngine:
    """Scores (ablation, prompt) rows on one loaded model. Not thread-safe; one per device."""

    def __init__(self, model: nn.Module, pad_id: int, *, token_budget: int | None = None,
                 cache_bytes: int | None = None, prefix_reuse: bool = True, top_mlp_last: bool = True,
                 pack_tokens: int = PACK_TOKENS, keep_bases: bool = False) -> None:
        """`token_budget`: rows x padded tokens per forward; `cache_bytes`: what a prompt group may keep
        (per-layer residuals, log-probs). None picks the device's default for each. `prefix_reuse`: compute
        the tokens a group's prompts share once per ablation (off: every row runs its whole prompt);
        `top_mlp_last`: run the top layer's MLP at the last position only (the only one read); `pack_tokens`:
        pack short prompts into rows of up to that many tokens (0: a row per prompt, right padded);
        `keep_bases`: keep each prompt group's base pass (within `cache_bytes`) for later scans of the same
        prompts and base, as shards of one prompt block do; only for a model whose weights stay as they are
        (hooks come and go, edits do not), since a kept pass would not see an edit. `forget()` drops them."""
        if token_budget is not None and token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        if cache_bytes is not None and cache_bytes < 1:
            raise ValueError("cache_bytes must be >= 1")
        if pack_tokens < 0:
            raise ValueError("pack_tokens must be >= 0")
        self.pack_tokens = pack_tokens
        self.keep_bases = keep_bases
        # (group prompts, base ablation) -> the group's base pass, final states, log-probs; least recent first
        self._bases: OrderedDict[tuple, _GroupBase] = OrderedDict()
        self.model = model
        self.arch = Arch.of(model)
        self.pad_id = pad_id
        self.prefix_reuse = prefix_reuse
        self.top_mlp_last = top_mlp_last
        param = next(model.parameters())
        # a model spread over GPUs: the tokens enter on the embedding's device, each layer's tables and indices
        # go to that layer's device, and the LM head's device computes the log-probs
        self.device, self.dtype = model.get_input_embeddings().weight.device, param.dtype
        self.layer_devices = self.arch.layer_devices(model)
        self.token_budget = token_budget or default_token_budget(self.device)
        self.cache_bytes = cache_bytes or default_cache_bytes(self.device)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.out_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._unembed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, d_model) final-norm states -> (rows, vocab) logits, the LM head in float32 or better."""
        if self._unembed is None:
            head = self.model.get_output_embeddings()
            bias = getattr(head, "bias", None)
            self._unembed = (head.weight.detach().to(self.out_dtype),
                             None if bias is None else bias.detach().to(self.out_dtype))
        weight, bias = self._unembed
        logits = hidden.to(device=weight.device, dtype=self.out_dtype) @ weight.T  # (rows, vocab)
        return logits if bias is None else logits + bias

    def _logit_blocks(self, n_rows: int) -> list[slice]:
        """Row blocks small enough that one float64 (rows, vocab) block stays within LOGIT_BYTES."""
        step = max(1, LOGIT_BYTES // (self.vocab * 8))
        return [slice(i, i + step) for i in range(0, max(n_rows, 1), step)]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, d_model) final-norm states -> (rows, vocab) float64 log-probs (after any softcap)."""
        # log-softmax and KL in float64: small KLs are differences of nearly equal log-probs
        softcap = self.arch.logit_softcap(self.model)
        return torch.cat([log_softmax_fp(self._logits(hidden[b]).double(), softcap)
                          for b in self._logit_blocks(hidden.shape[0])])

    def _kl(self, ref_logp: torch.Tensor, hidden: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """KL(ref_logp[which[i]] ‖ the next-token distribution of final-norm state hidden[i]), float64 (rows,)."""
        softcap = self.arch.logit_softcap(self.model)
        return torch.cat([kl_from_logits(ref_logp, self._logits(hidden[b]), which[b], softcap)
                          for b in self._logit_blocks(hidden.shape[0])])

    def _final(self, resid_last: torch.Tensor) -> torch.Tensor:
        """(rows, 1, d_model) pre-norm last-position residual -> (rows, d_model) final-norm state."""
        norm = self.arch.final_norm(self.model)
        weight = next(norm.parameters(), None)
        if weight is not None:
            resid_last = resid_last.to(weight.device)
        return norm(resid_last)[:, -1].to(self.out_dtype)

    def forget(self) -> None:
        """Drop the kept base passes (`keep_bases`): needed after the model's weights change."""
        self._bases.clear()

    def _group_base(self, prompts: Sequence[Sequence[int]], base: Ablation, kl: bool) -> "_GroupBase":
        """The base pass of a prompt group under `base`, with its final-norm states and (for `kl`) log-probs,
        kept for later scans where `keep_bases` allows."""
        key = (tuple(map(tuple, prompts)), base if base.heads else None)  # no heads: the normal model
        kept = self._bases.get(key)
        if kept is None:
            with ablated(self.model, base, self.arch) if base.heads else contextlib.nullcontext():
                bp = BasePass.run(self.model, self.arch, prompts, self.pad_id, self.device, self.prefix_reuse,
                                  self.pack_tokens)
            every = torch.arange(len(prompts))
            kept = _GroupBase(bp, self._final(bp.last_states(bp.final_in, bp.row_of, every)))  # (group, d_model)
        if kl and kept.logp is None:
            kept.logp = self._logprobs(kept.final)
        if self.keep_bases:
            self._bases[key] = kept
            self._bases.move_to_end(key)
            while len(self._bases) > 1 and sum(b.nbytes for b in self._bases.values()) > self.cache_bytes:
                self._bases.popitem(last=False)
        return kept

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
             progress: Callable[[int], None] | None = None) -> ScanResult:
        """Score every ablation on every prompt (rows = ablations x prompts).

        `base`: an ablation whose residuals are cached and shared (default: the normal model). KL is always
        against the NORMAL model. `kl`/`hidden` choose the outputs (the (ablations, prompts, d_model) hidden
        block is large: ask for it only when it is used). `progress(n)` is called with rows finished (the
        caller draws the bar: the engine knows nothing of where progress is shown).
        """
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
        rows_run = layer_rows = token_layers = 0

        with HeadHooks(self.model, self.arch) as hooks:
            for group in self._groups(prompts):
                group_prompts = [prompts[i] for i in group]
                kept = self._group_base(group_prompts, base, kl)
                bp, base_final, base_logp = kept.bp, kept.final, kept.logp
                # KL is against the normal model: the base itself, or the normal base pass of the group
                ref_logp = self._group_base(group_prompts, Ablation(), True).logp if kl and base.heads else base_logp

                # rows of this group: (ablation a, base row b: one prompt, or several packed), sorted by start
                # layer for the wavefront; the sort is stable, so each ablation's rows stay contiguous
                a_idx = torch.arange(n_abl).repeat_interleave(bp.n_rows)
                b_idx = torch.arange(bp.n_rows).repeat(n_abl)
                row_start = start[a_idx]
                order = torch.argsort(row_start, stable=True)
                a_idx, b_idx, row_start = a_idx[order], b_idx[order], row_start[order]
                g_idx = torch.as_tensor(group)

                same = row_start >= n_layers  # rows identical to the base pass
                if same.any():
                    r, j = bp.members(b_idx[same])  # (ablation, prompt) pairs of those rows
                    a_same = a_idx[same][r]
                    if hidden:
                        hidden_out[a_same, g_idx[j]] = base_final[j].cpu()
                    if kl:
                        kl_out[a_same, g_idx[j]] = kl_from_logprobs(ref_logp[j], base_logp[j]).double().cpu()
                    if progress:
                        progress(len(j))
                todo = torch.nonzero(~same).flatten()
                # a row costs its suffix; each ablation's prefix row is shared by the group's rows
                per_row = bp.width + bp.prefix_len / bp.n_rows
                chunk_rows = max(1, int(self.token_budget // per_row))
                for c0 in range(0, len(todo), chunk_rows):
                    rows = todo[c0:c0 + chunk_rows]
                    out, r, j, work, tokens = self._wavefront(hooks, bp, tables, a_idx[rows], b_idx[rows],
                                                              row_start[rows])
                    a_out, p_out = a_idx[rows][r], g_idx[j]  # out[i] is (ablation a_out[i], prompt p_out[i])
                    layer_rows += work
                    token_layers += tokens
                    rows_run += len(j)
                    if hidden:
                        hidden_out[a_out, p_out] = out.cpu()
                    if kl:
                        kl_out[a_out, p_out] = self._kl(ref_logp, out, j.to(ref_logp.device)).cpu()
                    if progress:
                        progress(len(j))
                del bp, kept
        return ScanResult(hidden_out, kl_out, rows_run, layer_rows, token_layers)

    def _wavefront(self, hooks: HeadHooks, bp: BasePass, tables: HeadTables, a_idx: torch.Tensor,
                   b_idx: torch.Tensor, row_start: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Run rows (ablation a_idx[i] on base row b_idx[i], sorted by start layer) from their start layer to
        the top. Return the final-norm states of every (row r, prompt j) pair (prompt j in row r's base row):
        states (pairs, d_model), r, j; and the layers x (ablation, prompt) rows and layers x tokens computed.

        At layer l the active rows are those with start <= l: a prefix of the sorted rows. A row joins with
        the base pass's residual entering its start layer, which equals its own residual there. With a shared
        prompt prefix, each ablation first runs the prefix as one row of its own (joining the same way) and
        its prompts' suffix rows attend to the keys and values that prefix row produced at each layer.
        """
        n_layers = self.arch.shape.n_layers
        first = int(row_start[0])
        counts = torch.bincount(row_start, minlength=n_layers + 1).cumsum(0)  # active rows per layer
        row_tables = tables.select(a_idx)
        prompts_done = bp.prompts_per_row()[b_idx].cumsum(0)  # (rows,) (ablation, prompt) rows up to each
        if bp.prefix_len:
            # one prefix row per ablation present, in row order (so also sorted by start layer)
            uniq, slot, runs = torch.unique_consecutive(a_idx, return_inverse=True, return_counts=True)
            prefix_tables = tables.select(uniq)
            prefix_start = row_start[runs.cumsum(0) - runs]  # (ablations,) each ablation's first row
            prefix_counts = torch.bincount(prefix_start, minlength=n_layers + 1).cumsum(0)
        h: torch.Tensor | None = None
        hp: torch.Tensor | None = None
        work = tokens = 0
        for layer in range(first, n_layers):
            dev = self.layer_devices[layer]
            top = self.top_mlp_last and layer == n_layers - 1
            n_active = int(counts[layer])
            n_have = 0 if h is None else h.shape[0]
            if n_active > n_have:
                entering = bp.calls[layer].hidden
                joining = entering.index_select(0, b_idx[n_have:n_active].to(entering.device))
                h = joining if h is None else torch.cat([h, joining.to(h.device)], dim=0)  # (active, S, d_model)
            h = h.to(dev)
            cache = None
            if bp.prefix_len:
                n_pre = int(prefix_counts[layer])
                n_pre_have = 0 if hp is None else hp.shape[0]
                if n_pre > n_pre_have:
                    joining = bp.prefix_calls[layer].hidden.expand(n_pre - n_pre_have, -1, -1)
                    hp = joining if hp is None else torch.cat([hp, joining.to(hp.device)], dim=0)  # (ablations, P, d)
                hp = hp.to(dev)
                hooks.clear()
                hooks.set_layer(layer, prefix_tables.select(torch.arange(n_pre)), dev, self.dtype)
                recorder = KVRecorder()
                zeros = torch.zeros(n_pre, dtype=torch.long, device=dev)
                # at the top layer only the prefix's keys and values are used: its MLP output is not
                with mlp_at(self.model, self.arch, layer, zeros) if top else contextlib.nullcontext():
                    hp = bp.prefix_calls[layer].run(hp, zeros, recorder)
                tokens += n_pre * bp.prefix_len
                rows_slot = slot[:n_active].to(recorder.keys.device)
                cache = PrefixKV(recorder.keys.index_select(0, rows_slot),
                                 recorder.values.index_select(0, rows_slot))
            hooks.clear()
            hooks.set_layer(layer, row_tables.select(torch.arange(n_active)), dev, self.dtype)
            with (mlp_at(self.model, self.arch, layer, bp.row_lasts[b_idx[:n_active]].to(dev))
                  if top else contextlib.nullcontext()):
                h = bp.calls[layer].run(h, b_idx[:n_active].to(dev), cache)
            work += int(prompts_done[n_active - 1])
            tokens += n_active * bp.width
        hooks.clear()
        r, j = bp.members(b_idx)
        return self._final(bp.last_states(h, r, j)), r, j, work, tokens


@dataclass
class _GroupBase:
    """A prompt group's base pass, its final-norm last-token states (prompts, d_model) and their log-probs."""

    bp: BasePass
    final: torch.Tensor
    logp: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.bp.nbytes + self.final.nbytes + (0 if self.logp is None else self.logp.nbytes)


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
    n_layers = arch.shape.n_layers
    return ScanResult(hidden, kl_out, len(ablations) * len(prompts), len(ablations) * len(prompts) * n_layers,
                      len(ablations) * sum(len(p) for p in prompts) * n_layers)
