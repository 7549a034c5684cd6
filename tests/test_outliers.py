"""Tests of the MAD anomaly index (latentguard.latent.outliers)."""

import math

import numpy as np
import pytest
import torch

from latentguard.errors import LatentGuardError
from latentguard.latent import anomaly_index, flag_low_outliers


def test_hand_computed_index():
    v = [1.0, 2.0, 3.0, 4.0, 100.0]
    # median 3, |dev| = 2, 1, 0, 1, 97 -> MAD 1; index = (3 - v) / 1.4826
    expected = np.array([2.0, 1.0, 0.0, -1.0, -97.0]) / 1.4826
    np.testing.assert_allclose(anomaly_index(v), expected)
    np.testing.assert_allclose(anomaly_index(v, consistency=1.0), [2.0, 1.0, 0.0, -1.0, -97.0])


def test_sign_flags_only_small_values():
    v = np.array([10.0, 10.5, 9.5, 10.2, 9.8, 1.0, 30.0])
    idx = anomaly_index(v)
    assert idx[5] > 2 and idx[6] < -2
    np.testing.assert_array_equal(flag_low_outliers(v), [5])


def test_multi_target_flags_all():
    v = np.array([10.0, 10.4, 9.6, 10.1, 9.9, 10.3, 9.7, 1.0, 1.5])
    np.testing.assert_array_equal(flag_low_outliers(v), [7, 8])
    assert flag_low_outliers(v, threshold=1e9).size == 0


def test_log_values():
    v = np.array([1.0, 10.0, 100.0, 1000.0, 10000.0])
    # log10 steps are equal: median log(100), MAD = log(10)
    expected = np.array([2.0, 1.0, 0.0, -1.0, -2.0]) / 1.4826
    np.testing.assert_allclose(anomaly_index(v, log=True), expected)
    with pytest.raises(LatentGuardError, match="strictly positive"):
        anomaly_index([0.0, 1.0, 2.0], log=True)


def test_zero_mad_has_no_division_by_zero():
    v = np.array([2.0, 2.0, 2.0, 1.0, 3.0])
    with np.errstate(all="raise"):
        idx = anomaly_index(v)
    np.testing.assert_array_equal(idx, [0.0, 0.0, 0.0, math.inf, -math.inf])
    np.testing.assert_array_equal(flag_low_outliers(v), [3])
    np.testing.assert_array_equal(anomaly_index([5.0, 5.0, 5.0]), [0.0, 0.0, 0.0])


def test_min_mad_floors_a_tight_cluster_and_leaves_a_wide_one():
    # nine values within 1 % of each other and one 16 % below: the plain MAD makes the gap extreme
    v = np.log([16.2, 19.0, 19.1, 19.2, 19.3, 19.3, 19.4, 19.5, 19.6, 19.7])
    plain = anomaly_index(v)
    floored = anomaly_index(v, min_mad=0.03)
    med = np.median(v)
    assert plain[0] > 10
    assert floored[0] == pytest.approx((med - v[0]) / (1.4826 * 0.03))
    assert floored[0] < 4
    # a spread wider than the floor is unchanged
    wide = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_array_equal(anomaly_index(wide, min_mad=0.5), anomaly_index(wide))
    # a zero MAD with a floor has a finite scale
    np.testing.assert_allclose(anomaly_index([2.0, 2.0, 2.0, 1.0, 3.0], min_mad=0.5),
                               np.array([0.0, 0.0, 0.0, 1.0, -1.0]) / (1.4826 * 0.5))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_min_mad(bad):
    with pytest.raises(LatentGuardError, match="min_mad must be a number >= 0"):
        anomaly_index([1.0, 2.0, 3.0], min_mad=bad)


def test_even_count_and_torch_input():
    v = torch.tensor([1.0, 2.0, 4.0, 8.0])
    # median 3, |dev| = 2, 1, 1, 5 -> MAD 1.5
    np.testing.assert_allclose(anomaly_index(v), np.array([2.0, 1.0, -1.0, -5.0]) / (1.5 * 1.4826))


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [1.0, float("nan")], [1.0, float("inf")], "abc"])
def test_bad_values(bad):
    with pytest.raises(LatentGuardError):
        anomaly_index(bad)


def test_bad_parameters():
    with pytest.raises(LatentGuardError):
        anomaly_index([1.0, 2.0], consistency=0.0)
    with pytest.raises(LatentGuardError):
        flag_low_outliers([1.0, 2.0], threshold=float("nan"))
