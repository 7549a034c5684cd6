"""Robust outlier statistics for per-class scores (MAD anomaly index, as in Neural Cleanse).

Neural Cleanse (Wang et al., 2019) flags a class as a backdoor target when its reverse-engineered trigger is
abnormally *small*: the anomaly index of a value ``v`` is ``|v − median| / (1.4826 · MAD)`` with
``MAD = median(|v − median|)`` (1.4826 makes the MAD a consistent estimate of the standard deviation for
normal data), and an index above 2 marks an outlier. Here the index is *signed* so that values below the
median are positive; that way only small norms (backdoor targets) exceed a positive threshold.

The MAD of a handful of values (one per class) rests on the two middle deviations: when most classes agree closely
by chance it becomes tiny and turns a modest gap into an extreme index. ``min_mad`` floors it, so a value must lie
at least ``threshold · consistency · min_mad`` below the median to be flagged, however tight the others are.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from latentguard.errors import LatentGuardError

__all__ = ["anomaly_index", "flag_low_outliers"]


def _values(values: Any, log: bool) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().to("cpu").double().numpy()
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LatentGuardError("values must be a 1-D array of numbers: pass one score per class") from exc
    if v.ndim != 1 or v.size == 0:
        raise LatentGuardError(
            f"values must be a non-empty 1-D array (one score per class), got shape {v.shape}"
        )
    if not np.all(np.isfinite(v)):
        raise LatentGuardError("values contain NaN or infinite entries: drop or fix those classes first")
    if log:
        if np.any(v <= 0):
            raise LatentGuardError(
                f"log=True needs strictly positive values, got minimum {v.min():g}: use log=False"
            )
        v = np.log(v)
    return v


def anomaly_index(values: Any, *, log: bool = False, consistency: float = 1.4826, min_mad: float = 0.0) -> np.ndarray:
    """Signed MAD anomaly index: ``(median(v) − v) / (consistency · max(MAD(v), min_mad))``, positive below the median.

    Args:
        values: ``(C,)`` one score per class (e.g. the flip norms ``‖s_k‖``); numpy array or torch tensor.
        log: compute the index on ``log(values)`` (values must then be positive); useful when the scores
            spread over orders of magnitude.
        consistency: the MAD scale factor (1.4826 for normally distributed scores).
        min_mad: floor on the MAD, in the units of the (log-)values (0: none, the textbook index). On the log
            scale it is a relative spread: 0.03 says classes that differ by less than about 3 % are alike.

    Returns:
        ``(C,)`` float array. When the (floored) ``MAD = 0`` (at least half of the values equal the median) no scale
        exists: values equal to the median get ``0`` and the others ``+inf`` (below the median) or ``−inf``
        (above), so any positive threshold flags exactly the values below the median.
    """
    if not (isinstance(consistency, int | float) and math.isfinite(consistency) and consistency > 0):
        raise LatentGuardError(f"consistency must be a positive number, got {consistency!r}")
    if isinstance(min_mad, bool) or not (isinstance(min_mad, int | float) and math.isfinite(min_mad) and min_mad >= 0):
        raise LatentGuardError(f"min_mad must be a number >= 0 (0: no floor), got {min_mad!r}")
    v = _values(values, log)
    med = float(np.median(v))
    dev = med - v
    mad = max(float(np.median(np.abs(dev))), float(min_mad))
    if mad > 0:
        return dev / (consistency * mad)
    return np.where(dev > 0, np.inf, np.where(dev < 0, -np.inf, 0.0))


def flag_low_outliers(values: Any, threshold: float = 2.0, *, log: bool = False) -> np.ndarray:
    """Indices (ascending) of all classes whose signed anomaly index exceeds ``threshold``.

    Every class past the threshold is returned, so several backdoor targets (multi-target attacks) are all
    flagged. The default ``threshold=2.0`` is Neural Cleanse's.
    """
    if not (isinstance(threshold, int | float) and not math.isnan(threshold)):
        raise LatentGuardError(f"threshold must be a number, got {threshold!r}")
    return np.flatnonzero(anomaly_index(values, log=log) > threshold)
