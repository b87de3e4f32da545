"""Scores, as pure math over tensors: KL between next-token distributions (Ships), principal angles between
subspaces of final-norm hidden states (generalized Ships), and ranking.

No model code lives here: callers hand in log-probabilities and hidden-state matrices. Reductions run in
float32 or better (float64 for anything involving SVD or angles), whatever dtype the model ran in.
"""

from __future__ import annotations

import math

import torch

from study.core.errors import UsageError
from study.core.subspace import SubspaceSpec

__all__ = [
    "SubspaceSpec",
    "generalized_ships",
    "generalized_ships_batch",
    "kl_from_logits",
    "kl_from_logprobs",
    "log_softmax_fp",
    "principal_angles",
    "subspace_basis",
    "token_nll",
]


def _at_least_fp32(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs, float64 kept: reductions over a vocabulary need the mantissa."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def kl_from_logprobs(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ other) over the last dim, from log-probabilities (Ships: ref = normal, other = ablated).

    Log space is exact where the authors' `p + 1e-12` is not. Entries where `ref` is -inf contribute 0
    (0·log 0 = 0), so masked vocabularies give no NaN; mass in `ref` where `logp` is -inf gives +inf.
    Returns the input shape without the last dim, in float32 (float64 if either input is float64).
    """
    dtype = _at_least_fp32(ref_logp, logp)
    ref = ref_logp.to(dtype)  # (..., vocab)
    other = logp.to(dtype)  # (..., vocab)
    p = ref.exp()  # (..., vocab)
    diff = ref - other  # (..., vocab); NaN where both are -inf, +inf where only `other` is -inf
    term = p * diff  # (..., vocab)
    if bool(torch.isfinite(diff).all()):  # the usual case: every term is finite (0 where p underflowed)
        return term.sum(dim=-1)  # (...)
    # Where p is 0 the product may be 0·inf or 0·NaN: the term is 0, unless ref has (underflowed) mass
    # that `other` excludes, which makes the divergence infinite.
    inf_term = (ref > -math.inf) & (other == -math.inf)  # (..., vocab)
    zero_fill = torch.where(inf_term, math.inf, 0.0).to(dtype)  # (..., vocab)
    term = torch.where(p > 0, term, zero_fill)  # (..., vocab)
    return term.sum(dim=-1)  # (...)


def kl_from_logits(ref_logp: torch.Tensor, logits: torch.Tensor, which: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """KL(ref[which[i]] ‖ softmax(cap(logits[i]))) for every row i, in float64: the same value as
    `kl_from_logprobs(ref_logp[which], log_softmax_fp(logits, softcap))`, with a fraction of the passes.

    With q = softmax(z): KL(p ‖ q) = Σ p log p − Σ p z + logsumexp(z). Per row that is one logsumexp and
    one column of the (rows, refs) product z pᵀ, instead of materialising log q, ref[which] and the terms
    (rows x vocab each). All of it in float64: terms of size ~10 cancel down to KLs of 1e-6 and below,
    which float64 keeps to ~1e-14 absolute. Rows whose result is not finite (a -inf logit where some
    reference has no mass gives 0·inf) are recomputed term by term, which handles every such case.

    ref_logp (refs, vocab) log-probs; logits (rows, vocab), any float dtype; which (rows,) indices into refs.
    """
    ref = ref_logp.double()  # (refs, vocab)
    p = ref.exp()  # (refs, vocab)
    neg_entropy = torch.where(p > 0, p * ref, 0.0).sum(dim=-1)  # (refs,) Σ p log p, 0·log 0 = 0
    z = _softcap(logits.double(), softcap)  # (rows, vocab)
    which = which.to(z.device)
    lse = torch.logsumexp(z, dim=-1)  # (rows,)
    pz = (z @ p.T).gather(1, which[:, None]).squeeze(1)  # (rows,) Σ p z with each row's own reference
    out = neg_entropy[which] - pz + lse  # (rows,)
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        out[bad] = kl_from_logprobs(ref[which[bad]], torch.log_softmax(z[bad], dim=-1))
    return out


def log_softmax_fp(logits: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """log_softmax over the last dim in float32 or better, after optional final-logit softcapping.

    Gemma2 caps its final logits (`tanh(x / cap) * cap`); skipping it would score a different
    distribution from the one the model samples from.
    """
    return torch.log_softmax(_softcap(logits.to(_at_least_fp32(logits)), softcap), dim=-1)  # (..., vocab)


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma2's final-logit softcapping, `tanh(x / cap) * cap`; the logits unchanged for None."""
    if softcap is None:
        return logits
    if not softcap > 0:
        raise UsageError(f"softcap must be > 0 or None, got {softcap!r}")
    return torch.tanh(logits / softcap) * softcap  # (..., vocab)


def token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of each row and how many tokens it covers (perplexity).

    logits (batch, seq, vocab) as the model returns them; ids, mask (batch, seq), mask 1 on real tokens
    (right padding). Position t predicts token t + 1; pairs touching padding are left out.
    """
    logp = log_softmax_fp(logits[:, :-1])  # (batch, seq-1, vocab)
    target = ids[:, 1:]  # (batch, seq-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (batch, seq-1)
    keep = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)  # (batch, seq-1)
    return (nll * keep).sum(-1), keep.sum(-1).long()  # (batch,), (batch,)


def subspace_basis(M: torch.Tensor, spec: SubspaceSpec) -> torch.Tensor:
    """Orthonormal basis of the chosen top-r singular subspace of M, in float64.

    M is (n_prompts, d_model), or batched (..., n_prompts, d_model). Returns (..., n_prompts, r) for
    `left` and (..., d_model, r) for `right`. Sign and in-subspace rotation are arbitrary; principal angles
    do not depend on them.
    """
    if M.dim() < 2:
        raise UsageError(f"subspace_basis needs a (n_prompts, d_model) matrix, got shape {tuple(M.shape)}")
    n, d = M.shape[-2], M.shape[-1]
    r = spec.rank
    if r > min(n, d):
        raise UsageError(
            f"subspace rank r={r} is larger than min(n_prompts, d_model) = min({n}, {d}); "
            f"use r <= {min(n, d)} or more prompts"
        )
    X = M.to(torch.float64)  # (..., n, d)
    if spec.center:
        X = X - X.mean(dim=-2, keepdim=True)  # (..., n, d)
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)  # U (..., n, m), Vh (..., m, d), m = min(n, d)
    if spec.side == "left":
        return U[..., :, :r]  # (..., n, r)
    return Vh[..., :r, :].mT  # (..., d, r)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, float64, ascending) between span(A) and span(B).

    A (..., n, r_a) and B (..., n, r_b) have orthonormal columns; leading dims broadcast. Returns
    (..., min(r_a, r_b)). arccos of the cosines loses half the digits near 0 (cos θ ≈ 1 - θ²/2), so as in
    `scipy.linalg.subspace_angles` (Knyazev & Argentati 2002) angles whose cos² ≥ 1/2 come from the sines,
    the singular values of the part of B outside span(A).
    """
    if A.dim() < 2 or B.dim() < 2 or A.shape[-2] != B.shape[-2]:
        raise ValueError(
            f"principal_angles needs bases with the same number of rows, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    if A.shape[-1] < B.shape[-1]:
        A, B = B, A  # angles are symmetric; with r_a >= r_b the residual below has exactly r_b singular values
    C = A.mT @ B  # (..., r_a, r_b)
    cos = torch.linalg.svdvals(C)  # (..., r_b), descending = angles ascending
    R = B - A @ C  # (..., n, r_b): B's component orthogonal to span(A)
    sin = torch.linalg.svdvals(R).flip(-1)  # (..., r_b), ascending = angles ascending
    small = cos * cos >= 0.5  # (..., r_b): angle <= 45°, where arcsin is well conditioned
    theta = torch.where(
        small,
        torch.asin(sin.clamp(-1.0, 1.0)),
        torch.acos(cos.clamp(-1.0, 1.0)),
    )  # (..., r_b) radians
    return torch.rad2deg(theta)


def generalized_ships(M_normal: torch.Tensor, M_ablated: torch.Tensor, spec: SubspaceSpec) -> float:
    """Generalized Ships: sum of principal angles (degrees) between the normal and ablated subspaces.

    M_* are (n_prompts, d_model) final-norm hidden states at the last prompt token. Larger = the ablation
    moved the dataset's representation more = the head matters more.
    """
    if M_normal.shape != M_ablated.shape or M_normal.dim() != 2:
        raise ValueError(
            f"generalized_ships needs two (n_prompts, d_model) matrices of one shape, "
            f"got {tuple(M_normal.shape)} and {tuple(M_ablated.shape)}"
        )
    U0 = subspace_basis(M_normal, spec)  # (n | d, r)
    Ua = subspace_basis(M_ablated, spec)  # (n | d, r)
    return float(principal_angles(U0, Ua).sum())


def generalized_ships_batch(M_normal: torch.Tensor, M_ablated: torch.Tensor, spec: SubspaceSpec) -> torch.Tensor:
    """Generalized Ships for k candidate ablations at once (batched SVDs): float64 tensor (k,).

    M_normal is (n_prompts, d_model); M_ablated is (k, n_prompts, d_model). Equals calling
    `generalized_ships` k times, with one normal-model SVD instead of k.
    """
    if M_normal.dim() != 2 or M_ablated.dim() != 3 or M_ablated.shape[1:] != M_normal.shape:
        raise ValueError(
            f"generalized_ships_batch needs M_normal (n, d) and M_ablated (k, n, d), "
            f"got {tuple(M_normal.shape)} and {tuple(M_ablated.shape)}"
        )
    U0 = subspace_basis(M_normal, spec)  # (n | d, r)
    Ua = subspace_basis(M_ablated, spec)  # (k, n | d, r)
    return principal_angles(U0, Ua).sum(dim=-1)  # (k,)
