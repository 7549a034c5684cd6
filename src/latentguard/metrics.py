"""Evaluation metrics as pure functions (defined once, used everywhere).

Conventions (BackdoorBench):
- ACC: accuracy on the clean test set.
- ASR: on triggered test images whose true label is *not* the target, the fraction predicted as the attack's
  target (all-to-one) or the mapped label (all-to-all, y -> y+1 mod C).
- RA (robust accuracy): on the same triggered images, the fraction predicted as their *true* label.
- DER (defense effectiveness rating) = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with Δ = before − after.
- TPR / FPR / AUROC for detectors that score inputs or models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from latentguard.errors import LatentGuardError

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _np(a: ArrayLike, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    out = np.asarray(a)
    if out.ndim != 1:
        raise LatentGuardError(f"{name} must be one-dimensional, got shape {out.shape}")
    return out


def _pair(pred: ArrayLike, ref: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    p, r = _np(pred, names[0]), _np(ref, names[1])
    if p.shape != r.shape:
        raise LatentGuardError(f"{names[0]} and {names[1]} differ in length: {p.shape[0]} vs {r.shape[0]}")
    if p.size == 0:
        raise LatentGuardError(f"{names[0]} is empty: a metric needs at least one sample")
    return p, r


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to labels (ACC on clean data)."""
    p, y = _pair(predictions, labels, ("predictions", "labels"))
    return float(np.mean(p == y))


def per_class_accuracy(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> list[float | None]:
    """ACC of each class k over the images labelled k (None for a class with no image): where a defense's cost
    in clean accuracy falls, e.g. on the target class it unlearned."""
    p, y = _pair(predictions, labels, ("predictions", "labels"))
    y = y.astype(np.int64)
    if num_classes < 1 or y.min() < 0 or y.max() >= num_classes:
        raise LatentGuardError(f"labels must be class indices in [0, {num_classes}); got {y.min()}..{y.max()}")
    hits = np.bincount(y, weights=(p == y).astype(float), minlength=num_classes)
    counts = np.bincount(y, minlength=num_classes)
    return [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]


def attack_success_rate(predictions: ArrayLike, attack_labels: ArrayLike) -> float:
    """ASR: fraction of triggered non-target images predicted as the attack's label for them.

    ``attack_labels`` is the target class (all-to-one) or the mapped label (all-to-all) per image; the caller
    has already removed images whose true label equals their attack label.
    """
    p, t = _pair(predictions, attack_labels, ("predictions", "attack_labels"))
    return float(np.mean(p == t))


def robust_accuracy(predictions: ArrayLike, true_labels: ArrayLike) -> float:
    """RA: fraction of triggered images still classified as their true label."""
    return accuracy(predictions, true_labels)


def defense_effectiveness_rating(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with Δ = before − after (rates in [0, 1])."""
    for name, v in (("acc_before", acc_before), ("asr_before", asr_before), ("acc_after", acc_after),
                    ("asr_after", asr_after)):
        if not 0.0 <= v <= 1.0:
            raise LatentGuardError(f"{name} must be a rate in [0, 1], got {v}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def true_positive_rate(flags: ArrayLike, is_positive: ArrayLike) -> float:
    """TPR = TP / P; NaN when there are no positives."""
    f, y = _pair(flags, is_positive, ("flags", "is_positive"))
    f, y = f.astype(bool), y.astype(bool)
    return float(np.mean(f[y])) if y.any() else float("nan")


def false_positive_rate(flags: ArrayLike, is_positive: ArrayLike) -> float:
    """FPR = FP / N; NaN when there are no negatives."""
    f, y = _pair(flags, is_positive, ("flags", "is_positive"))
    f, y = f.astype(bool), y.astype(bool)
    return float(np.mean(f[~y])) if (~y).any() else float("nan")


def auroc(scores: ArrayLike, is_positive: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted one half.

    Computed exactly from ranks (Mann–Whitney U), so no threshold is chosen. Higher score = more suspicious.
    """
    s, y = _pair(scores, is_positive, ("scores", "is_positive"))
    s, y = s.astype(np.float64), y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise LatentGuardError("scores contain NaN or Inf: clean the detector output first")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise LatentGuardError("AUROC needs both positive and negative samples")
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks handle ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
