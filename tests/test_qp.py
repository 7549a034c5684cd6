"""Tests of the exact TAC flip QP (latentguard.latent.qp)."""

from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentguard.errors import LatentGuardError, SolverError
from latentguard.latent import (
    FlipSolution,
    constraint_system,
    kkt_residual,
    minimal_flip_perturbations,
    pairwise_flip_perturbations,
)

METHODS = ["active-set", "nnls"]
PROPS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def brute_force_ldp(A: np.ndarray, c: np.ndarray) -> np.ndarray | None:
    """Exact ``argmin ½‖s‖² s.t. A s ≥ c`` by enumerating active sets (tiny m only); None if infeasible.

    The optimum is the minimum-norm point of the affine set {A_S s = c_S} of its own active set S, and it is
    feasible; every other feasible candidate has a larger norm, so the smallest feasible candidate wins.
    """
    m, d = A.shape
    scale = 1.0 + np.abs(c).max()
    if np.all(c <= 0):
        return np.zeros(d)
    best = None
    for r in range(1, m + 1):
        for S in combinations(range(m), r):
            AS, cS = A[list(S)], c[list(S)]
            s = np.linalg.lstsq(AS, cS, rcond=None)[0]
            if np.linalg.norm(AS @ s - cS) > 1e-9 * scale:
                continue
            if np.all(A @ s >= c - 1e-9 * scale) and (best is None or s @ s < best @ best):
                best = s
    return best


def random_instance(seed: int, C: int, d: int, N: int = 12):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((C, d))
    b = 0.5 * rng.standard_normal(C)
    Z = rng.standard_normal((N, d))
    return Z, W, b


def check_against_reference(Z, W, b, sol: FlipSolution, tol: float = 1e-6) -> None:
    for row, k in enumerate(sol.classes):
        A, c = constraint_system(Z, W, b, int(k))
        ref = brute_force_ldp(A, c)
        assert ref is not None
        s = sol.perturbations[row]
        assert abs(0.5 * s @ s - 0.5 * ref @ ref) <= tol * (1 + ref @ ref)
        np.testing.assert_allclose(s, ref, atol=tol * (1 + np.linalg.norm(ref)))
        assert kkt_residual(A, c, s, sol.multipliers[row]) <= 1e-8


# ---------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("method", METHODS)
def test_two_classes_closed_form(method):
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([0.0, 0.5])
    Z = np.array([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    sol = minimal_flip_perturbations(Z, W, b, method=method)
    for row, (k, j) in enumerate([(0, 1), (1, 0)]):
        a = W[k] - W[j]
        c = np.max(-(Z @ a + b[k] - b[j]))
        expected = max(0.0, c) / (a @ a) * a
        np.testing.assert_allclose(sol.perturbations[row], expected, atol=1e-12)
        np.testing.assert_allclose(sol.norms[row], np.linalg.norm(expected), atol=1e-12)
        np.testing.assert_allclose(sol.multipliers[row], [max(0.0, c) / (a @ a)], atol=1e-12)
    # class 0 needs c = max(1 + 0.5 - 0, 0 + 0.5 - 2, 0.5 + 0.5 - 0.5) = 1.5 along (1, -1)/2
    np.testing.assert_allclose(sol.perturbations[0], [0.75, -0.75], atol=1e-12)


def test_three_classes_by_hand():
    # w = e1, e2, 0 in 2-D; one sample at the origin, zero bias. Class 2 (w = 0) must beat e1 and e2:
    # (0 - e1)ᵀ s ≥ 0 and (0 - e2)ᵀ s ≥ 0 -> s = 0 suffices because ties count as wins.
    W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b = np.zeros(3)
    Z = np.array([[1.0, 1.0]])
    sol = minimal_flip_perturbations(Z, W, b, classes=[0, 2])
    # class 0: constraints s1 - s2 ≥ 0 (vs class 1) and s1 ≥ -1 (vs class 2) -> s = 0
    np.testing.assert_allclose(sol.perturbations[0], [0.0, 0.0], atol=1e-12)
    # class 2: -s1 ≥ 1 and -s2 ≥ 1 -> s = (-1, -1), both active with λ = 1
    np.testing.assert_allclose(sol.perturbations[1], [-1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(sol.multipliers[1], [1.0, 1.0], atol=1e-12)
    assert sol.norm_of(2) == pytest.approx(np.sqrt(2))


def test_already_flipped_gives_zero():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    b = np.zeros(3)
    Z = np.array([[5.0, 0.0], [4.0, 1.0]])  # every sample is class 0 by a margin
    sol = minimal_flip_perturbations(Z, W, b, classes=[0])
    assert sol.norms[0] == 0.0
    assert np.all(sol.multipliers[0] == 0.0)
    assert np.all(sol.bounds[0] < 0)


# ---------------------------------------------------------------------------------------------- KKT / flips


@pytest.mark.parametrize("method", METHODS)
def test_kkt_and_flip_on_random_instance(method):
    Z, W, b = random_instance(3, C=12, d=40, N=200)
    sol = minimal_flip_perturbations(Z, W, b, method=method)
    assert sol.perturbations.shape == (12, 40)
    assert sol.multipliers.shape == (12, 11)
    assert np.all(sol.kkt_residual <= 1e-9)
    for row, k in enumerate(sol.classes):
        A, c = constraint_system(Z, W, b, int(k))
        np.testing.assert_allclose(c, sol.bounds[row])
        assert kkt_residual(A, c, sol.perturbations[row], sol.multipliers[row]) <= 1e-9
        logits = (Z + sol.perturbations[row]) @ W.T + b
        assert np.all(logits[:, k][:, None] >= logits - 1e-9)  # every sample now (weakly) predicts k


def test_methods_agree_on_medium_instance():
    Z, W, b = random_instance(5, C=60, d=30, N=300)  # C - 1 > d: rank-deficient Gram
    W = W / np.linalg.norm(W, axis=1, keepdims=True)  # all rows on the sphere: every class reachable
    fast = minimal_flip_perturbations(Z, W, b, method="active-set")
    ref = minimal_flip_perturbations(Z, W, b, method="nnls")
    np.testing.assert_allclose(fast.perturbations, ref.perturbations, atol=1e-8)
    np.testing.assert_allclose(fast.norms, ref.norms, rtol=1e-9)


def test_kkt_residual_detects_violations():
    A = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = np.array([1.0, -1.0])
    s = np.array([1.0, 0.0])
    lam = np.array([1.0, 0.0])
    assert kkt_residual(A, c, s, lam) == pytest.approx(0.0, abs=1e-15)
    assert kkt_residual(A, c, np.array([0.5, 0.0]), np.array([0.5, 0.0])) > 0.1  # infeasible
    assert kkt_residual(A, c, s, np.array([1.0, -0.5])) > 0.1  # negative multiplier
    assert kkt_residual(A, c, s, np.array([1.0, 0.5])) > 0.1  # slack constraint with λ > 0, s ≠ Aᵀλ
    with pytest.raises(LatentGuardError):
        kkt_residual(A, c, s, np.ones(3))


# ---------------------------------------------------------------------------------------------- properties


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    C=st.integers(2, 8),
    extra=st.integers(0, 4),
    method=st.sampled_from(METHODS),
)
def test_matches_brute_force_full_rank(seed, C, extra, method):
    d = min(C + extra, 12)
    Z, W, b = random_instance(seed, C, d)
    sol = minimal_flip_perturbations(Z, W, b, method=method)
    assert np.all(sol.kkt_residual <= 1e-6)
    check_against_reference(Z, W, b, sol)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1), C=st.integers(3, 8), d=st.integers(1, 7), method=st.sampled_from(METHODS)
)
def test_rank_deficient_agrees_with_brute_force(seed, C, d, method):
    d = min(d, C - 1)  # C - 1 ≥ d: dependent constraint rows
    Z, W, b = random_instance(seed, C, d)
    for k in range(C):
        A, c = constraint_system(Z, W, b, k)
        ref = brute_force_ldp(A, c)
        if ref is None:
            with pytest.raises(SolverError, match=f"class {k}"):
                minimal_flip_perturbations(Z, W, b, classes=[k], method=method)
            continue
        sol = minimal_flip_perturbations(Z, W, b, classes=[k], method=method)
        np.testing.assert_allclose(sol.perturbations[0], ref, atol=1e-6 * (1 + np.linalg.norm(ref)))
        assert kkt_residual(A, c, sol.perturbations[0], sol.multipliers[0]) <= 1e-6


@PROPS
@given(seed=st.integers(0, 2**31 - 1), C=st.integers(2, 8), q=st.floats(0.05, 1.0))
def test_quantile_never_increases_the_norm(seed, C, q):
    Z, W, b = random_instance(seed, C, C + 2, N=30)
    full = minimal_flip_perturbations(Z, W, b)
    part = minimal_flip_perturbations(Z, W, b, quantile=q)
    assert np.all(part.norms <= full.norms * (1 + 1e-9) + 1e-12)
    # every single pairwise constraint holds for at least a fraction q of the samples
    for row, k in enumerate(part.classes):
        logits = (Z + part.perturbations[row]) @ W.T + b
        margins = logits[:, [k]] - np.delete(logits, k, axis=1)
        assert np.all((margins >= -1e-9).mean(axis=0) >= q - 1e-12)


# ---------------------------------------------------------------------------------------------- degenerate


def test_duplicate_row_with_higher_bias_is_infeasible():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 6))
    W[3] = W[1]
    b = np.array([0.0, 0.0, 0.0, 1.0])
    Z = rng.standard_normal((10, 6))
    with pytest.raises(SolverError, match=r"class 1 can never outscore class\(es\) \[3\]"):
        minimal_flip_perturbations(Z, W, b, classes=[1])
    # the other way round the duplicate is always beaten by the bias: the constraint is dropped
    sol = minimal_flip_perturbations(Z, W, b, classes=[3])
    assert sol.multipliers[0, 1] == 0.0
    check_against_reference(Z, W, b, sol)


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_competitor_rows_are_fine(method):
    Z, W, b = random_instance(11, C=6, d=8)
    W[4], b[4] = W[2], b[2]  # two identical competitors: dependent constraint rows
    sol = minimal_flip_perturbations(Z, W, b, classes=[0, 1, 3, 5], method=method)
    check_against_reference(Z, W, b, sol)


@pytest.mark.parametrize("method", METHODS)
def test_near_duplicate_rows_stay_accurate(method):
    Z, W, b = random_instance(12, C=6, d=9)
    W[1] = W[0] + 1e-7 * np.random.default_rng(1).standard_normal(9)  # the Gram identity would cancel
    sol = minimal_flip_perturbations(Z, W, b, method=method)
    assert sol.norms[0] > 1e3 * np.median(sol.norms)  # class 0 must beat its near-twin: a long push
    check_against_reference(Z, W, b, sol)


def test_class_inside_hull_is_infeasible_and_named():
    W = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]])
    b = np.array([0.0, 0.0, 0.0, 0.0, -0.1])  # w_4 = 0 is inside the hull and its bias is lower: never wins
    Z = np.array([[0.3, 0.2]])
    with pytest.raises(SolverError, match="class 4"):
        minimal_flip_perturbations(Z, W, b, classes=[4])
    sol = minimal_flip_perturbations(Z, W, b, classes=[0, 1, 2, 3])  # the hull vertices are reachable
    check_against_reference(Z, W, b, sol)


def test_bad_inputs_raise_one_line_errors():
    Z, W, b = random_instance(0, C=3, d=4)
    cases = [
        (Z[:, :3], W, b),
        (Z, W[:1], b[:1]),
        (Z, W, b[:2]),
        (np.where(np.eye(12, 4) > 0, np.nan, Z), W, b),
        (Z, np.full_like(W, np.inf), b),
        (Z[:0], W, b),
    ]
    for args in cases:
        with pytest.raises(LatentGuardError) as err:
            minimal_flip_perturbations(*args)
        assert "\n" not in str(err.value)
    for kwargs in [
        {"quantile": 0.0},
        {"quantile": 1.5},
        {"classes": [3]},
        {"classes": [0, 0]},
        {"tol": -1.0},
        {"method": "slsqp"},
        {"exclude_own_class_labels": [0, 1]},
    ]:
        with pytest.raises(LatentGuardError):
            minimal_flip_perturbations(Z, W, b, **kwargs)


def test_accepts_torch_tensors():
    Z, W, b = random_instance(2, C=4, d=6)
    ref = minimal_flip_perturbations(Z, W, b)
    sol = minimal_flip_perturbations(torch.tensor(Z, dtype=torch.float32), torch.tensor(W), torch.tensor(b))
    np.testing.assert_allclose(
        sol.norms, minimal_flip_perturbations(Z.astype(np.float32).astype(np.float64), W, b).norms
    )
    assert sol.norms.dtype == np.float64 and np.allclose(sol.norms, ref.norms, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- options


def test_exclude_own_class_equals_dropping_those_samples():
    Z, W, b = random_instance(7, C=5, d=8, N=40)
    labels = np.arange(40) % 5
    sol = minimal_flip_perturbations(Z, W, b, exclude_own_class_labels=labels)
    for k in range(5):
        ref = minimal_flip_perturbations(Z[labels != k], W, b, classes=[k])
        np.testing.assert_allclose(sol.perturbations[k], ref.perturbations[0], atol=1e-12)
    A, c = constraint_system(Z, W, b, 2, sample_mask=labels != 2)
    np.testing.assert_allclose(c, sol.bounds[2])


def test_classes_subset_keeps_order():
    Z, W, b = random_instance(8, C=6, d=9)
    full = minimal_flip_perturbations(Z, W, b)
    sub = minimal_flip_perturbations(Z, W, b, classes=[4, 1])
    np.testing.assert_array_equal(sub.classes, [4, 1])
    np.testing.assert_allclose(sub.norms, full.norms[[4, 1]], rtol=1e-12)


def test_pairwise_uses_only_source_samples():
    Z, W, b = random_instance(9, C=4, d=7, N=40)
    labels = np.arange(40) % 4
    labels[labels == 3] = 0  # class 3 has no samples
    sol = pairwise_flip_perturbations(Z, labels, W, b)
    assert sol.norms.shape == (4, 4) and sol.perturbations.shape == (4, 4, 7)
    assert np.all(np.isnan(np.diag(sol.norms)))
    assert np.all(np.isnan(sol.norms[3])) and sol.sample_counts[3] == 0
    for a in range(3):
        ref = minimal_flip_perturbations(Z[labels == a], W, b, classes=[k for k in range(4) if k != a])
        np.testing.assert_allclose(sol.norms[a, ref.classes], ref.norms, rtol=1e-12)
        np.testing.assert_allclose(sol.perturbations[a, ref.classes], ref.perturbations, atol=1e-12)
    # moving the samples of other classes leaves source 1 unchanged
    Z2 = Z.copy()
    Z2[labels != 1] += 10.0
    np.testing.assert_allclose(
        pairwise_flip_perturbations(Z2, labels, W, b).norms[1], sol.norms[1], rtol=1e-12
    )


def test_single_constraint_shortcut_is_exact_or_declines():
    """The one-constraint shortcut answers only when the projection onto the most violated halfspace satisfies the
    rest (then it equals the reference solution) and declines otherwise."""
    from latentguard.latent.dual import _ClassProblem, _single_constraint

    def problem(W: np.ndarray, c: np.ndarray) -> _ClassProblem:
        k, live = 0, np.arange(1, W.shape[0])
        nu = np.linalg.norm(W[k] - W[live], axis=1)
        chat = c / nu
        gamma = float(chat.max())
        return _ClassProblem(k=k, live=live, nu=nu, g=chat / gamma, gamma=gamma, G=W @ W.T)

    # class 0 against classes 1 and 2; rows a_1 = (1, 0), a_2 = (0, 1) (orthogonal halfspaces)
    W = np.array([[0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    lone = problem(W, np.array([2.0, -1.0]))  # only a_1ᵀs ≥ 2 binds: s = (2, 0)
    lam = _single_constraint(lone)
    assert lam is not None
    np.testing.assert_allclose(lone.gamma * lam / lone.nu, [2.0, 0.0])
    assert _single_constraint(problem(W, np.array([2.0, 1.0]))) is None  # s = (2, 0) violates a_2ᵀs ≥ 1
    z = np.array([[0.0, 0.0]])
    for b in (np.array([0.0, 2.0, -1.0]), np.array([0.0, 2.0, 1.0])):  # the same two problems through the API
        fast = minimal_flip_perturbations(z, W, b)
        ref = minimal_flip_perturbations(z, W, b, method="nnls")
        np.testing.assert_allclose(fast.perturbations, ref.perturbations, atol=1e-12)
