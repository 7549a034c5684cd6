"""Exact minimal latent perturbations that flip clean samples to a class (TAC reconstruction).

Iwahana et al. (arXiv 2511.08944) reconstruct the trigger-activated change in the penultimate latent space
as the smallest perturbation ``s_k`` that moves *every* clean latent ``z_i`` into class ``k`` under the
linear head ``(W, b)`` (rows ``w_j`` of ``W``; ``C`` classes, latent size ``d``)::

    s_k = argmin_s ½‖s‖²  s.t.  (w_k − w_j)ᵀ(z_i + s) + b_k − b_j ≥ 0   for every sample i and every j ≠ k.

The work is split in three modules:

:mod:`latentguard.latent.constraints`
    Input validation and the reduction to ``C − 1`` constraints ``A_k s ≥ c_k`` with rows
    ``a_j = w_k − w_j`` and ``c_j = max_i −((w_k − w_j)ᵀ z_i + b_k − b_j)`` (or a ``q``-quantile);
    :func:`constraint_system` returns them.
:mod:`latentguard.latent.dual`
    The exact dual solvers (``method="active-set"``, the default, or ``"nnls"``, the reference) and the KKT
    residual :func:`kkt_residual`.
this module
    The public API and the driver over target classes: the global Gram ``W Wᵀ``, competitors whose weight
    row equals ``w_k`` exactly (they contribute the constant margin ``b_k − b_j``: dropped when ``≥ 0``,
    infeasible otherwise) and near-duplicate competitors (``‖w_k − w_j‖ ≤ 10⁻³·‖w‖``, where the Gram identity
    loses most digits: their rows, ``c_k`` and KKT check are formed from explicit differences).
:mod:`latentguard.latent.batched`
    The pairwise driver's fast path: with well-separated rows it solves all ``C (C − 1)`` duals in one
    batched Lawson–Hanson run (:func:`~latentguard.latent.batched.batched_dual`) and hands the few
    problems the batch cannot finish to the one-at-a-time solvers.

Every solution is checked against the KKT conditions in the primal space (see :func:`kkt_residual`); a
class whose active-set answer misses ``tol`` is re-solved with the reference method, and a class that still
misses it raises :class:`~latentguard.errors.SolverError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from latentguard.errors import LatentGuardError, SolverError
from latentguard.latent.batched import batched_dual
from latentguard.latent.constraints import (
    _Samples,
    _validate,
    _validate_classes,
    _validate_labels,
    _validate_quantile,
    _violation_bounds,
    constraint_system,
)
from latentguard.latent.dual import _ClassProblem, _dual, _fmt, _kkt_parts, _pseudo_factor, kkt_residual

__all__ = [
    "FlipSolution",
    "PairwiseFlipSolution",
    "Method",
    "constraint_system",
    "kkt_residual",
    "minimal_flip_perturbations",
    "pairwise_flip_perturbations",
]

Method = Literal["active-set", "nnls"]
# the pairwise driver solves all duals at once when the C normalised Grams, C (C − 1)² entries, fit in 160 MB
_BATCHED_GRAM_ENTRIES = 20_000_000
_METHODS: tuple[str, ...] = ("active-set", "nnls")


@dataclass(frozen=True)
class FlipSolution:
    """Minimal flipping perturbations ``s_k`` for a set of target classes ``k``.

    Attributes:
        classes: ``(K,)`` target classes ``k``, in the order solved.
        perturbations: ``(K, d)`` the optimal ``s_k``.
        norms: ``(K,)`` ``‖s_k‖₂`` (the statistic whose small outliers reveal a backdoor target).
        multipliers: ``(K, C − 1)`` dual variables ``λ ≥ 0``; column ``j`` belongs to competitor class
            ``j`` if ``j < k`` and to class ``j + 1`` otherwise (``k`` itself is skipped), so that
            ``s_k = Σ_j λ_j (w_k − w_j)``. A competitor whose constraint was dropped (identical weight row,
            nothing to enforce) has ``λ_j = 0``.
        kkt_residual: ``(K,)`` scaled KKT residual of each solution (see :func:`kkt_residual`).
        bounds: ``(K, C − 1)`` the right-hand sides ``c_j`` in the same column order as ``multipliers``.
    """

    classes: np.ndarray
    perturbations: np.ndarray
    norms: np.ndarray
    multipliers: np.ndarray
    kkt_residual: np.ndarray
    bounds: np.ndarray

    def norm_of(self, k: int) -> float:
        """Return ``‖s_k‖`` for target class ``k`` (which must be among :attr:`classes`)."""
        hits = np.flatnonzero(self.classes == k)
        if hits.size == 0:
            raise LatentGuardError(f"class {k} was not solved: pass it in `classes`")
        return float(self.norms[hits[0]])


@dataclass(frozen=True)
class PairwiseFlipSolution:
    """Minimal perturbations ``s_{a→k}`` flipping the samples of source class ``a`` to target ``k``.

    Attributes:
        norms: ``(C, C)`` ``‖s_{a→k}‖`` at ``[a, k]``; ``nan`` on the diagonal and on rows of source classes
            without samples.
        perturbations: ``(C, C, d)`` ``s_{a→k}`` at ``[a, k]``; ``nan`` where ``norms`` is ``nan``.
        kkt_residual: ``(C, C)`` scaled KKT residuals, ``nan`` where ``norms`` is ``nan``.
        sample_counts: ``(C,)`` number of samples of each source class.
    """

    norms: np.ndarray
    perturbations: np.ndarray
    kkt_residual: np.ndarray
    sample_counts: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Solver options
# ----------------------------------------------------------------------------------------------------------


def _validate_tol(tol: float) -> float:
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise LatentGuardError(f"tol must be a positive finite number, got {tol!r}")
    return float(tol)


def _validate_method(method: str) -> str:
    if method not in _METHODS:
        raise LatentGuardError(f"unknown method {method!r}: use one of {', '.join(_METHODS)}")
    return method


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _duplicate_groups(W: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Group id of every weight row; equal ids mean identical rows (so ``a_j = 0`` exactly).

    Candidates come from the Gram (``‖w_i − w_j‖² ≈ 0``) and are confirmed by exact comparison.
    """
    diag = np.diag(G)
    dist2 = _squared_row_distances(G)
    scale = diag[:, None] + diag[None, :]
    groups = np.arange(W.shape[0])
    for i, j in zip(*np.nonzero(np.triu(dist2 <= 1e-8 * scale + 1e-300, k=1)), strict=True):
        if groups[j] == j and np.array_equal(W[i], W[j]):
            groups[j] = groups[i]
    return groups


def _single_threaded_blas(num_classes: int) -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread around the many small per-class factorisations.

    Multithreaded BLAS on matrices of a few hundred rows gains little and collapses when the cores are
    shared (spinning threads); the large products stay outside this context. Small problems skip it: changing
    the BLAS thread count costs more than they take.
    """
    if num_classes < 64:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _solve_targets(
    W: np.ndarray,
    b: np.ndarray,
    G: np.ndarray,
    groups: np.ndarray,
    samples: _Samples,
    targets: np.ndarray,
    cmat: np.ndarray,
    method: str,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve every target; return ``S (K, d)``, ``λ (K, C−1)``, ``c (K, C−1)``, residuals ``(K,)``, norms."""
    C = W.shape[0]
    K = targets.size
    diag = np.diag(G)
    lam_all = np.zeros((K, C - 1))
    c_all = np.empty((K, C - 1))
    explicit_rows: dict[int, np.ndarray] = {}  # target position -> explicit A_k (near-duplicate rows)
    factor = _lazy_factor(W)
    problems: list[_ClassProblem | None] = []
    with _single_threaded_blas(W.shape[0]):
        for a, k in enumerate(targets):
            k = int(k)
            idx = np.r_[0:k, k + 1 : C]
            zero = groups[idx] == groups[k]
            dist2 = diag[k] + diag[idx] - 2.0 * G[k, idx]
            near = ~zero & (dist2 <= 1e-6 * (diag[k] + diag[idx]))  # the Gram has lost > 8 digits here
            c = cmat[a, idx]
            if np.any(near):
                c = samples.exact_bounds(W, b, k, idx)
            c[zero] = b[idx[zero]] - b[k]  # identical rows: the margin is the bias gap for every sample
            if not np.all(np.isfinite(c)):
                raise LatentGuardError(f"no sample is left to constrain target class {k}: pass more samples")
            c_all[a] = c
            bad = zero & (c > 0)
            if np.any(bad):
                raise SolverError(
                    f"class {k} can never outscore class(es) {_fmt(idx[bad])}: their weight rows equal class "
                    f"{k}'s and their bias is higher; drop class {k} from `classes` or fix the head"
                )
            live_pos = np.flatnonzero(~zero)
            live = idx[live_pos]
            rows = None
            if np.any(near):
                explicit_rows[a] = W[k] - W[idx]
                nu = np.linalg.norm(explicit_rows[a][live_pos], axis=1)
                rows = explicit_rows[a][live_pos] / nu[:, None]
            else:
                nu = np.sqrt(np.maximum(dist2[live_pos], 0.0))
            chat = c[live_pos] / nu
            gamma = float(np.max(chat, initial=0.0))
            if gamma <= 0.0:  # every sample already wins: s = 0
                problems.append(None)
                continue
            prob = _ClassProblem(k=k, live=live, nu=nu, g=chat / gamma, gamma=gamma, G=G, rows=rows)
            problems.append(prob)
            lam_all[a, live_pos] = _dual(prob, method, factor)

    S, resid = _assemble(W, targets, lam_all, c_all, explicit_rows)
    retry = np.flatnonzero(~(resid <= tol)) if method == "active-set" else np.empty(0, dtype=np.intp)
    with _single_threaded_blas(W.shape[0]):
        for a in retry:  # re-solve the few classes that missed tol with the reference path
            prob = problems[a]
            if prob is None:
                continue
            live_pos = np.searchsorted(np.r_[0 : targets[a], targets[a] + 1 : C], prob.live)
            lam_all[a] = 0.0
            lam_all[a, live_pos] = _dual(prob, "nnls", factor)
    if retry.size:
        sub = {i: explicit_rows[a] for i, a in enumerate(retry) if a in explicit_rows}
        S[retry], resid[retry] = _assemble(W, targets[retry], lam_all[retry], c_all[retry], sub)
    _require_kkt(resid, tol, lambda a: f"target class {int(targets[a])}")
    return S, lam_all, c_all, resid, np.linalg.norm(S, axis=1)


def _require_kkt(resid: np.ndarray, tol: float, name: Callable[[int], str]) -> None:
    """Raise :class:`SolverError` for the first problem whose KKT residual misses ``tol`` (``name(i)`` names it)."""
    bad = np.flatnonzero(~(resid <= tol))
    if bad.size:
        i = int(bad[0])
        raise SolverError(
            f"the QP of {name(i)} missed the KKT tolerance {tol:g} (residual {resid[i]:.3g}); its competitor rows "
            "are nearly dependent: raise `tol` or check the head"
        )


def _lazy_factor(W: np.ndarray) -> Callable[[], np.ndarray]:
    """The pseudo-factor of ``W Wᵀ`` (:func:`_pseudo_factor`), computed on first use only."""
    cache: list[np.ndarray] = []

    def factor() -> np.ndarray:
        if not cache:
            cache.append(_pseudo_factor(W))
        return cache[0]

    return factor


def _assemble(
    W: np.ndarray,
    targets: np.ndarray,
    lam: np.ndarray,
    c: np.ndarray,
    explicit_rows: dict[int, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """``s_k = Wᵀμ_k`` with ``μ_k = (Σλ) e_k − Σ_j λ_j e_j``, and the primal-space KKT residual per target.

    ``A_k s`` is read off ``W s`` for all targets at once, except for targets with near-duplicate rows where
    it is formed from the explicit rows ``explicit_rows[a]`` to avoid cancellation.
    """
    K = targets.size
    C = W.shape[0]
    mask = np.ones((K, C), dtype=bool)
    mask[np.arange(K), targets] = False
    mu = np.zeros((K, C))
    mu[mask] = -lam.reshape(-1)
    mu[np.arange(K), targets] = lam.sum(axis=1)
    S = mu @ W
    WS = S @ W.T
    As = (WS[np.arange(K), targets][:, None] - WS)[mask].reshape(K, C - 1)
    for a, A in explicit_rows.items():
        S[a] = A.T @ lam[a]
        As[a] = A @ S[a]
    # stationarity s = Aᵀλ holds by construction (s is formed from λ), so only the other three parts remain
    stat = np.zeros(K)
    return S, _kkt_parts(As, c, lam, stat)


def minimal_flip_perturbations(
    latents: Any,
    weight: Any,
    bias: Any,
    *,
    classes: Iterable[int] | None = None,
    quantile: float = 1.0,
    exclude_own_class_labels: Any | None = None,
    method: Method = "active-set",
    tol: float = 1e-6,
) -> FlipSolution:
    """Minimal latent perturbation ``s_k`` that makes the head predict class ``k`` for the clean latents.

    Args:
        latents: ``(N, d)`` penultimate latents ``z_i`` of clean samples (numpy array or torch tensor).
        weight: ``(C, d)`` head weight ``W`` (rows ``w_j``), ``C ≥ 2``.
        bias: ``(C,)`` head bias ``b``.
        classes: target classes ``k`` to solve (default: all ``C``).
        quantile: ``q ∈ (0, 1]``; ``c_j`` is the ``q``-quantile (order statistic of rank ``⌈q·(n − 1)⌉``)
            instead of the maximum over samples, so each pairwise constraint needs to hold for a fraction
            ``q`` of the samples only (robust to mislabelled or outlying samples). ``1.0`` (default) is the
            paper's formulation: every sample must flip.
        exclude_own_class_labels: optional ``(N,)`` integer labels; when given, samples labelled ``k`` are
            left out of the constraints of target ``k``. The paper constrains all clean samples (default
            ``None``), including those already of class ``k``.
        method: ``"active-set"`` (default, fast) or ``"nnls"`` (Cholesky + :func:`scipy.optimize.nnls`
            reference); both are exact.
        tol: KKT tolerance every solution must meet (see :func:`kkt_residual`).

    Returns:
        A :class:`FlipSolution`.

    Raises:
        LatentGuardError: bad shapes, non-finite values or bad options.
        SolverError: a target class cannot be reached by any perturbation, or the KKT check fails.
    """
    Z, W, b = _validate(latents, weight, bias)
    C = W.shape[0]
    targets = _validate_classes(classes, C)
    q = _validate_quantile(quantile)
    tol = _validate_tol(tol)
    method = _validate_method(method)
    exclude = None
    if exclude_own_class_labels is not None:
        exclude = _validate_labels(exclude_own_class_labels, Z.shape[0], C, "exclude_own_class_labels")
    M = Z @ W.T + b
    cmat = _violation_bounds(M, targets, q, exclude)
    G = W @ W.T
    G = 0.5 * (G + G.T)
    groups = _duplicate_groups(W, G)
    samples = _Samples(Z, q, exclude)
    S, lam, c, resid, norms = _solve_targets(W, b, G, groups, samples, targets, cmat, method, tol)
    return FlipSolution(
        classes=targets.copy(), perturbations=S, norms=norms, multipliers=lam, kkt_residual=resid, bounds=c
    )


def pairwise_flip_perturbations(
    latents: Any,
    labels: Any,
    weight: Any,
    bias: Any,
    *,
    quantile: float = 1.0,
    method: Method = "active-set",
    tol: float = 1e-6,
) -> PairwiseFlipSolution:
    """Minimal perturbations ``s_{a→k}`` for every (source ``a``, target ``k ≠ a``) pair (all-to-all backdoors).

    For source class ``a`` only the latents labelled ``a`` enter the constraints of target ``k``; otherwise
    the problem is the one of :func:`minimal_flip_perturbations`. This solves ``C (C − 1)`` QPs and returns
    ``C² d`` floats, so it is meant for heads with up to a few hundred classes.

    Args:
        latents: ``(N, d)`` clean latents.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        weight, bias: the head ``(W, b)``.
        quantile, method, tol: as in :func:`minimal_flip_perturbations`.
    """
    Z, W, b = _validate(latents, weight, bias)
    C, d = W.shape
    y = _validate_labels(labels, Z.shape[0], C, "labels")
    q = _validate_quantile(quantile)
    tol = _validate_tol(tol)
    method = _validate_method(method)
    if C * C * d > 250_000_000:
        raise LatentGuardError(
            f"pairwise perturbations for C={C}, d={d} need {C * C * d * 8 / 1e9:.1f} GB: "
            "use minimal_flip_perturbations with `classes` instead"
        )
    M = Z @ W.T + b
    G = W @ W.T
    G = 0.5 * (G + G.T)
    counts = np.bincount(y, minlength=C)
    if method == "active-set" and C * (C - 1) ** 2 <= _BATCHED_GRAM_ENTRIES and _rows_well_separated(G):
        return _pairwise_batched(Z, y, W, b, M, G, counts, q, tol)
    groups = _duplicate_groups(W, G)
    norms = np.full((C, C), np.nan)
    resid = np.full((C, C), np.nan)
    pert = np.full((C, C, d), np.nan)
    for a in range(C):
        if counts[a] == 0:
            continue
        targets = np.r_[0:a, a + 1 : C].astype(np.intp)
        cmat = _violation_bounds(M[y == a], targets, q, None)
        S, _, _, r, n = _solve_targets(W, b, G, groups, _Samples(Z[y == a], q), targets, cmat, method, tol)
        norms[a, targets] = n
        resid[a, targets] = r
        pert[a, targets] = S
    return PairwiseFlipSolution(norms=norms, perturbations=pert, kkt_residual=resid, sample_counts=counts)


def _squared_row_distances(G: np.ndarray) -> np.ndarray:
    """``‖w_k − w_j‖²`` for every pair of weight rows, read off the Gram ``W Wᵀ``."""
    diag = np.diag(G)
    return diag[:, None] + diag[None, :] - 2.0 * G


def _rows_well_separated(G: np.ndarray) -> bool:
    """True when no two weight rows are identical or near-duplicates (``‖w_k − w_j‖² > 10⁻⁶ (‖w_k‖² + ‖w_j‖²)``),
    the case where every target's normalised Gram comes straight from ``W Wᵀ``."""
    diag = np.diag(G)
    dist2 = _squared_row_distances(G)
    off = ~np.eye(G.shape[0], dtype=bool)
    return bool(np.all(dist2[off] > 1e-6 * (diag[:, None] + diag[None, :])[off]))


def _pairwise_batched(
    Z: np.ndarray,
    y: np.ndarray,
    W: np.ndarray,
    b: np.ndarray,
    M: np.ndarray,
    G: np.ndarray,
    counts: np.ndarray,
    q: float,
    tol: float,
) -> PairwiseFlipSolution:
    """:func:`pairwise_flip_perturbations` for well-separated rows, every dual at once (:func:`batched_dual`).

    ``Ĝ_k`` depends on the target only, so the ``C`` normalised Grams are formed once; each (source, target)
    pair contributes its right-hand side. Problems the batch hands back are solved one at a time, and every
    solution passes the same KKT check (with the reference re-solve) as the one-at-a-time driver.
    """
    C, d = W.shape
    diag = np.diag(G)
    competitors = np.array([np.r_[0:k, k + 1 : C] for k in range(C)], dtype=np.intp)  # (C, C − 1)
    nu = np.sqrt(np.take_along_axis(_squared_row_distances(G), competitors, axis=1))  # ‖w_k − w_j‖, (C, C − 1)
    gk = np.take_along_axis(G, competitors, axis=1)
    grams = (diag[:, None, None] - gk[:, :, None] - gk[:, None, :] + G[competitors[:, :, None], competitors[:, None, :]])
    grams = grams / (nu[:, :, None] * nu[:, None, :])
    grams = 0.5 * (grams + grams.transpose(0, 2, 1))
    sources, targets, bounds = [], [], []
    for a in np.flatnonzero(counts):
        t = np.r_[0:a, a + 1 : C].astype(np.intp)
        cmat = _violation_bounds(M[y == a], t, q, None)
        sources.append(np.full(t.size, a))
        targets.append(t)
        bounds.append(np.take_along_axis(cmat, competitors[t], axis=1))
    src, tgt, c = (np.concatenate(v) for v in (sources, targets, bounds))
    chat = c / nu[tgt]
    gamma = chat.max(axis=1)
    lam = np.zeros_like(c)
    solve = np.flatnonzero(gamma > 0.0)  # the others are met by s = 0 already
    with _single_threaded_blas(C):
        lam_hat, ok = batched_dual(grams, tgt[solve], chat[solve] / gamma[solve, None])
        lam[solve] = gamma[solve, None] * lam_hat / nu[tgt[solve]]
        factor = _lazy_factor(W)

        def one_at_a_time(row: int, method: str) -> np.ndarray:
            k = int(tgt[row])
            prob = _ClassProblem(k=k, live=competitors[k], nu=nu[k], g=chat[row] / gamma[row], gamma=float(gamma[row]),
                                 G=G)
            return _dual(prob, method, factor)

        for row in solve[~ok]:
            lam[row] = one_at_a_time(row, "active-set")
        S, resid = _assemble(W, tgt, lam, c, {})
        retry = np.flatnonzero(~(resid <= tol) & (gamma > 0.0))
        for row in retry:
            lam[row] = one_at_a_time(row, "nnls")
    if retry.size:
        S[retry], resid[retry] = _assemble(W, tgt[retry], lam[retry], c[retry], {})
    _require_kkt(resid, tol, lambda row: f"source class {int(src[row])} → target class {int(tgt[row])}")
    norms = np.full((C, C), np.nan)
    residuals = np.full((C, C), np.nan)
    perturbations = np.full((C, C, d), np.nan)
    norms[src, tgt] = np.linalg.norm(S, axis=1)
    residuals[src, tgt] = resid
    perturbations[src, tgt] = S
    return PairwiseFlipSolution(norms=norms, perturbations=perturbations, kkt_residual=residuals, sample_counts=counts)
