"""Exact solvers of ``min ½‖s‖² s.t. A_k s ≥ c_k`` for one target class (through the dual λ), and the KKT check.

The problem is solved through its dual: ``s_k = A_kᵀ λ`` with ``λ ≥ 0`` minimising ``½ λᵀ G_k λ − c_kᵀ λ``,
where the Gram matrix ``G_k = A_k A_kᵀ`` of the rows ``a_j = w_k − w_j`` is read off the single global Gram
``W Wᵀ``: ``G_k[j, l] = G_kk − G_kj − G_kl + G_jl``. The solvers see one class at a time through
:class:`_ClassProblem` (unit rows ``a_j / ‖a_j‖``, right-hand side scaled by the largest single-halfspace
distance), never the samples ``z_i``: those are folded into ``c_k`` by :mod:`latentguard.latent.constraints`.

Two exact solvers are provided (``method=``):

``"active-set"`` (default)
    Lawson–Hanson least-distance programming: the problem is the NNLS
    ``min_{u ≥ 0} ‖E u − e‖`` with ``E = [A_kᵀ; c_kᵀ]`` and ``e`` the last unit vector, and the NNLS is
    run in Gram form (``EᵀE = G_k + c_k c_kᵀ``, ``Eᵀe = c_k``), touching only the columns of ``G_k`` that
    enter the active set. A class therefore costs ``O((C − 1)·p + p³)`` for ``p`` active constraints
    instead of an ``O(C³)`` factorisation, it needs no full-rank ``G_k`` (so ``C − 1 ≥ d`` and duplicate
    rows are fine) and ``1 − c_kᵀu = 0`` is a Farkas certificate of infeasibility. The active set is
    then re-solved as an equality system on ``G_k`` to recover full precision.
``"nnls"`` (reference)
    Cholesky ``G_k = L Lᵀ`` turns the dual into ``min_{λ ≥ 0} ‖Lᵀλ − L⁻¹c_k‖`` for
    :func:`scipy.optimize.nnls`; when ``G_k`` is singular the same least-distance NNLS as above is
    solved by :func:`scipy.optimize.nnls` on an explicit factor of ``W Wᵀ``.

For a target with a near-duplicate competitor (``‖w_k − w_j‖ ≤ 10⁻³·‖w‖``, where the Gram identity loses
most digits) ``G_k`` is formed from explicit rows instead. :func:`kkt_residual` measures how far a pair
``(s, λ)`` is from optimal in the primal space; the driver in :mod:`latentguard.latent.qp` checks every
solution with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg as sla
from scipy.linalg.lapack import dtrtrs as _trtrs
from scipy.optimize import nnls

from latentguard.errors import LatentGuardError, SolverError
from latentguard.latent.constraints import _check_finite, _to_numpy

__all__ = ["kkt_residual"]

_EPS = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------------------------------------
# KKT
# ----------------------------------------------------------------------------------------------------------


def _kkt_parts(As: np.ndarray, c: np.ndarray, lam: np.ndarray, stat: np.ndarray) -> np.ndarray:
    """Row-wise scaled KKT residual given ``A s`` (…, m), ``c``, ``λ`` and the stationarity gap ``(…)``."""
    slack = As - c
    cmax = np.max(np.abs(c), axis=-1, initial=0.0)
    amax = np.max(np.abs(As), axis=-1, initial=0.0)
    lmax = np.max(np.abs(lam), axis=-1, initial=0.0)
    primal = np.max(np.maximum(-slack, 0.0), axis=-1, initial=0.0) / (1.0 + cmax)
    dual = np.max(np.maximum(-lam, 0.0), axis=-1, initial=0.0) / (1.0 + lmax)
    comp = np.max(np.abs(lam * slack), axis=-1, initial=0.0) / ((1.0 + lmax) * (1.0 + cmax + amax))
    return np.maximum.reduce([primal, dual, comp, stat])


def kkt_residual(A: Any, c: Any, s: Any, lam: Any) -> float:
    """Scaled KKT residual of ``(s, λ)`` for ``min ½‖s‖² s.t. A s ≥ c`` (0 means exactly optimal).

    The maximum of four scaled violations (max-norms over constraints):

    * primal feasibility ``(c − A s)₊ / (1 + ‖c‖∞)``,
    * dual feasibility ``(−λ)₊ / (1 + ‖λ‖∞)``,
    * complementary slackness ``|λ_j (a_jᵀ s − c_j)| / ((1 + ‖λ‖∞)(1 + ‖c‖∞ + ‖A s‖∞))``,
    * stationarity ``‖s − Aᵀλ‖∞ / (1 + ‖s‖∞ + ‖|A|ᵀ|λ|‖∞)``.
    """
    A_ = _to_numpy(A, "A")
    c_ = _to_numpy(c, "c")
    s_ = _to_numpy(s, "s")
    lam_ = _to_numpy(lam, "lam")
    if A_.ndim != 2 or c_.shape != (A_.shape[0],) or s_.shape != (A_.shape[1],) or lam_.shape != c_.shape:
        raise LatentGuardError(
            f"kkt_residual needs A (m, d), c (m,), s (d,), lam (m,); got {A_.shape}, {c_.shape}, "
            f"{s_.shape}, {lam_.shape}"
        )
    for arr, name in ((A_, "A"), (c_, "c"), (s_, "s"), (lam_, "lam")):
        _check_finite(arr, name)
    if A_.shape[0] == 0:
        return float(np.max(np.abs(s_), initial=0.0) / (1.0 + np.max(np.abs(s_), initial=0.0)))
    stat = np.max(np.abs(s_ - A_.T @ lam_)) / (1.0 + np.max(np.abs(s_)) + np.max(np.abs(A_).T @ np.abs(lam_)))
    return float(_kkt_parts(A_ @ s_, c_, lam_, np.asarray(stat)))


# ----------------------------------------------------------------------------------------------------------
# Dual solvers for one target class
# ----------------------------------------------------------------------------------------------------------


def _lower_solve(L: np.ndarray, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Solve ``L y = rhs`` (or ``Lᵀ y = rhs``) for lower-triangular ``L`` with LAPACK ``trtrs``.

    ``L.T`` is upper triangular and Fortran-ordered for a C-ordered ``L``, so no copy is needed.
    """
    y, info = _trtrs(L.T, rhs, lower=0, trans=0 if transpose else 1)
    if info != 0:
        raise np.linalg.LinAlgError("singular triangular factor")
    return y


def _chol_solve(L: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return _lower_solve(L, _lower_solve(L, rhs), transpose=True)


def _gram_nnls(
    col: Callable[[int], np.ndarray], g: np.ndarray, max_iter: int
) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """Lawson–Hanson NNLS in Gram form: ``min_{u ≥ 0} ½uᵀHu − gᵀu`` with ``H = EᵀE`` and ``g ∈ range(Eᵀ)``.

    ``col(t)`` returns column ``t`` of ``H``. The passive set is kept with an incrementally grown Cholesky
    factor of ``H_PP`` (refactorised only when a variable leaves). Returns ``(u, H[:, P], P)`` or ``None`` if
    ``max_iter`` outer iterations did not reach optimality.
    """
    m = g.shape[0]
    u = np.zeros(m)
    cap = min(m, 32)
    rows = np.empty((cap, m))  # rows[i] = H[:, P[i]] (row-major: cheap appends and u_P @ rows)
    L = np.zeros((cap, cap))
    P: list[int] = []
    in_p = np.zeros(m, dtype=bool)
    blocked = np.zeros(m, dtype=bool)
    w = g.copy()
    wtol = 1e3 * _EPS * max(m, 10) * max(1.0, float(np.max(np.abs(g))))
    for _ in range(max_iter):
        cand = np.where(in_p | blocked, -np.inf, w)
        t = int(np.argmax(cand))
        if not cand[t] > wtol:
            return u, rows[: len(P)].T, P
        h = col(t)
        p = len(P)
        if p == cap:  # grow the column store and the factor
            cap = min(m, 2 * cap)
            rows = np.concatenate([rows, np.empty((cap - p, m))], axis=0)
            L2 = np.zeros((cap, cap))
            L2[:p, :p] = L[:p, :p]
            L = L2
        if p:
            lrow = _lower_solve(L[:p, :p], h[P])
            d2 = h[t] - lrow @ lrow
        else:
            lrow = np.empty(0)
            d2 = h[t]
        if not d2 > 1e-12 * max(h[t], 1e-300):  # numerically dependent on the passive set
            blocked[t] = True
            continue
        L[p, :p] = lrow
        L[p, p] = math.sqrt(d2)
        rows[p] = h
        P.append(t)
        in_p[t] = True
        first = True
        while P:
            p = len(P)
            z = _chol_solve(L[:p, :p], g[P])
            if first and not z[-1] > 0:  # round-off: the entering variable must be positive
                P.pop()
                in_p[t] = False
                blocked[t] = True
                break
            first = False
            if np.all(z > 0):
                u[P] = z
                blocked[:] = False
                break
            uP = u[P]
            neg = z <= 0
            ratios = uP[neg] / (uP[neg] - z[neg])
            alpha = float(np.min(ratios))
            uP = uP + alpha * (z - uP)
            leave = np.zeros(p, dtype=bool)
            leave[np.flatnonzero(neg)[np.argmin(ratios)]] = True
            leave |= uP <= 0
            keep = ~leave
            u[P] = np.where(keep, uP, 0.0)
            idx_keep = np.flatnonzero(keep)
            rows[: idx_keep.size] = rows[idx_keep]
            P = [P[i] for i in idx_keep]
            in_p[:] = False
            in_p[P] = True
            p = len(P)
            if p:
                Hpp = rows[:p, P]
                try:
                    L[:p, :p] = np.linalg.cholesky(0.5 * (Hpp + Hpp.T))
                except np.linalg.LinAlgError:
                    return None
        if P:
            w = g - u[P] @ rows[: len(P)]
        else:
            w = g.copy()
    return None


class _Infeasible(Exception):
    def __init__(self, competitors: np.ndarray) -> None:
        super().__init__("infeasible")
        self.competitors = competitors


@dataclass
class _ClassProblem:
    """Normalised data of one target class over its live competitors.

    ``a_j = w_k − w_j`` has norm ``nu_j``; the solver works with unit rows ``â_j = a_j / nu_j`` and right-hand
    side ``g_j = c_j / (nu_j γ)`` with ``γ = max_j c_j / nu_j`` (the largest single-halfspace distance).
    ``Ĝ_k`` comes from the global Gram unless ``explicit`` holds it (classes with near-duplicate rows, where
    ``G_kk − G_kj − G_kl + G_jl`` would cancel): then it is formed from the explicit unit ``rows``.
    """

    k: int
    live: np.ndarray  # competitor class indices with a non-zero row
    nu: np.ndarray
    g: np.ndarray
    gamma: float
    G: np.ndarray  # global Gram W Wᵀ (symmetric)
    rows: np.ndarray | None = None  # explicit unit rows â_j (m × d), set for near-duplicate rows only
    explicit: np.ndarray | None = field(init=False, default=None)
    _gk: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gk = self.G[self.k, self.live]
        self.explicit = None if self.rows is None else self.rows @ self.rows.T

    def gram_column(self, t: int) -> np.ndarray:
        """Column ``t`` of the normalised ``Ĝ_k`` (over live competitors)."""
        if self.explicit is not None:
            return self.explicit[:, t]
        G, k, live = self.G, self.k, self.live
        j = live[t]
        colv = (G[k, k] - G[k, j]) - self._gk + G[j, live]  # row j = column j (G symmetric)
        return colv / (self.nu * self.nu[t])

    def gram(self) -> np.ndarray:
        if self.explicit is not None:
            return self.explicit
        G, k, live = self.G, self.k, self.live
        gk = G[k, live]
        Gk = G[k, k] - gk[:, None] - gk[None, :] + G[np.ix_(live, live)]
        Gk = Gk / np.outer(self.nu, self.nu)
        return 0.5 * (Gk + Gk.T)


def _polish(
    prob: _ClassProblem, support: np.ndarray, Ghat_cols: np.ndarray, lam_hat: np.ndarray
) -> np.ndarray:
    """Re-solve the active set ``Ĝ_PP λ_P = g_P``; keep it when it is no worse than ``lam_hat``."""
    if support.size == 0:
        return lam_hat
    Gpp = Ghat_cols[support]
    try:
        Lp = np.linalg.cholesky(0.5 * (Gpp + Gpp.T))
    except np.linalg.LinAlgError:
        return lam_hat
    if np.min(np.diag(Lp)) ** 2 < 1e-10 * np.max(np.diag(Gpp)):
        return lam_hat
    lp = _chol_solve(Lp, prob.g[support])
    if np.any(lp < 0):
        return lam_hat

    def violation(lam_s: np.ndarray) -> float:
        slack = Ghat_cols @ lam_s - prob.g
        return max(
            float(np.max(-slack, initial=0.0)), float(np.max(np.abs(lam_s * slack[support]), initial=0.0))
        )

    return lp if violation(lp) <= violation(lam_hat[support]) * (1 + 1e-12) + 1e-15 else lam_hat


def _single_constraint(prob: _ClassProblem) -> np.ndarray | None:
    """``λ̂`` when the most violated halfspace alone is active, else None.

    With unit rows, ``s = γ â_t`` (``t = argmax g``, ``g_t = 1``) is the projection onto that halfspace; it is the
    optimum exactly when it satisfies every other constraint, ``â_jᵀ â_t ≥ g_j`` (then λ̂ = e_t meets all KKT
    conditions). The driver's KKT check still verifies it. Most pairwise QPs (one source class against one target)
    end here, at the cost of one Gram column instead of an active-set run.
    """
    g = prob.g
    t = int(np.argmax(g))
    col = prob.gram_column(t)
    if not col[t] > 0.5 or np.any(col / col[t] < g - 1e-12 * max(1.0, float(np.max(np.abs(g))))):
        return None
    lam_hat = np.zeros(g.size)
    lam_hat[t] = g[t] / col[t]
    return lam_hat


def _solve_active_set(prob: _ClassProblem) -> np.ndarray:
    """Normalised dual ``λ̂`` (live competitors) by Lawson–Hanson least-distance programming, after the
    one-constraint shortcut (:func:`_single_constraint`)."""
    single = _single_constraint(prob)
    if single is not None:
        return single
    m = prob.g.size
    g = prob.g

    def col(t: int) -> np.ndarray:
        return prob.gram_column(t) + g * g[t]

    out = _gram_nnls(col, g, max_iter=5 * m + 50)
    if out is None:
        raise RuntimeError("active set did not converge")
    u, Hcols, P = out
    rho = 1.0 - float(g @ u)  # = ‖E u − e‖², zero iff infeasible
    if rho <= 1e-12:
        raise _Infeasible(prob.live[np.flatnonzero(u > 0)])
    lam_hat = u / rho
    if not P:
        return lam_hat
    support = np.asarray(P)
    Ghat_cols = Hcols - np.outer(g, g[support])  # Ĝ[:, P] = H[:, P] − g g_Pᵀ
    lp = _polish(prob, support, Ghat_cols, lam_hat)
    if lp is not lam_hat:
        lam_hat = np.zeros(m)
        lam_hat[support] = lp
    return lam_hat


def _pseudo_factor(W: np.ndarray) -> np.ndarray:
    """``B`` (``C × min(C, d)``) with ``B Bᵀ = W Wᵀ``: the triangular factor of ``Wᵀ = Q R``, ``B = Rᵀ``.

    Rows of ``B`` are the weight rows in an orthonormal basis of their span, so ``B_k − B_j`` has the geometry
    of ``w_k − w_j`` at no more than ``C`` coordinates.
    """
    return np.linalg.qr(W.T, mode="r").T


def _solve_nnls(prob: _ClassProblem, factor: Callable[[], np.ndarray]) -> np.ndarray:
    """Normalised dual ``λ̂`` by the reference path: Cholesky + scipy NNLS, or LDP on a pseudo-factor."""
    Gk = prob.gram()
    g = prob.g
    m = g.size
    try:
        L = np.linalg.cholesky(Gk)
        well_posed = np.min(np.diag(L)) ** 2 > 1e-10 * np.max(np.diag(Gk))
    except np.linalg.LinAlgError:
        well_posed = False
    if well_posed:
        y = sla.solve_triangular(L, g, lower=True, check_finite=False)
        lam, _ = nnls(L.T, y, maxiter=10 * m + 50)
        return lam
    if prob.rows is not None:
        A = prob.rows
    else:
        B = factor()
        A = (B[prob.k] - B[prob.live]) / prob.nu[:, None]  # unit rows in r coordinates
    E = np.vstack([A.T, g[None, :]])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=10 * m + 50)
    rho = 1.0 - float(g @ u)
    if rho <= 1e-12:
        raise _Infeasible(prob.live[u > 0])
    return u / rho


# ----------------------------------------------------------------------------------------------------------
# One target class: method choice, fallback and errors
# ----------------------------------------------------------------------------------------------------------


def _fmt(classes: Sequence[int] | np.ndarray, limit: int = 8) -> str:
    items = [str(int(c)) for c in classes]
    if len(items) > limit:
        items = items[:limit] + [f"... ({len(items)} in all)"]
    return "[" + ", ".join(items) + "]"


def _dual(prob: _ClassProblem, method: str, factor: Callable[[], np.ndarray]) -> np.ndarray:
    """Unnormalised ``λ`` of the live competitors of ``prob.k``."""
    k = prob.k
    try:
        if method == "active-set":
            try:
                lam_hat = _solve_active_set(prob)
            except (RuntimeError, np.linalg.LinAlgError):
                lam_hat = _solve_nnls(prob, factor)
        else:
            lam_hat = _solve_nnls(prob, factor)
    except _Infeasible as exc:
        raise SolverError(
            f"no latent perturbation makes class {k} win over class(es) {_fmt(exc.competitors)} for the given "
            f"samples (class {k}'s weight row lies in their convex hull); drop class {k} from `classes`"
        ) from None
    except RuntimeError as exc:  # scipy nnls iteration limit
        raise SolverError(
            f"the dual NNLS of target class {k} did not converge ({exc}); check the head for near-duplicate rows"
        ) from None
    return prob.gamma * lam_hat / prob.nu
