"""Many small flip-QP duals at once: a Lawson–Hanson active set run on a whole stack of problems.

The pairwise statistic solves ``C (C − 1)`` QPs (1,806 on GTSRB), each a dual
``min_{λ ≥ 0} ½ λᵀ Ĝ_k λ − ĝᵀ λ`` over ``C − 1`` competitors. One at a time, Python overhead dominates (a
quarter of a millisecond each); here every problem takes its Lawson–Hanson steps in the same numpy operations,
with the passive sets gathered into small padded matrices and factorised together.

The answer is the same one the one-at-a-time solver gives: each accepted ``λ`` solves its passive set's
equality system ``Ĝ_PP λ_P = ĝ_P`` exactly, with ``λ_P > 0`` and no positive gradient outside ``P``. Problems
the batch cannot finish cleanly (a passive set that is numerically singular, an entering variable that comes
out non-positive, the iteration limit) are returned with ``ok`` False for the caller's exact one-at-a-time
path, and every solution is KKT-checked by the caller as before.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batched_dual"]

_EPS = float(np.finfo(np.float64).eps)
# problems per chunk × m²: bounds the gathered Gram columns (B × m × p, p ≤ m) to 32 MB of float64
_CHUNK_ENTRIES = 4_000_000


def _padded_passive(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's passive indices, left-aligned and padded to the largest set: ``(B, p_max)`` and its mask."""
    sizes = P.sum(axis=1)
    width = int(sizes.max(initial=0))
    index = np.argsort(~P, axis=1, kind="stable")[:, :width]
    valid = np.arange(width)[None, :] < sizes[:, None]
    return index, valid


def batched_cholesky_solve(A: np.ndarray, rhs: np.ndarray, rel: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``A_b x_b = rhs_b`` for a stack of symmetric positive definite ``A`` (``(B, p, p)``, ``(B, p)``).

    Returns ``x`` and ``ok``: False where a pivot is not clearly positive (``≤ rel·A_jj``), i.e. ``A_b`` is
    singular to working precision; ``x_b`` is then meaningless.
    """
    B, p, _ = A.shape
    L = np.zeros_like(A)
    ok = np.ones(B, dtype=bool)
    for j in range(p):
        pivot = A[:, j, j] - np.einsum("bi,bi->b", L[:, j, :j], L[:, j, :j])
        ok &= pivot > rel * np.abs(A[:, j, j]) + 1e-300
        root = np.sqrt(np.where(ok, pivot, 1.0))
        L[:, j, j] = root
        if j + 1 < p:
            below = A[:, j + 1 :, j] - np.einsum("bri,bi->br", L[:, j + 1 :, :j], L[:, j, :j])
            L[:, j + 1 :, j] = below / root[:, None]
    y = np.zeros_like(rhs)
    for j in range(p):
        y[:, j] = (rhs[:, j] - np.einsum("bi,bi->b", L[:, j, :j], y[:, :j])) / L[:, j, j]
    x = np.zeros_like(rhs)
    for j in range(p - 1, -1, -1):
        x[:, j] = (y[:, j] - np.einsum("bi,bi->b", L[:, j + 1 :, j], x[:, j + 1 :])) / L[:, j, j]
    return x, ok


def batched_dual(grams: np.ndarray, which: np.ndarray, g: np.ndarray,
                 max_outer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``λ_b ≥ 0`` minimising ``½ λᵀ grams[which[b]] λ − g_bᵀ λ`` for every row ``b`` of ``g`` (``(B, m)``).

    ``grams`` is a stack of symmetric positive semidefinite ``(m, m)`` matrices shared by many problems (the
    normalised Gram ``Ĝ_k`` of target ``k`` serves every source class). Returns ``λ`` ``(B, m)`` and ``ok``
    ``(B,)``: False where this solver handed the problem back (see the module docstring).
    """
    B, m = g.shape
    lam = np.zeros((B, m))
    ok = np.ones(B, dtype=bool)
    chunk = max(1, _CHUNK_ENTRIES // max(1, m * m))
    for start in range(0, B, chunk):
        part = slice(start, min(B, start + chunk))
        lam[part], ok[part] = _lawson_hanson(grams, which[part], g[part], max_outer or 3 * m + 20)
    return lam, ok


def _lawson_hanson(grams: np.ndarray, which: np.ndarray, g: np.ndarray,
                   max_outer: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batched_dual` on one chunk: Lawson–Hanson, each row at its own step, all rows in one array.

    Only the passive columns of each row's Gram are gathered (``(B, m, p)`` and ``(B, p, p)``), never the
    whole ``(B, m, m)`` stack."""
    B, m = g.shape
    lam = np.zeros((B, m))
    P = np.zeros((B, m), dtype=bool)
    ok = np.ones(B, dtype=bool)
    running = np.ones(B, dtype=bool)
    wtol = 1e3 * _EPS * max(m, 10) * np.maximum(1.0, np.abs(g).max(axis=1, initial=0.0))
    all_rows = np.arange(m)[None, :, None]
    for _ in range(max_outer):
        rows = np.flatnonzero(running)
        if rows.size == 0:
            break
        index, valid = _padded_passive(P[rows])
        cols = grams[which[rows][:, None, None], all_rows, index[:, None, :]]  # (R, m, p): Ĝ[:, P]
        lam_p = np.where(valid, np.take_along_axis(lam[rows], index, axis=1), 0.0)
        gradient = g[rows] - np.einsum("bip,bp->bi", cols, lam_p)
        candidate = np.where(P[rows], -np.inf, gradient)
        entering = np.argmax(candidate, axis=1)
        optimal = ~(candidate[np.arange(rows.size), entering] > wtol[rows])
        running[rows[optimal]] = False
        rows, entering = rows[~optimal], entering[~optimal]
        P[rows, entering] = True
        first = True
        for _inner in range(m + 5):  # each pass either accepts a row's step or drops a variable from its set
            if rows.size == 0:
                break
            index, valid = _padded_passive(P[rows])
            Hpp = grams[which[rows][:, None, None], index[:, :, None], index[:, None, :]]
            Hpp = np.where(valid[:, :, None] & valid[:, None, :], Hpp, np.eye(index.shape[1])[None])
            zp, good = batched_cholesky_solve(Hpp, np.where(valid, np.take_along_axis(g[rows], index, axis=1), 0.0))
            z = np.zeros((rows.size, m))
            r_of = np.broadcast_to(np.arange(rows.size)[:, None], index.shape)
            z[r_of[valid], index[valid]] = zp[valid]
            if first:  # the entering variable must come out positive; if not (round-off), hand the row back
                good &= z[np.arange(rows.size), entering] > 0
                first = False
            ok[rows[~good]] = False
            running[rows[~good]] = False
            passive = P[rows]
            accept = good & np.all(np.where(passive, z > 0, True), axis=1)
            lam[rows[accept]] = z[accept]
            step = good & ~accept  # some passive variable went non-positive: move to the boundary, drop it
            sr, zs, ps = rows[step], z[step], passive[step]
            ls = lam[sr]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ps & (zs <= 0), ls / (ls - zs), np.inf)
            first_out = np.argmin(ratio, axis=1)
            alpha = ratio[np.arange(sr.size), first_out][:, None]
            moved = ls + alpha * (zs - ls)
            leave = (moved <= 0) | ~ps
            leave[np.arange(sr.size), first_out] = True
            lam[sr] = np.where(leave, 0.0, moved)
            P[sr] = ps & ~leave
            rows = sr
            entering = entering[step]
        else:
            ok[rows] = False
            running[rows] = False
    ok &= ~running  # rows still running hit the iteration limit
    return lam, ok
