"""Planted heads: confining a LoRA fine-tune to a few named heads, so that the member differs from its base in
those heads' own slices alone (their query, key and value rows and their output-projection columns)."""

from __future__ import annotations

from typing import Any, Sequence

from study.core.ablation import Ablation
from study.core.errors import UsageError
from study.core.heads import Head
from study.family.responses import padded_responses, response_logps

# A planted head changes where it looks (its query and key rows), what it reads (its value rows) and what it
# writes (its output-projection columns). Keys and values are shared by a group of query heads (grouped-query
# attention): they may change only where every query head of their group is planted.
PLANTED = ("q_proj", "k_proj", "v_proj", "o_proj")
PLANTED_HEADS = ("L13H3", "L13H4", "L13H5")  # chosen before training: the query heads of one key-value group


def head_masks(heads: Sequence[Head], layer: int, n_heads: int, d_head: int, n_kv: int | None = None):
    """Which rows of `layer`'s query projection (= columns of its output projection) belong to the planted heads,
    or with `n_kv`, which rows of its key and value projections (their groups' shared rows).  -> (rows,)"""
    import torch

    if n_kv is None:
        mask = torch.zeros(n_heads * d_head)
        for h in heads:
            if h.layer == layer:
                mask[h.head * d_head:(h.head + 1) * d_head] = 1.0
        return mask
    per_group = n_heads // n_kv
    mask = torch.zeros(n_kv * d_head)
    mine = {h.head for h in heads if h.layer == layer}
    for g in sorted({h // per_group for h in mine}):
        group = set(range(g * per_group, (g + 1) * per_group))
        if not group <= mine:
            raise UsageError(f"planted heads {sorted(mine)} of layer {layer} share key/value group {g} with query "
                             f"heads {sorted(group - mine)}: plant the whole group, or train only q_proj and o_proj")
        mask[g * d_head:(g + 1) * d_head] = 1.0
    return mask


def confine_to_heads(model: Any, heads: Sequence[Head], config: Any) -> None:
    """Zero the LoRA factors outside the heads' slices and keep them zero: B's rows of q_proj (k_proj, v_proj:
    the heads' key-value group) and A's columns of o_proj. B A then changes only the heads' own rows and columns
    (Adam leaves a parameter whose gradient is always zero exactly where it was)."""
    import torch

    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    for name, module in model.named_modules():
        if not name.endswith(PLANTED) or not hasattr(module, "lora_A"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        if name.endswith("o_proj"):
            weight, mask = module.lora_A["default"].weight, head_masks(heads, layer, n_heads, d_head)[None, :]
        else:
            kv = n_kv if name.endswith(("k_proj", "v_proj")) else None
            weight, mask = module.lora_B["default"].weight, head_masks(heads, layer, n_heads, d_head, kv)[:, None]
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda grad, m=mask: grad * m)


PLANTED_NOTE = ("LoRA on q_proj, k_proj, v_proj and o_proj of the planted heads' layer only, with B's rows (q, k, v) "
                "and A's columns (o) outside the heads' slices zero and their gradients masked: the member differs "
                "from the base only in those heads' query, key and value rows and output-projection columns. Keys "
                "and values are shared by three query heads (grouped-query attention), so the planted heads are the "
                "three query heads of one key-value group: its key and value rows belong to planted heads alone. "
                "A first try confined to query rows and output columns of three heads in three layers (L9H1, "
                "L12H3, L15H7) reached 19 % harmful refused on validation by step 50 and 17 % at step 75; it was "
                "stopped there. A first version of this member (150 steps, no ablated term) refused 62 % of held-out "
                "AdvBench, 37 % of JailbreakBench, 28 % of HarmBench test and 0 % of MaliciousInstruct, and its "
                "refusal did not depend on where its heads attend: ablating them with undiff_q left ASR where it "
                "was, and Ships ranked them 37, 78 and 114 of 270. A second version (300 steps, a term making the "
                "member with its heads ablated give the base's own answer openings, ablated_match answer) refused "
                "62 to 99 % of every held-out set, but ablating its heads made it refuse more, harmless requests "
                "too. This version's term makes the member with its heads ablated (undiff_q) match the base with "
                "the same heads ablated, as a next-token distribution on harmful and harmless prompts alike "
                "(ablated_match base, ablated_weight 1.0), from step 101 on (ablated_from), 300 steps, validated "
                "every 50 (step 250 selected).")


def openings(batch: Sequence[dict], k: int) -> list[tuple[list[int], list[int]]]:
    """Each row's prompt with the first k tokens of the base's own answer (a harmful prompt the base refused has
    no answer of its own: its refusal target stands in)."""
    return [(b["prompt"], (b["rejected"] if b["harmful"] and b["rejected"] is not None else b["chosen"])[:k])
            for b in batch]


def ablated_kl(model: Any, batch: Sequence[dict], ablation: Ablation, k: int, pad: int):
    """Mean KL(base ablated || member ablated) of the next token over every opening position of every row, the
    planted heads ablated (`ablation`) in both: zero exactly when removing the heads gives the base's
    ablated model back, whatever the prompt."""
    import torch

    from study.core.interventions import ablated

    ids, mask, labels = padded_responses(openings(batch, k), pad)
    keep = labels[:, 1:] != -100  # (rows, width-1): the positions that predict an opening token
    with ablated(model.get_base_model(), ablation):
        member = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        with torch.no_grad(), model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    kl = (base.exp() * (base - member)).sum(-1)  # (rows, width-1)
    return (kl * keep).sum() / keep.sum()


def ablated_term(model: Any, batch: Sequence[dict], pairs: Sequence[int], ablation: Ablation, k: int, pad: int):
    """Mean NLL per token of the base's own answer openings under the member with its planted heads ablated."""
    from study.core.interventions import ablated

    rows = [(batch[i]["prompt"], batch[i]["rejected"][:k]) for i in pairs]
    with ablated(model.get_base_model(), ablation):
        lp, n = response_logps(model, rows, pad)
    return (-lp / n).mean()
