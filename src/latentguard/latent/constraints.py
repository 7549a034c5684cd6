"""The constraint system ``A_k s ≥ c_k`` of the TAC flip QP, built from clean latents and the linear head.

The flip QP of :mod:`latentguard.latent.qp` asks for the smallest ``s_k`` with
``(w_k − w_j)ᵀ(z_i + s) + b_k − b_j ≥ 0`` for every clean latent ``z_i`` and every competitor ``j ≠ k``
(rows ``w_j`` of the head weight ``W``, bias ``b``; ``C`` classes, latent size ``d``). Since ``s`` is shared by
all samples, only the worst sample per competitor matters, which leaves ``C − 1`` constraints
``A_k s ≥ c_k`` with rows ``a_j = w_k − w_j`` and ``c_j = max_i −((w_k − w_j)ᵀ z_i + b_k − b_j)``. This module
owns that reduction, kept apart from the solvers so that the samples enter the problem only here:

* validation of the latents, the head ``(W, b)``, the target classes and the labels (numpy or torch input);
* ``c_k`` for many targets at once from the margins ``M = Z Wᵀ + b`` (``c_j = max_i M_ij − M_ik``), in row
  blocks and, for large problems, in threads over the targets;
* ``c_k`` from the explicit differences ``w_k − w_j`` (:class:`_Samples`), for competitors whose rows nearly
  duplicate ``w_k`` and for the public :func:`constraint_system`.

As in the paper, the constraints cover every clean sample by default, including those already predicted (or
labelled) as ``k``; ``quantile`` (``c_j`` is the ``q``-quantile instead of the maximum over samples) and
``exclude_own_class_labels`` relax that. With ``b = 0`` the constraint reduces to the paper's bias-free form
``(w_k − w_j)ᵀ(z_i + s) ≥ 0``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentguard.errors import LatentGuardError

__all__ = ["constraint_system"]


# ----------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LatentGuardError(f"{name} is not a numeric array: pass a numpy array or torch tensor") from exc
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise LatentGuardError(f"{name} contains NaN or infinite values: clean or drop those entries first")


def _head(weight: Any, bias: Any) -> tuple[np.ndarray, np.ndarray]:
    W = _to_numpy(weight, "weight")
    b = _to_numpy(bias, "bias")
    if W.ndim != 2:
        raise LatentGuardError(f"weight must be a (C, d) matrix, got shape {W.shape}: pass the head's weight")
    C = W.shape[0]
    if C < 2:
        raise LatentGuardError(f"the head has {C} class(es): a flip needs at least 2 classes")
    if W.shape[1] < 1:
        raise LatentGuardError("weight has zero latent dimensions: pass a (C, d) matrix with d >= 1")
    if b.shape != (C,):
        raise LatentGuardError(f"bias must have shape ({C},) to match weight {W.shape}, got {b.shape}")
    _check_finite(W, "weight")
    _check_finite(b, "bias")
    return W, b


def _validate(latents: Any, weight: Any, bias: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    W, b = _head(weight, bias)
    Z = _to_numpy(latents, "latents")
    if Z.ndim != 2 or Z.shape[1] != W.shape[1]:
        raise LatentGuardError(
            f"latents must be an (N, {W.shape[1]}) matrix to match weight {W.shape}, got shape {Z.shape}"
        )
    if Z.shape[0] < 1:
        raise LatentGuardError("latents has no samples: pass at least one clean latent")
    _check_finite(Z, "latents")
    return Z, W, b


def _validate_quantile(quantile: float) -> float:
    try:
        q = float(quantile)
    except (TypeError, ValueError) as exc:
        raise LatentGuardError(f"quantile must be a number in (0, 1], got {quantile!r}") from exc
    if not (0.0 < q <= 1.0):
        raise LatentGuardError(f"quantile must be in (0, 1], got {quantile!r}: use 1.0 to flip every sample")
    return q


def _validate_classes(classes: Iterable[int] | None, C: int) -> np.ndarray:
    if classes is None:
        return np.arange(C)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(classes, torch.Tensor):
        classes = classes.detach().to("cpu").numpy()
    if isinstance(classes, int | np.integer):
        raise LatentGuardError(
            f"classes must be a list of class indices, got the single index {classes}: pass [{classes}]"
        )
    arr = np.asarray(list(classes) if not isinstance(classes, np.ndarray) else classes)
    if arr.ndim != 1 or arr.size == 0:
        raise LatentGuardError("classes must be a non-empty 1-D list of class indices (or None for all)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LatentGuardError(f"classes must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= C:
        raise LatentGuardError(f"classes must lie in [0, {C - 1}], got {arr.min()}..{arr.max()}")
    if np.unique(arr).size != arr.size:
        raise LatentGuardError("classes contains duplicates: list each target class once")
    return arr.astype(np.intp)


def _validate_labels(labels: Any, N: int, C: int, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(labels, torch.Tensor):
        labels = labels.detach().to("cpu").numpy()
    arr = np.asarray(labels)
    if arr.shape != (N,):
        raise LatentGuardError(f"{name} must have shape ({N},) to match latents, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise LatentGuardError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if N and (arr.min() < 0 or arr.max() >= C):
        raise LatentGuardError(f"{name} must lie in [0, {C - 1}], got {arr.min()}..{arr.max()}")
    return arr.astype(np.intp)


# ----------------------------------------------------------------------------------------------------------
# Right-hand sides c_k (the worst, or q-quantile, violation over samples)
# ----------------------------------------------------------------------------------------------------------


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _rank(q: float, n: int) -> int:
    """0-based rank of the ``q``-quantile among ``n`` sorted values (numpy's ``"higher"`` method)."""
    return min(n - 1, math.ceil(q * (n - 1) - 1e-12))


def _bounds_chunk(
    M: np.ndarray, targets: np.ndarray, q: float, exclude: np.ndarray | None, block: int = 128
) -> np.ndarray:
    """``out[a, j] = q-quantile_i (M_ij − M_ik)`` for ``k = targets[a]`` (``−inf`` where no sample is left)."""
    N, C = M.shape
    out = np.empty((targets.size, C))
    if q >= 1.0:
        tmp = np.empty((min(block, N), C))
        for a, k in enumerate(targets):
            acc = np.full(C, -np.inf)
            for s in range(0, N, block):
                blk = M[s : s + block]
                t = tmp[: blk.shape[0]]
                np.subtract(blk, blk[:, k, None], out=t)
                if exclude is not None:
                    t[exclude[s : s + block] == k] = -np.inf
                np.maximum(acc, t.max(axis=0), out=acc)
            out[a] = acc
        return out
    MT = np.ascontiguousarray(M.T)  # (C, N): partition along contiguous rows
    for a, k in enumerate(targets):
        sub = MT if exclude is None else MT[:, exclude != k]
        n = sub.shape[1]
        if n == 0:
            out[a] = -np.inf
            continue
        h = _rank(q, n)
        out[a] = np.partition(sub - sub[k], h, axis=1)[:, h]
    return out


@dataclass(frozen=True)
class _Samples:
    """The latents that constrain the targets, with the quantile and the optional own-class exclusion."""

    Z: np.ndarray
    q: float
    exclude: np.ndarray | None = None  # labels aligned with Z: samples labelled k skip target k

    def exact_bounds(self, W: np.ndarray, b: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
        """``c_j`` for competitors ``rows`` from the explicit differences ``w_k − w_j`` (no cancellation)."""
        Z = self.Z if self.exclude is None else self.Z[self.exclude != k]
        if Z.shape[0] == 0:
            return np.full(rows.size, -np.inf)
        v = -(Z @ (W[k] - W[rows]).T + (b[k] - b[rows]))
        if self.q >= 1.0:
            return v.max(axis=0)
        h = _rank(self.q, Z.shape[0])
        return np.partition(v, h, axis=0)[h]


def _violation_bounds(M: np.ndarray, targets: np.ndarray, q: float, exclude: np.ndarray | None) -> np.ndarray:
    """Rows ``c`` for each target (``(K, C)``; the entry of the target itself is meaningless)."""
    workers = _workers()
    if workers == 1 or targets.size < 2 * workers or M.size * targets.size < 4_000_000:
        return _bounds_chunk(M, targets, q, exclude)
    parts = np.array_split(targets, workers)
    with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL inside its ufunc loops
        out = list(pool.map(lambda ts: _bounds_chunk(M, ts, q, exclude), parts))
    return np.vstack(out)


def constraint_system(
    latents: Any,
    weight: Any,
    bias: Any,
    k: int,
    *,
    quantile: float = 1.0,
    sample_mask: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the reduced constraint system ``(A_k, c_k)`` of target class ``k``.

    Rows are the competitors ``j ≠ k`` in increasing order: ``A_k[j'] = w_k − w_j`` and
    ``c_k[j'] = Q_q(−((w_k − w_j)ᵀ z_i + b_k − b_j))`` over the samples ``i`` selected by ``sample_mask``
    (all by default), where ``Q_1`` is the maximum (the paper's constraint) and ``Q_q`` for ``q < 1`` is the
    order statistic of rank ``⌈q·(n − 1)⌉`` (numpy's ``"higher"`` quantile), so that each single constraint
    ``j`` holds for at least a fraction ``q`` of the samples.
    """
    Z, W, b = _validate(latents, weight, bias)
    C = W.shape[0]
    q = _validate_quantile(quantile)
    if not (isinstance(k, int | np.integer) and 0 <= int(k) < C):
        raise LatentGuardError(f"k must be a class index in [0, {C - 1}], got {k!r}")
    k = int(k)
    if sample_mask is not None:
        mask = np.asarray(sample_mask)
        if mask.shape != (Z.shape[0],) or mask.dtype != bool:
            raise LatentGuardError(f"sample_mask must be a boolean array of shape ({Z.shape[0]},)")
        Z = Z[mask]
        if Z.shape[0] == 0:
            raise LatentGuardError("sample_mask selects no sample: select at least one latent")
    idx = np.r_[0:k, k + 1 : C]
    return W[k] - W[idx], _Samples(Z, q).exact_bounds(W, b, k, idx)
