"""Helpers of ``benchmarks/studies_digits.py``: the adaptive attacker's bound and the two-target poisoning."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentguard.attacks import make_attack
from latentguard.data import Images
from latentguard.latent.qp import minimal_flip_perturbations

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "studies_digits.py"


@pytest.fixture(scope="module")
def studies():
    spec = importlib.util.spec_from_file_location("studies_digits", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["studies_digits"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("studies_digits", None)


@pytest.mark.parametrize("seed", range(5))
def test_flip_lower_bounds_never_exceed_the_qp_norms(studies, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 12, generator=g, dtype=torch.float64)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    r = studies.flip_lower_bounds(z, w, b)
    s = minimal_flip_perturbations(z, w, b).norms
    assert r.shape == (6,)
    assert np.all(r.numpy() <= s * (1 + 1e-9) + 1e-12)
    # a single competitor (two classes): the bound is the QP itself
    r2 = studies.flip_lower_bounds(z, w[:2], b[:2]).numpy()
    np.testing.assert_allclose(r2, minimal_flip_perturbations(z, w[:2], b[:2]).norms, rtol=1e-9, atol=1e-12)


def test_flip_lower_bounds_are_differentiable(studies):
    z = torch.randn(16, 8)
    w = torch.randn(4, 8, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    studies.detector_penalty(studies.flip_lower_bounds(z, w, b), 0).backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()


def test_detector_penalty_is_a_hinge(studies):
    assert float(studies.detector_penalty(torch.tensor([2.0, 1.0, 1.0, 3.0]), 0)) == 0.0
    low = float(studies.detector_penalty(torch.tensor([0.5, 1.0, 2.0, 2.0, 4.0]), 0))
    assert low == pytest.approx(np.log(2.0 / 0.5) ** 2, rel=1e-4)


def test_disjoint_poison_uses_disjoint_subsets(studies):
    rng = np.random.default_rng(0)
    train = Images(rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8), np.arange(200) % 10,
                   [str(k) for k in range(10)])
    attacks = [make_attack("badnets", num_classes=10, image_shape=(1, 8, 8), target=t, rate=0.05, seed=0,
                           params={"position": pos}) for t, pos in ((0, "bottom-right"), (5, "top-left"))]
    poisoned, (i0, i5) = studies.disjoint_poison(train, attacks, seed=0)
    assert len(i0) == len(i5) == 10 and not set(i0) & set(i5)
    assert np.all(train.y[i0] != 0) and np.all(train.y[i5] != 5)
    assert np.all(poisoned.y[i0] == 0) and np.all(poisoned.y[i5] == 5)
    assert np.all(poisoned.x[i0][:, -3:, -3:] == 255) and np.all(poisoned.x[i5][:, :3, :3] == 255)
    rest = np.setdiff1d(np.arange(200), np.r_[i0, i5])
    assert np.array_equal(poisoned.x[rest], train.x[rest]) and np.array_equal(poisoned.y[rest], train.y[rest])
