"""STRIP: entropy of predictions under superimposition, thresholded on clean entropies only."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import latentguard.defenses.strip  # noqa: F401  (registration)
from _defense_util import NARROW, assert_state_equal, backdoored_digits, noise_images, state_copy, tiny_arch
from latentguard import metrics
from latentguard.defenses.base import make_defense
from latentguard.defenses.strip import StripDetector, strip_detector
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


@pytest.fixture(scope="module")
def result(backdoored):
    return make_defense("strip", n_superimpose=20).run(backdoored.model, backdoored.reserve, device="cpu")


def test_returns_the_unchanged_model_and_a_detector(backdoored, result):
    before = state_copy(backdoored.model)
    assert result.kind == "runtime"
    assert_state_equal(result.model, before)
    assert_state_equal(backdoored.model, before)
    det = strip_detector(result)
    assert isinstance(det, StripDetector)
    x, _ = backdoored.test.tensors()
    assert torch.equal(det(x[:5]), result.model(x[:5]))  # forward = the model's logits
    assert list(det.state_dict()) == [f"model.{k}" for k in result.model.state_dict()]
    assert det.flag(x[:5]).dtype == torch.bool
    assert result.params["n_superimpose"] == 20
    json.dumps(result.to_json())


def test_overlays_are_the_reserve_only(backdoored, result):
    det = strip_detector(result)
    x, _ = backdoored.reserve.tensors()
    assert torch.equal(det.overlays, x)


def test_threshold_from_clean_entropies_at_the_frr(backdoored, result):
    ex = result.extra
    assert ex["score_threshold"] == -ex["entropy_threshold"]
    assert ex["entropy_threshold"] < ex["clean_entropy_mean"]
    assert ex["clean_frr"] <= 0.08  # about 1 % of the reserve is rejected
    strict = make_defense("strip", n_superimpose=20, frr=0.2).run(backdoored.model, backdoored.reserve,
                                                                   device="cpu")
    assert strict.extra["entropy_threshold"] > ex["entropy_threshold"]
    q = make_defense("strip", n_superimpose=20, threshold_rule="quantile", frr=0.1).run(
        backdoored.model, backdoored.reserve, device="cpu")
    assert abs(q.extra["clean_frr"] - 0.1) < 0.03


def test_triggered_inputs_score_higher_than_clean_ones(backdoored, result):
    xc, _ = backdoored.test.tensors()
    xb = backdoored.backdoor_set[0]
    s_clean = result.input_score(xc[:150])
    s_bd = result.input_score(xb[:150])
    scores = torch.cat([s_clean, s_bd]).numpy()
    labels = np.r_[np.zeros(150), np.ones(150)]
    assert metrics.auroc(scores, labels) > 0.8
    det = strip_detector(result)
    assert det.flag(xb[:150]).float().mean() > 0.5
    assert det.flag(xc[:150]).float().mean() < 0.2


def test_n_superimpose_and_seed_reproducibility(backdoored):
    x = backdoored.backdoor_set[0][:10]
    a = make_defense("strip", n_superimpose=5).run(backdoored.model, backdoored.reserve, device="cpu", seed=3)
    b = make_defense("strip", n_superimpose=5).run(backdoored.model, backdoored.reserve, device="cpu", seed=3)
    assert torch.allclose(a.input_score(x), b.input_score(x))
    assert a.extra["entropy_threshold"] == b.extra["entropy_threshold"]


def test_blend_rules():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    overlays = torch.full((4, 1, 2, 2), 0.6)
    x = torch.full((1, 1, 2, 2), 0.8)
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    StripDetector(model, overlays, n_superimpose=2, blend="add").entropy(x)
    assert torch.allclose(seen[-1], torch.ones(2, 1, 2, 2))  # 0.8 + 0.6 saturates at 1
    StripDetector(model, overlays, n_superimpose=2, blend="average").entropy(x)
    assert torch.allclose(seen[-1], torch.full((2, 1, 2, 2), 0.7))


def test_never_overlays_an_image_on_itself():
    det = StripDetector(nn.Flatten(), torch.rand(3, 1, 2, 2), n_superimpose=2)
    idx = det._draw(3, torch.arange(3))
    assert all(i not in row for i, row in enumerate(idx.tolist()))
    det = StripDetector(nn.Flatten(), torch.rand(3, 1, 2, 2), n_superimpose=10)  # more draws than images
    idx = det._draw(3, torch.arange(3))
    assert idx.shape == (3, 10) and all(i not in row for i, row in enumerate(idx.tolist()))


def test_other_architecture_runs():
    r = make_defense("strip", n_superimpose=3).run(tiny_arch("vit_tiny"), noise_images(), device="cpu")
    assert np.isfinite(r.extra["entropy_threshold"])


@pytest.mark.parametrize("bad", [{"n_superimpose": 0}, {"frr": 0}, {"frr": 1}, {"blend": "max"},
                                 {"threshold_rule": "mad"}, {"batch_size": 0}])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("strip", **bad)
