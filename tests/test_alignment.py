import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

from latentguard.errors import LatentGuardError
from latentguard.latent.alignment import class_mean_latents, flip_alignment, orthogonal_flip_perturbations
from latentguard.latent.constraints import constraint_system
from latentguard.latent.qp import minimal_flip_perturbations

PROPS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def instance(seed: int, C: int, d: int, n_per: int = 4):
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(C, d)), rng.normal(size=C)
    y = np.repeat(np.arange(C), n_per)
    Z = np.abs(rng.normal(size=(C * n_per, d)))  # post-ReLU-like latents: every class mean is nonzero
    return Z, y, W, b


def reference_orthogonal_flip(Z, y, W, b, k):
    """The same QP solved independently: rows ``(w_k − w_j)`` projected off ``μ_k``, dual by scipy's NNLS."""
    mu = Z[y == k].mean(0)
    u = mu / np.linalg.norm(mu)
    A, c = constraint_system(Z, W, b, k)
    M = A - np.outer(A @ u, u)
    L = np.linalg.cholesky(M @ M.T)
    lam = nnls(L.T, np.linalg.solve(L, c))[0]
    return M.T @ lam, u, M, c


@PROPS
@given(seed=st.integers(0, 10_000), C=st.integers(2, 8), extra=st.integers(2, 10))
def test_orthogonal_flip_matches_reference_and_is_orthogonal(seed, C, extra):
    Z, y, W, b = instance(seed, C, C + extra)
    sol = orthogonal_flip_perturbations(Z, y, W, b)
    for row, k in enumerate(sol.classes):
        ref, u, M, c = reference_orthogonal_flip(Z, y, W, b, int(k))
        s = sol.perturbations[row]
        assert abs(s @ u) <= 1e-8 * max(1.0, np.linalg.norm(s))
        assert (M @ s - c >= -1e-7 * max(1.0, np.abs(c).max())).all()  # every clean sample reaches k
        np.testing.assert_allclose(s, ref, atol=1e-6 * max(1.0, np.linalg.norm(ref)))
    assert (sol.kkt_residual <= 1e-6).all()


@PROPS
@given(seed=st.integers(0, 10_000), C=st.integers(2, 8))
def test_orthogonal_flip_is_never_shorter_than_the_plain_flip(seed, C):
    Z, y, W, b = instance(seed, C, C + 4)
    plain = minimal_flip_perturbations(Z, W, b)
    ortho = orthogonal_flip_perturbations(Z, y, W, b)
    a = flip_alignment(plain.norms, ortho.norms)
    assert ((a > 0) & (a <= 1 + 1e-7)).all()  # an extra constraint can only lengthen the minimum


def test_alignment_is_one_when_the_flip_is_already_orthogonal_and_small_when_it_follows_the_mean():
    # d = 3; class 1's mean lies along e0, which its flip (along w1 − w0 = (0, 0.2, −1)) never uses: alignment 1.
    # class 0's mean lies along e2, and w0 − w1 = (0, −0.2, 1) mostly follows it: without e2 the flip is 5× longer.
    W = np.array([[0.0, 0.0, 1.0], [0.0, 0.2, 0.0]])
    b = np.array([0.0, 1.0])
    Z = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    y = np.array([0, 0, 1, 1])
    plain = minimal_flip_perturbations(Z, W, b)
    ortho = orthogonal_flip_perturbations(Z, y, W, b)
    a = flip_alignment(plain.norms, ortho.norms)
    assert plain.norms.min() > 0
    assert a[1] == pytest.approx(1.0)
    assert a[0] == pytest.approx(np.sqrt(0.2**2 / (1 + 0.2**2)), rel=1e-6)  # ‖s_0‖ = 1/‖(0, −.2, 1)‖, ‖s⊥_0‖ = 1/0.2


def test_class_means_and_input_validation():
    Z = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    np.testing.assert_allclose(class_mean_latents(Z, [0, 0, 1], 2), [[2.0, 1.0], [0.0, 4.0]])
    with pytest.raises(LatentGuardError, match="no clean sample"):
        class_mean_latents(Z, [0, 0, 0], 2)
    W, b = np.eye(2), np.zeros(2)
    with pytest.raises(LatentGuardError, match="mean clean latent is zero"):
        orthogonal_flip_perturbations(np.array([[0.0, 0.0], [1.0, 1.0]]), [0, 1], W, b)
    np.testing.assert_allclose(flip_alignment([0.0, 1.0], [0.0, 2.0]), [1.0, 0.5])  # no flip needed: 1
    with pytest.raises(LatentGuardError, match="finite and >= 0"):
        flip_alignment([1.0, -1.0], [1.0, 1.0])
    with pytest.raises(LatentGuardError, match="same order"):
        flip_alignment([1.0, 1.0], [1.0, 0.0])
    with pytest.raises(LatentGuardError, match="two"):
        flip_alignment([1.0], [1.0, 2.0])
