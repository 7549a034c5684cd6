"""TAC's detection statistics: the paper's per-class ‖s_k‖ and the pairwise geometric mean (pure functions)."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from latentguard.defenses import make_defense
from latentguard.defenses.tac import (
    PAIRWISE_MAX_CLASSES,
    latent_report,
    pairwise_statistic,
    resolve_statistic,
)
from latentguard.errors import SpecError
from latentguard.latent.qp import minimal_flip_perturbations, pairwise_flip_perturbations


def _head(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


def _shortcut_problem(seed: int = 0, *, outlier: bool = True):
    """C = 8 classes in d = 16 with an orthonormal head: class-a latents sit at m·e_a, so moving source a into k
    costs about (m + b_a − b_k)/√2. Class 2 gets a shortcut (bias m/2, as a backdoor's head may): every source
    reaches it at half the cost. With ``outlier``, one class-5 sample sits at 8m·e_5: the hardest sample to move
    into *any* class, it sets every ‖s_k‖ (k ≠ 5) to about the same size."""
    rng = np.random.default_rng(seed)
    C, d, n, m = 8, 16, 40, 4.0
    W = np.eye(C, d)
    b = np.zeros(C)
    b[2] = m / 2
    y = np.repeat(np.arange(C), n)
    z = m * W[y] + 0.2 * rng.normal(size=(C * n, d))
    if outlier:
        z[np.flatnonzero(y == 5)[0]] = 8 * m * W[5]
    return z, y, W, b


def test_pairwise_statistic_is_the_geometric_mean_over_sources():
    z, y, W, b = _shortcut_problem(outlier=False)
    values, norms = pairwise_statistic(z, y, W, b)
    ref = pairwise_flip_perturbations(z, y, W, b).norms
    np.testing.assert_allclose(norms, ref, equal_nan=True)
    for k in range(W.shape[0]):
        col = np.delete(ref[:, k], k)
        assert values[k] == pytest.approx(float(np.exp(np.log(col).mean())), rel=1e-12)
    assert np.isnan(np.diag(norms)).all()


def test_pairwise_statistic_skips_sources_without_samples():
    z, y, W, b = _shortcut_problem(outlier=False)
    keep = y != 4
    values, norms = pairwise_statistic(z[keep], y[keep], W, b)
    assert np.isnan(norms[4]).all() and np.isfinite(values).all()
    col = np.delete(norms[:, 0], [0, 4])
    assert values[0] == pytest.approx(float(np.exp(np.log(col).mean())))


def test_one_hard_sample_sets_every_class_norm_but_only_its_own_row_of_pairwise_norms():
    z0, y, W, b = _shortcut_problem(outlier=False)
    z1, _, _, _ = _shortcut_problem(outlier=True)
    head = _head(W, b)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    for z in (z0, z1):  # with or without the hard sample, the shortcut is the pairwise mean's top outlier
        report = latent_report(t(z), head, labels=y, statistic="pairwise")
        assert report.extra["statistic"] == "pairwise" and 2 in report.target_classes
        assert int(np.argmax(report.scores)) == 2
        assert report.extra["sources_per_class"] == [7] * 8
    clean_class = latent_report(t(z0), head, statistic="class")
    assert clean_class.target_classes == [2]  # the paper's norm sees it too without the hard sample
    hard_class = latent_report(t(z1), head, statistic="class")
    grown = np.asarray(hard_class.norms) / np.asarray(clean_class.norms)
    assert (np.delete(grown, 5) > 4).all()  # one sample sets ‖s_k‖ of every class it does not belong to
    _, n0 = pairwise_statistic(z0, y, W, b)
    _, n1 = pairwise_statistic(z1, y, W, b)
    rows = np.arange(8) != 5
    np.testing.assert_allclose(n1[rows], n0[rows], rtol=1e-9, equal_nan=True)  # other sources are untouched
    assert (np.delete(n1[5] / n0[5], 5) > 4).all()
    # both reports carry the paper's per-class norms; the pairwise one scores its own statistic
    pair = latent_report(t(z1), head, labels=y, statistic="pairwise")
    assert pair.extra["class_norms"] == hard_class.norms == hard_class.extra["class_norms"]
    assert pair.norms != pair.extra["class_norms"]


def test_class_statistic_matches_the_qp_norms():
    z, y, W, b = _shortcut_problem()
    report = latent_report(torch.as_tensor(z, dtype=torch.float32), _head(W, b), labels=y, statistic="class")
    ref = minimal_flip_perturbations(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(W, dtype=torch.float32),
                                     torch.as_tensor(b, dtype=torch.float32)).norms
    np.testing.assert_allclose(report.norms, ref, rtol=1e-6)


def test_both_falls_back_to_the_class_norm_without_labels_or_with_many_classes():
    assert resolve_statistic("both", 10, True) == "both"
    assert resolve_statistic("both", PAIRWISE_MAX_CLASSES, True) == "both"
    assert resolve_statistic("both", PAIRWISE_MAX_CLASSES + 1, True) == "class"
    assert resolve_statistic("both", 10, False) == "class"
    assert resolve_statistic("class", 10, True) == "class"
    assert resolve_statistic("pairwise", 1000, True) == "pairwise"


def test_both_flags_the_pairwise_outliers_and_the_class_outliers_beyond_the_margin():
    z, y, W, b = _shortcut_problem(outlier=True)
    zt = torch.as_tensor(z, dtype=torch.float32)
    head = _head(W, b)
    both = latent_report(zt, head, labels=y)
    by_class = latent_report(zt, head, labels=y, statistic="class")
    pairwise = latent_report(zt, head, labels=y, statistic="pairwise")
    assert both.extra["statistic"] == "both" and both.norms == by_class.norms
    flagged = set(pairwise.target_classes) | {k for k, v in enumerate(by_class.scores) if v - 1.0 > both.threshold}
    assert both.target_classes == sorted(flagged)
    no_margin = latent_report(zt, head, labels=y, class_margin=0.0)
    assert no_margin.target_classes == sorted(set(by_class.target_classes) | set(pairwise.target_classes))
    assert latent_report(zt, head).extra["statistic"] == "class"  # no labels: the paper's statistic alone


def test_pairwise_without_labels_and_unknown_statistics_are_refused():
    with pytest.raises(SpecError, match="needs the clean samples' labels"):
        resolve_statistic("pairwise", 10, False)
    with pytest.raises(SpecError, match="statistic must be one of both, class, pairwise"):
        resolve_statistic("median", 10, True)
    with pytest.raises(SpecError, match=re.escape("tac: parameter statistic must be one of both, class, pairwise")):
        make_defense("tac", statistic="median")


def _tight_problem(shortcut: float, seed: int = 0):
    """C = 10 classes at m·e_a (orthonormal head) with little noise, so the nine ordinary classes' ‖s_k‖ agree
    to a fraction of a percent; class 0 gets a head-bias shortcut that makes ‖s_0‖ smaller by about
    shortcut / m."""
    rng = np.random.default_rng(seed)
    C, d, n, m = 10, 16, 30, 4.0
    W = np.eye(C, d)
    b = np.zeros(C)
    b[0] = shortcut
    y = np.repeat(np.arange(C), n)
    z = m * W[y] + 0.01 * rng.normal(size=(C * n, d))
    return torch.as_tensor(z, dtype=torch.float32), y, _head(W, b)


def test_the_mad_floor_keeps_a_modest_gap_in_a_tight_cluster_from_being_flagged():
    z, y, head = _tight_problem(shortcut=0.5)  # ‖s_0‖ about 14 % below the others
    plain = latent_report(z, head, labels=y, statistic="class", mad_floor=0.0)
    floored = latent_report(z, head, labels=y, statistic="class")  # the default floor
    norms = np.log(plain.norms)
    mad = float(np.median(np.abs(norms - np.median(norms))))
    assert mad < 0.01 and 0.1 < np.median(norms) - norms[0] < 0.17
    assert plain.target_classes == [0] and plain.scores[0] > 10
    assert floored.target_classes == [] and floored.extra["mad_floor"] == pytest.approx(0.03)
    assert floored.scores[0] == pytest.approx((np.median(norms) - norms[0]) / (1.4826 * 0.03), rel=1e-9)
    # a real shortcut (half the distance) stands out whatever the floor
    z, y, head = _tight_problem(shortcut=2.0)
    assert latent_report(z, head, labels=y, statistic="class").target_classes == [0]


def test_the_mad_floor_is_checked():
    z, y, head = _tight_problem(shortcut=0.6)
    with pytest.raises(SpecError, match=re.escape("tac: mad_floor must be a number >= 0 (0: no floor)")):
        latent_report(z, head, labels=y, mad_floor=-1.0)
