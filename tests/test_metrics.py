import math

import numpy as np
import pytest
import torch

from latentguard import metrics
from latentguard.errors import LatentGuardError


def test_accuracy_hand_computed():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert metrics.accuracy(torch.tensor([1, 1]), torch.tensor([1, 1])) == 1.0


def test_asr_and_ra_on_same_triggered_set():
    true = np.array([1, 2, 3, 4])
    pred = np.array([0, 0, 3, 0])  # target 0: three of four flipped, one kept its label
    assert metrics.attack_success_rate(pred, np.zeros(4, dtype=int)) == 0.75
    assert metrics.robust_accuracy(pred, true) == 0.25


def test_der_examples():
    # perfect removal without accuracy loss
    assert metrics.defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    # nothing changes
    assert metrics.defense_effectiveness_rating(0.9, 1.0, 0.9, 1.0) == 0.5
    # ASR 0.95 -> 0.05 (Δ 0.9), ACC 0.91 -> 0.81 (Δ 0.1): (0.9 - 0.1 + 1) / 2 = 0.9
    assert math.isclose(metrics.defense_effectiveness_rating(0.91, 0.95, 0.81, 0.05), 0.9)
    # accuracy gain and ASR increase are clipped at zero
    assert metrics.defense_effectiveness_rating(0.8, 0.5, 0.9, 0.7) == 0.5


def test_der_rejects_percentages():
    with pytest.raises(LatentGuardError):
        metrics.defense_effectiveness_rating(91.0, 95.0, 90.0, 1.0)


def test_tpr_fpr():
    flags = [1, 0, 1, 1, 0]
    positive = [1, 1, 0, 0, 0]
    assert metrics.true_positive_rate(flags, positive) == 0.5
    assert math.isclose(metrics.false_positive_rate(flags, positive), 2 / 3)
    assert math.isnan(metrics.true_positive_rate([0, 1], [0, 0]))


def test_auroc_hand_computed_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1 -> pairs: (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1) = 3.5/4
    assert metrics.auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert metrics.auroc([0.0, 1.0], [1, 0]) == 0.0


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    assert metrics.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_metric_input_errors():
    with pytest.raises(LatentGuardError, match="differ in length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(LatentGuardError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(LatentGuardError, match="both positive and negative"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(LatentGuardError, match="NaN"):
        metrics.auroc([float("nan"), 0.2], [1, 0])


def test_per_class_accuracy_hand_computed_and_consistent_with_accuracy():
    y = np.array([0, 0, 1, 1, 1, 3])
    p = np.array([0, 1, 1, 1, 0, 3])
    per = metrics.per_class_accuracy(p, y, 4)
    assert per == [0.5, pytest.approx(2 / 3), None, 1.0]
    counts = np.bincount(y, minlength=4)
    weighted = sum(a * c for a, c in zip(per, counts, strict=True) if a is not None) / len(y)
    assert weighted == pytest.approx(metrics.accuracy(p, y))


def test_per_class_accuracy_rejects_labels_outside_the_classes():
    with pytest.raises(LatentGuardError, match=r"\[0, 2\)"):
        metrics.per_class_accuracy([0, 1], [0, 2], 2)
