"""Scores against closed forms, naive formulas and scipy: KL, principal angles, subspaces, generalized Ships."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from pydantic import ValidationError

from study.core.errors import UsageError
from study.core.scores import (
    SubspaceSpec,
    generalized_ships,
    generalized_ships_batch,
    kl_from_logits,
    kl_from_logprobs,
    log_softmax_fp,
    principal_angles,
    subspace_basis,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=_gen(seed)))
    return Q  # (n, r)


# ---------------------------------------------------------------- KL


def _naive_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        out[idx] = sum(pi * math.log(pi / qi) for pi, qi in zip(p[idx], q[idx]) if pi > 0)
    return out


def test_kl_matches_naive_formula_on_probabilities() -> None:
    logits_a = torch.randn(3, 4, 11, dtype=torch.float64, generator=_gen(1))
    logits_b = torch.randn(3, 4, 11, dtype=torch.float64, generator=_gen(2))
    ref, other = torch.log_softmax(logits_a, -1), torch.log_softmax(logits_b, -1)
    got = kl_from_logprobs(ref, other)
    assert got.shape == (3, 4)
    assert got.dtype == torch.float64
    want = _naive_kl(ref.exp().numpy(), other.exp().numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


def test_kl_closed_forms() -> None:
    logp = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64, generator=_gen(3)), -1)
    assert torch.all(kl_from_logprobs(logp, logp).abs() < 1e-15)
    # two-point distributions: KL(Bern(a) || Bern(b))
    a, b = 0.3, 0.8
    ref = torch.tensor([a, 1 - a], dtype=torch.float64).log()
    other = torch.tensor([b, 1 - b], dtype=torch.float64).log()
    want = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    assert kl_from_logprobs(ref, other).item() == pytest.approx(want, rel=1e-14)
    # point mass against uniform over n: log n
    n = 6
    ref = torch.full((n,), -math.inf, dtype=torch.float64)
    ref[2] = 0.0
    other = torch.full((n,), -math.log(n), dtype=torch.float64)
    assert kl_from_logprobs(ref, other).item() == pytest.approx(math.log(n), rel=1e-14)


def test_kl_handles_minus_inf_without_nan() -> None:
    ref = torch.tensor([[0.0, -math.inf, -math.inf], [math.log(0.5), math.log(0.5), -math.inf]])
    other = torch.tensor([[math.log(0.5), -math.inf, math.log(0.5)], [math.log(0.5), math.log(0.5), -math.inf]])
    got = kl_from_logprobs(ref, other)
    assert not torch.isnan(got).any()
    assert got[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert got[1].item() == 0.0
    # mass in ref where other is -inf: infinite divergence, not NaN
    inf = kl_from_logprobs(torch.tensor([math.log(0.5), math.log(0.5)]), torch.tensor([0.0, -math.inf]))
    assert inf.item() == math.inf


def test_kl_upcasts_half_precision_and_keeps_batch_shape() -> None:
    logits = torch.randn(2, 3, 5, 50, generator=_gen(4))
    ref = torch.log_softmax(logits, -1).to(torch.bfloat16)
    other = torch.log_softmax(logits.flip(-1), -1).to(torch.bfloat16)
    got = kl_from_logprobs(ref, other)
    assert got.shape == (2, 3, 5)
    assert got.dtype == torch.float32
    assert (got >= -1e-6).all()


def test_log_softmax_fp_softcap_and_dtype() -> None:
    logits = (torch.randn(4, 9, generator=_gen(5)) * 40).to(torch.bfloat16)
    out = log_softmax_fp(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
    cap = 30.0
    capped = log_softmax_fp(logits, softcap=cap)
    want = torch.log_softmax(torch.tanh(logits.float() / cap) * cap, -1)
    torch.testing.assert_close(capped, want)
    assert log_softmax_fp(logits.double()).dtype == torch.float64
    with pytest.raises(UsageError):
        log_softmax_fp(logits, softcap=0.0)


def _kl_elementwise(ref_logp: torch.Tensor, logits: torch.Tensor, which: torch.Tensor,
                    softcap: float | None = None) -> torch.Tensor:
    return kl_from_logprobs(ref_logp.double()[which], log_softmax_fp(logits.double(), softcap))


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_kl_from_logits_equals_elementwise_kl(softcap: float | None) -> None:
    """The fast form (Σ p log p − Σ p z + logsumexp z) against the term-by-term KL, float32 logits of a real
    vocabulary's size, rows near their reference (KL ~1e-6) and far from it."""
    vocab = 5000
    base = torch.randn(3, vocab, generator=_gen(6)) * 4  # (refs, vocab)
    ref = log_softmax_fp(base.double(), softcap)  # (refs, vocab)
    which = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    scale = torch.tensor([1e-4, 1e-3, 1e-2, 0.3, 1.0, 3.0, 0.0])[:, None]
    logits = base[which] + scale * torch.randn(len(which), vocab, generator=_gen(7))  # (rows, vocab) float32
    got = kl_from_logits(ref, logits, which, softcap)
    want = _kl_elementwise(ref, logits, which, softcap)
    assert got.dtype == torch.float64 and got.shape == (len(which),)
    assert want.min() < 1e-7 and want.max() > 0.1  # the cases span tiny and large divergences
    # float64 rounding of terms of size ~10: ~1e-14 absolute, far below float32 models' own noise
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)
    assert abs(float(got[-1])) < 1e-13  # the reference itself


def test_kl_from_logits_where_logits_are_minus_inf() -> None:
    """A -inf logit: 0 where no reference mass sits there, +inf where some does (0·inf in the product)."""
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64))
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, -math.inf], [1.0, 2.0, 3.0]])
    which = torch.tensor([0, 1, 0])
    got = kl_from_logits(ref, logits, which)
    assert abs(float(got[0])) < 1e-15
    assert got[1] == math.inf
    torch.testing.assert_close(got, _kl_elementwise(ref, logits, which), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- principal angles


def test_principal_angles_identical_and_orthogonal() -> None:
    A = _orthonormal(10, 3, 6)
    assert torch.all(principal_angles(A, A).abs() < 1e-12)
    eye = torch.eye(6, dtype=torch.float64)
    got = principal_angles(eye[:, :2], eye[:, 2:4])
    torch.testing.assert_close(got, torch.full((2,), 90.0, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("theta", [1e-7, 1e-4, 0.3, 0.7853981, 1.2, math.pi / 2 - 1e-7])
def test_principal_angles_plane_rotation(theta: float) -> None:
    n = 5
    e = torch.eye(n, dtype=torch.float64)
    A = e[:, [0, 2]]  # span(e0, e2)
    b0 = math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 1]  # e0 rotated towards e1 by theta
    B = torch.stack([b0, e[:, 2]], dim=1)
    got = principal_angles(A, B)
    want_deg = math.degrees(theta)
    assert got[0].item() == pytest.approx(0.0, abs=1e-12)
    assert got[1].item() == pytest.approx(want_deg, rel=1e-9)


def test_principal_angles_tiny_angle_where_arccos_fails() -> None:
    theta = 1e-7
    A = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    B = torch.tensor([[math.cos(theta)], [math.sin(theta)]], dtype=torch.float64)
    got = principal_angles(A, B).item()
    naive = math.degrees(math.acos(min(1.0, (A.T @ B).item())))
    assert got == pytest.approx(math.degrees(theta), rel=1e-12)
    assert abs(naive - math.degrees(theta)) > 1e-5 * math.degrees(theta)  # arccos loses ~half the digits here


@pytest.mark.parametrize(
    ("n", "ra", "rb"), [(5, 1, 1), (8, 3, 3), (20, 5, 2), (20, 2, 5), (64, 10, 10), (7, 7, 7)]
)
def test_principal_angles_match_scipy(n: int, ra: int, rb: int) -> None:
    A, B = _orthonormal(n, ra, 10 + n), _orthonormal(n, rb, 20 + n + rb)
    got = principal_angles(A, B).numpy()
    want = np.sort(np.degrees(scipy.linalg.subspace_angles(A.numpy(), B.numpy())))
    assert got.shape == (min(ra, rb),)
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_principal_angles_invariant_to_basis_choice() -> None:
    A, B = _orthonormal(12, 3, 30), _orthonormal(12, 3, 31)
    base = principal_angles(A, B)
    R = _orthonormal(3, 3, 32)  # a rotation/reflection within the subspace
    signs = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(principal_angles(A @ R, B * signs), base, rtol=0, atol=1e-10)
    torch.testing.assert_close(principal_angles(B, A), base, rtol=0, atol=1e-10)


def test_principal_angles_rejects_row_mismatch() -> None:
    with pytest.raises(ValueError):
        principal_angles(torch.eye(3)[:, :1], torch.eye(4)[:, :1])


# ---------------------------------------------------------------- subspaces and generalized Ships


def _M(n: int = 9, d: int = 6, seed: int = 40) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=_gen(seed)) + 0.5


def _same_span(X: np.ndarray, Y: np.ndarray) -> None:
    np.testing.assert_allclose(np.degrees(scipy.linalg.subspace_angles(X, Y)), 0.0, atol=1e-9)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("rank", [1, 3])
def test_subspace_basis_against_numpy_svd(side: str, center: bool, rank: int) -> None:
    M = _M()
    spec = SubspaceSpec(rank=rank, side=side, center=center)
    M32 = M.float()  # float32 input: computed in float64 all the same
    got = subspace_basis(M32, spec)
    assert got.dtype == torch.float64
    X = M32.double().numpy()
    if center:
        X = X - X.mean(axis=0, keepdims=True)
    U, _, Vt = np.linalg.svd(X, full_matrices=False)
    want = U[:, :rank] if side == "left" else Vt[:rank].T
    assert got.shape == want.shape
    np.testing.assert_allclose(got.T @ got, np.eye(rank), atol=1e-12)
    _same_span(got.numpy(), want)


def test_subspace_spec_paper_and_validation() -> None:
    assert SubspaceSpec.paper() == SubspaceSpec(rank=1, side="left", center=False)
    with pytest.raises(ValidationError):
        SubspaceSpec(rank=0)
    with pytest.raises(ValidationError):
        SubspaceSpec(side="up")
    with pytest.raises(ValidationError):
        SubspaceSpec(ranks=2)
    spec = SubspaceSpec()
    with pytest.raises(ValidationError):
        spec.rank = 2  # frozen


def test_subspace_basis_rank_too_large() -> None:
    with pytest.raises(UsageError, match="r=7"):
        subspace_basis(_M(9, 6), SubspaceSpec(rank=7))


@pytest.mark.parametrize("spec", [SubspaceSpec.paper(), SubspaceSpec(rank=2, side="right", center=True)])
def test_generalized_ships_self_and_scaled(spec: SubspaceSpec) -> None:
    M = _M()
    assert generalized_ships(M, M, spec) == pytest.approx(0.0, abs=1e-10)
    assert generalized_ships(M, M * 3, spec) == pytest.approx(0.0, abs=1e-10)
    assert generalized_ships(M, _M(seed=41), spec) > 1.0


@pytest.mark.parametrize(
    "spec",
    [SubspaceSpec.paper(), SubspaceSpec(rank=3, side="left", center=True), SubspaceSpec(rank=2, side="right")],
)
def test_generalized_ships_batch_equals_loop(spec: SubspaceSpec) -> None:
    M = _M(12, 8)
    noise = torch.randn(5, 12, 8, dtype=torch.float64, generator=_gen(50))
    scales = torch.tensor([0.0, 1e-6, 0.01, 0.3, 2.0], dtype=torch.float64)[:, None, None]
    Mab = M + scales * noise  # (5, 12, 8)
    got = generalized_ships_batch(M, Mab, spec)
    want = torch.tensor([generalized_ships(M, Mab[i], spec) for i in range(5)], dtype=torch.float64)
    assert got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert got[0].item() == pytest.approx(0.0, abs=1e-10)
    assert torch.all(torch.diff(got[1:]) > 0)  # more perturbation, larger angle


def test_generalized_ships_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        generalized_ships(_M(9, 6), _M(8, 6), SubspaceSpec())
    with pytest.raises(ValueError):
        generalized_ships_batch(_M(9, 6), _M(8, 6)[None], SubspaceSpec())


# ---------------------------------------------------------------- ranking


def test_rank_desc() -> None:
    import numpy as np

    from study.core.ranking import rank_desc

    v = np.array([0.1, 3.0, 2.0, 3.0, -1.0])
    assert rank_desc(v).tolist() == [4, 1, 3, 2, 5]
    assert rank_desc(v).dtype == np.int64
    batch = np.array([[1.0, 2.0, 2.0], [5.0, float("nan"), 4.0]])
    assert rank_desc(batch).tolist() == [[3, 1, 2], [1, 3, 2]]
    assert rank_desc(np.array([2, 7, 7])).tolist() == [3, 1, 2]
    assert rank_desc(np.array([-0.0, 1e-300, -np.inf])).tolist() == [2, 1, 3]
