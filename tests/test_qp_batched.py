"""Tests of the batched dual solver (latentguard.latent.batched) and the pairwise driver that uses it."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

import latentguard.latent.qp as qp
from latentguard.errors import SolverError
from latentguard.latent.batched import batched_cholesky_solve, batched_dual

PROPS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def unit_row_grams(rng, stacks: int, m: int, d: int) -> np.ndarray:
    """Gram matrices of ``m`` random unit rows in ``d`` dimensions (positive definite when ``m ≤ d``)."""
    A = rng.standard_normal((stacks, m, d))
    A /= np.linalg.norm(A, axis=2, keepdims=True)
    return A @ A.transpose(0, 2, 1)


def reference_dual(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``argmin_{λ ≥ 0} ½λᵀHλ − gᵀλ`` by scipy's NNLS on the Cholesky factor (H positive definite)."""
    L = np.linalg.cholesky(H)
    return nnls(L.T, np.linalg.solve(L, g))[0]


@PROPS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12), extra=st.integers(0, 6), stacks=st.integers(1, 4))
def test_batched_dual_matches_scipy_nnls_and_meets_kkt(seed, m, extra, stacks):
    rng = np.random.default_rng(seed)
    grams = unit_row_grams(rng, stacks, m, m + extra + 1)
    B = 3 * stacks
    which = rng.integers(0, stacks, B)
    g = rng.standard_normal((B, m))
    lam, ok = batched_dual(grams, which, g)
    assert lam.shape == (B, m) and ok.shape == (B,)
    for row in np.flatnonzero(ok):
        H = grams[which[row]]
        gradient = g[row] - H @ lam[row]
        assert np.all(lam[row] >= 0)
        assert np.all(gradient <= 1e-8 * (1 + np.abs(g[row]).max()))  # no improving direction left
        np.testing.assert_allclose(lam[row] * gradient, 0.0, atol=1e-8)  # complementary slackness
        np.testing.assert_allclose(lam[row], reference_dual(H, g[row]), rtol=1e-6, atol=1e-8)
    assert ok.mean() >= 0.9  # handing rows back is for degenerate problems, not the common case


def test_batched_dual_hands_back_singular_and_unfinished_rows():
    # s_x ≥ 1 and −s_x ≥ 1 cannot both hold: the dual is unbounded and its 2×2 passive block singular
    rows = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    grams = (rows @ rows.T)[None]
    g = np.array([[1.0, 1.0, 0.0], [0.3, -1.0, -1.0]])
    lam, ok = batched_dual(grams, np.zeros(2, dtype=int), g)
    assert not ok[0]  # handed back: the caller's one-at-a-time solver reports the infeasibility
    assert ok[1]
    np.testing.assert_allclose(lam[1], [0.3, 0.0, 0.0], atol=1e-12)
    # one outer step cannot finish a problem whose optimum has two active constraints
    grams = unit_row_grams(np.random.default_rng(0), 1, 2, 2)
    g = np.array([[1.0, 1.0]])
    full, ok_full = batched_dual(grams, np.zeros(1, dtype=int), g)
    assert ok_full[0] and np.all(full[0] > 0)
    _, ok_short = batched_dual(grams, np.zeros(1, dtype=int), g, max_outer=1)
    assert not ok_short[0]


def test_batched_dual_chunks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(3)
    grams = unit_row_grams(rng, 3, 6, 9)
    which = rng.integers(0, 3, 50)
    g = rng.standard_normal((50, 6))
    whole, ok_whole = batched_dual(grams, which, g)
    monkeypatch.setattr("latentguard.latent.batched._CHUNK_ENTRIES", 36 * 7)  # 7 problems per chunk
    chunked, ok_chunked = batched_dual(grams, which, g)
    np.testing.assert_array_equal(ok_whole, ok_chunked)
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-15)


def test_batched_cholesky_solve_solves_and_flags_singular_matrices():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4, 5, 5))
    A = X @ X.transpose(0, 2, 1) + 0.1 * np.eye(5)
    A[2] = np.outer(X[2, 0], X[2, 0])  # rank one
    rhs = rng.standard_normal((4, 5))
    x, ok = batched_cholesky_solve(A, rhs)
    assert ok.tolist() == [True, True, False, True]
    for i in (0, 1, 3):
        np.testing.assert_allclose(A[i] @ x[i], rhs[i], rtol=1e-10, atol=1e-10)


def pairwise_both_ways(Z, y, W, b, quantile=1.0, monkeypatch=None):
    """The pairwise solution through the batched driver and through the one-at-a-time loop."""
    batched = qp.pairwise_flip_perturbations(Z, y, W, b, quantile=quantile)
    monkeypatch.setattr(qp, "_BATCHED_GRAM_ENTRIES", 0)
    loop = qp.pairwise_flip_perturbations(Z, y, W, b, quantile=quantile)
    monkeypatch.undo()
    return batched, loop


@PROPS
@given(seed=st.integers(0, 10_000), C=st.integers(2, 9), d=st.integers(2, 14),
       quantile=st.sampled_from([1.0, 0.9]))
def test_pairwise_batched_driver_equals_one_at_a_time(seed, C, d, quantile):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((C, d))
    b = 0.5 * rng.standard_normal(C)
    N = 6 * C
    Z = rng.standard_normal((N, d))
    y = np.arange(N) % C
    if C > 2:
        y[y == C - 1] = 0  # a class without samples
    with pytest.MonkeyPatch.context() as mp:
        try:
            batched, loop = pairwise_both_ways(Z, y, W, b, quantile, mp)
        except SolverError:  # C − 1 ≥ d can make a target unreachable: both drivers must refuse it
            mp.setattr(qp, "_BATCHED_GRAM_ENTRIES", 0)
            with pytest.raises(SolverError):
                qp.pairwise_flip_perturbations(Z, y, W, b, quantile=quantile)
            return
    np.testing.assert_array_equal(np.isnan(batched.norms), np.isnan(loop.norms))
    np.testing.assert_allclose(batched.norms, loop.norms, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(batched.perturbations, loop.perturbations, rtol=1e-6, atol=1e-8)
    assert np.nanmax(batched.kkt_residual) <= 1e-6
    np.testing.assert_array_equal(batched.sample_counts, loop.sample_counts)


def test_pairwise_driver_solves_rows_the_batch_hands_back(monkeypatch):
    rng = np.random.default_rng(5)
    W, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    Z, y = rng.standard_normal((60, 10)), np.arange(60) % 6
    expected = qp.pairwise_flip_perturbations(Z, y, W, b)

    def refuse_all(grams, which, g, max_outer=None):
        return np.zeros_like(g), np.zeros(g.shape[0], dtype=bool)

    monkeypatch.setattr(qp, "batched_dual", refuse_all)
    handed_back = qp.pairwise_flip_perturbations(Z, y, W, b)
    np.testing.assert_allclose(handed_back.norms, expected.norms, rtol=1e-9)


def test_near_duplicate_rows_take_the_one_at_a_time_driver(monkeypatch):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((5, 8))
    W[3] = W[1] + 1e-5 * rng.standard_normal(8)  # near-duplicate: the Gram identity would cancel
    b = rng.standard_normal(5)
    Z, y = rng.standard_normal((40, 8)), np.arange(40) % 5
    assert not qp._rows_well_separated(W @ W.T)
    assert qp._rows_well_separated(np.delete(W, 3, axis=0) @ np.delete(W, 3, axis=0).T)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the batched solver must not see near-duplicate rows")

    monkeypatch.setattr(qp, "batched_dual", must_not_run)
    sol = qp.pairwise_flip_perturbations(Z, y, W, b)
    assert np.nanmax(sol.kkt_residual) <= 1e-6


def test_pairwise_driver_names_the_pair_that_misses_the_kkt_tolerance(monkeypatch):
    rng = np.random.default_rng(7)
    W, b = rng.standard_normal((4, 9)), rng.standard_normal(4)
    Z, y = rng.standard_normal((40, 9)), np.arange(40) % 4
    real_assemble = qp._assemble

    def spoiled(W, targets, lam, c, explicit_rows):  # every solution reported far from optimal
        S, resid = real_assemble(W, targets, lam, c, explicit_rows)
        return S, resid + 1.0

    monkeypatch.setattr(qp, "_assemble", spoiled)
    with pytest.raises(SolverError, match=r"source class 0 → target class 1 missed the KKT tolerance"):
        qp.pairwise_flip_perturbations(Z, y, W, b)
