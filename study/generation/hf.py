"""The Hugging Face generation backend: batched decoding with per-row ablations through hooks, the prompts'
shared prefix computed once per ablation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from study.core.ablation import Ablation
from study.generation.decoding import Decoding, choose_tokens

if TYPE_CHECKING:
    import torch

    from study.models.loading import LoadedModel


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


class HFGenerator:
    """Hugging Face model, own decoding loop: per-row hook tables at every step, KV cache on, left padding.

    The loop (not `model.generate`) gives each row its own ablation and its own sampling generator, and
    computes the LM head only at the last position; greedy tokens equal `model.generate`'s (tested).
    """

    def __init__(self, lm: "LoadedModel", batch_rows: int | None = None) -> None:
        from study.core.architectures import Arch

        self.lm = lm
        self.arch = Arch.of(lm.model)
        # rows per batch: a decoding step reads every weight once, so more rows amortise it (one CPU thread,
        # SmolLM2, 24 new tokens: 303 ms a row at 16 rows, 205 ms at 64)
        self.batch_rows = batch_rows or 64
        self.pad_id = lm.tokenizer.pad_token_id
        self.stop = stop_token_ids(lm.model, lm.tokenizer)

    @classmethod
    def for_worker(cls, worker: Any) -> "HFGenerator":
        return cls(worker.lm)

    def generate(self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
                 seeds: Sequence[int]) -> list[list[int]]:
        if not (len(token_ids) == len(ablations) == len(seeds)):
            raise ValueError("token_ids, ablations and seeds must have one entry per row")
        for ab in set(ablations):
            ab.check(self.arch.shape)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # similar lengths pad less
        out: list[list[int]] = [[] for _ in token_ids]
        for start in range(0, len(order), self.batch_rows):
            rows = order[start:start + self.batch_rows]
            got = self._batch([token_ids[i] for i in rows], [ablations[i] for i in rows], decoding,
                              [seeds[i] for i in rows])
            for i, tokens in zip(rows, got):
                out[i] = tokens
        return out

    def _batch(self, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
               seeds: Sequence[int]) -> list[list[int]]:
        import torch

        from study.core.interventions import HeadHooks

        model = self.lm.model
        device = model.get_input_embeddings().weight.device
        rows = len(prompts)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        with torch.no_grad(), HeadHooks(model, self.arch) as hooks:
            res, mask, pos = self._prefill(hooks, prompts, ablations)
            for _ in range(decoding.max_new_tokens):
                nxt = choose_tokens(res.logits[:, -1], decoding, generators)  # (rows,)
                for r, t in enumerate(nxt.tolist()):
                    if not done[r]:
                        out[r].append(t)
                        done[r] = t in self.stop
                if all(done):
                    break
                nxt = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, self.pad_id), nxt)
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
                pos = pos[:, -1:] + 1
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                            past_key_values=res.past_key_values, use_cache=True, logits_to_keep=1)
        return out

    def _prefill(self, hooks: Any, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation]
                 ) -> tuple[Any, "torch.Tensor", "torch.Tensor"]:
        """The prompts' forward with each row's ablation, KV cache on; returns the model output, the (rows, seq)
        attention mask and the (rows, seq') positions the decoding steps extend.

        The tokens every prompt starts with (a chat template, a system prompt) run once per distinct ablation of
        the batch, not once per row; each row's own suffix, left padded, attends to its ablation's copy of that
        prefix through the model's own cache. Causal attention makes it exact. Hooks are left set per row."""
        import torch

        from study.core.interventions import HeadTables
        from study.core.passes import shared_prefix_len, sliding_window

        model = self.lm.model
        device, dtype = model.get_input_embeddings().weight.device, next(model.parameters()).dtype
        rows = len(prompts)
        # a sliding window would keep only part of a long prefix in the cache: whole prompts there
        prefix = shared_prefix_len(prompts) if rows > 1 and sliding_window(model) is None else 0
        cache = None
        if prefix:
            kinds = list(dict.fromkeys(ablations))  # the batch's distinct ablations, in first-seen order
            # (rows,) on the CPU: a cache spread over GPUs indexes each layer's tensors with it
            kind_of = torch.tensor([kinds.index(a) for a in ablations])
            self._set_tables(hooks, HeadTables.build(kinds, self.arch), dtype)
            head = torch.tensor([list(prompts[0][:prefix])] * len(kinds), device=device)  # (kinds, prefix)
            cache = model(input_ids=head, position_ids=torch.arange(prefix, device=device).expand_as(head),
                          use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_select_indices(kind_of)  # each row attends to its own ablation's prefix
        suffixes = [list(p[prefix:]) for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for r, s in enumerate(suffixes):  # left padding: every row's last prompt token is at the end
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, prefix + width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = ((mask.cumsum(-1) - 1).clamp(min=0))[:, prefix:]  # (rows, width)
        self._set_tables(hooks, HeadTables.build(ablations, self.arch), dtype)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        return res, mask, pos

    def _set_tables(self, hooks: Any, tables: Any, dtype: Any) -> None:
        """Every layer's hooks to `tables` (one row per batch row of the next forward), on the layer's device."""
        for layer, device in enumerate(self.arch.layer_devices(self.lm.model)):
            hooks.set_layer(layer, tables, device, dtype)
