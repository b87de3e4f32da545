"""Log-probabilities of given responses: the quantity the family's training losses are made of."""

from __future__ import annotations

from typing import Any, Sequence


def padded_responses(rows: Sequence[tuple[list[int], list[int]]], pad: int):
    """Right-padded input ids, attention mask and labels (-100 outside the response)."""
    import torch

    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return ids, mask, labels


def response_logps(model: Any, rows: Sequence[tuple[list[int], list[int]]], pad: int):
    """Per row: (sum of the response tokens' log-probs, their count).  -> (rows,), (rows,)"""
    import torch

    ids, mask, labels = padded_responses(rows, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (rows, width-1, vocab)
    target = labels[:, 1:]  # (rows, width-1)
    keep = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]  # (rows, width-1)
    return (logp * keep).sum(-1), keep.sum(-1)
