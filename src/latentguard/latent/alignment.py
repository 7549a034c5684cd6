"""How much of a class's minimal flip runs along the class's own mean latent (TAC's alignment statistic).

TAC's minimal flip ``s_k`` (:func:`~latentguard.latent.qp.minimal_flip_perturbations`) is the shortest latent
change that sends every clean latent into class ``k``. Inspired by class-subspace orthogonalisation (Yang,
Miller and Kesidis, arXiv 2512.08129: suppress a class's intrinsic features while measuring how easily it is
reached), this module also solves the same QP with ``s`` kept orthogonal to ``μ_k``, the mean clean latent of
class ``k``::

    s⊥_k = argmin_s ½‖s‖²  s.t.  (w_k − w_j)ᵀ(z_i + s) + b_k − b_j ≥ 0  ∀ i, j ≠ k,   μ_kᵀ s = 0,

and scores class ``k`` by the alignment ``a_k = ‖s_k‖ / ‖s⊥_k‖ ∈ (0, 1]``: ``a_k`` near 1 says the cheapest way
into ``k`` barely uses ``k``'s typical features, near 0 that it is mostly "more of ``k``'s typical features".
On development models a backdoor target's flip leans on ``μ_k`` far more than other classes' do (``a_k`` a
low outlier); ``benchmarks/tac_alignment_digits.md`` has the evidence and the cases where it fails (SIG).

Since ``s`` must lie in the complement of ``μ_k``, the constraint rows become ``P(w_k − w_j)`` with
``P = I − μ̂μ̂ᵀ`` while the right-hand sides ``c_j`` stay those of the plain QP, so each ``s⊥_k`` is an
ordinary minimal-flip problem (one zero latent, rows ``W P``, bias ``−c``) and gets the same exact, KKT-checked
solver.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from latentguard.errors import LatentGuardError, SolverError
from latentguard.latent.constraints import _validate, _validate_classes, _validate_labels, constraint_system
from latentguard.latent.qp import FlipSolution, minimal_flip_perturbations

__all__ = ["class_mean_latents", "orthogonal_flip_perturbations", "flip_alignment"]


def class_mean_latents(latents: Any, labels: Any, num_classes: int) -> np.ndarray:
    """``(C, d)`` mean clean latent ``μ_k`` of every class; a class without samples raises (it has no mean)."""
    Z = np.asarray(latents, dtype=np.float64)
    y = _validate_labels(labels, Z.shape[0], num_classes, "labels")
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:8].tolist()
        raise LatentGuardError(f"labels: class(es) {missing} have no clean sample; the alignment needs every class")
    mu = np.zeros((num_classes, Z.shape[1]))
    np.add.at(mu, y, Z)
    return mu / counts[:, None]


def orthogonal_flip_perturbations(
    latents: Any,
    labels: Any,
    weight: Any,
    bias: Any,
    *,
    classes: Iterable[int] | None = None,
    quantile: float = 1.0,
    tol: float = 1e-6,
) -> FlipSolution:
    """Minimal flips ``s⊥_k`` kept orthogonal to the class's mean clean latent ``μ_k`` (see the module doc).

    Args:
        latents: ``(N, d)`` clean latents ``z_i``.
        labels: ``(N,)`` their integer labels (``μ_k`` is the mean of the latents labelled ``k``).
        weight, bias: the head ``(W, b)``, ``(C, d)`` and ``(C,)``.
        classes: target classes (default: all).
        quantile: as in :func:`~latentguard.latent.qp.minimal_flip_perturbations` (1.0: every sample must flip).
        tol: KKT tolerance every solution must meet.

    Returns:
        A :class:`~latentguard.latent.qp.FlipSolution` of the ``s⊥_k`` (``bounds`` are the plain QP's ``c_k``).

    Raises:
        LatentGuardError: bad shapes or labels, or a class with a zero mean latent (nothing to be orthogonal to).
        SolverError: a class that no perturbation orthogonal to ``μ_k`` can reach.
    """
    Z, W, b = _validate(latents, weight, bias)
    C, d = W.shape
    targets = _validate_classes(classes, C)
    mu = class_mean_latents(Z, labels, C)
    zero = np.zeros((1, d))
    rows = []
    for k in targets:
        k = int(k)
        norm = float(np.linalg.norm(mu[k]))
        if norm == 0.0:
            raise LatentGuardError(f"class {k}'s mean clean latent is zero: the alignment is undefined for it")
        u = mu[k] / norm
        _, c = constraint_system(Z, W, b, k, quantile=quantile)
        shifted_bias = np.zeros(C)
        shifted_bias[np.r_[0:k, k + 1 : C]] = c  # margins at the zero latent are −c_j
        try:
            rows.append(minimal_flip_perturbations(zero, W - np.outer(W @ u, u), shifted_bias, classes=[k], tol=tol))
        except SolverError as exc:
            raise SolverError(f"orthogonal to its mean latent, {exc}") from None
    return FlipSolution(
        classes=targets.copy(),
        perturbations=np.concatenate([r.perturbations for r in rows]),
        norms=np.concatenate([r.norms for r in rows]),
        multipliers=np.concatenate([r.multipliers for r in rows]),
        kkt_residual=np.concatenate([r.kkt_residual for r in rows]),
        bounds=np.concatenate([r.bounds for r in rows]),
    )


def flip_alignment(flip_norms: Any, orthogonal_norms: Any) -> np.ndarray:
    """``a_k = ‖s_k‖ / ‖s⊥_k‖`` per class (in ``(0, 1]`` up to solver tolerance); small = leans on ``μ_k``.

    A class every clean sample already reaches needs no flip (``s_k = s⊥_k = 0``) and gets ``a_k = 1``.
    """
    s = np.asarray(flip_norms, dtype=np.float64)
    t = np.asarray(orthogonal_norms, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 1:
        raise LatentGuardError(f"flip_alignment: need two (C,) arrays of norms, got shapes {s.shape} and {t.shape}")
    if not (np.isfinite(s).all() and np.isfinite(t).all()) or (s < 0).any() or (t < 0).any():
        raise LatentGuardError("flip_alignment: norms must be finite and >= 0")
    if ((t == 0) & (s > 0)).any():
        raise LatentGuardError("flip_alignment: an orthogonal flip of norm 0 with a plain flip above 0 is impossible; "
                               "pass the norms of the same classes in the same order")
    return np.where(t > 0, s / np.where(t > 0, t, 1.0), 1.0)
