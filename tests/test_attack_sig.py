"""SIG: the sinusoidal signal, clean-label poisoning, spec round-trip and parameter validation."""

import math
from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import random_images
from latentguard.attacks import load_attack, make_attack, save_attack
from latentguard.errors import SpecError

_images = partial(random_images, n=100, c=1, size=16, classes=4, seed=0)


def _sig(**kw):
    kw.setdefault("num_classes", 4)
    kw.setdefault("image_shape", (3, 16, 16))
    return make_attack("sig", **kw)


def test_added_signal_is_the_formula():
    attack = _sig(params={"delta": 20, "f": 3})
    x = torch.full((2, 3, 16, 16), 0.5)
    added = attack.apply(x) - x
    j = torch.arange(16, dtype=torch.float64)
    expected = (20 * torch.sin(2 * math.pi * j * 3 / 16) / 255).float()
    assert torch.allclose(added, expected.expand(2, 3, 16, 16), atol=1e-6)  # same for every row and channel


def test_output_stays_in_unit_range():
    attack = _sig(params={"delta": 200, "f": 2})
    out = attack.apply(torch.rand(4, 3, 16, 16))
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 0).any() and (out == 1).any()  # strong signal is clipped, not wrapped


def test_default_params_are_the_papers():
    attack = _sig()
    assert attack.params.delta == 20 and attack.params.f == 6
    assert attack.clean_label and not attack.spec.all_to_all


def test_clean_label_poisoning_touches_only_target_images():
    images = _images()
    attack = make_attack("sig", num_classes=4, image_shape=(1, 16, 16), target=2, rate=0.1, seed=1)
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 10  # round(0.1 × 100), below the 25 target images
    assert np.all(images.y[idx] == 2)
    assert np.array_equal(poisoned.y, images.y)  # never relabels
    rest = np.setdiff1d(np.arange(100), idx)
    assert np.array_equal(poisoned.x[rest], images.x[rest])
    assert np.any(poisoned.x[idx] != images.x[idx])


def test_rate_is_capped_at_the_target_class():
    images = _images()
    attack = make_attack("sig", num_classes=4, image_shape=(1, 16, 16), target=0, rate=0.5)
    _, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 25 and np.all(images.y[idx] == 0)


def test_backdoor_test_set_excludes_target_class():
    images = _images(n=40)
    attack = make_attack("sig", num_classes=4, image_shape=(1, 16, 16), target=1)
    x, y_attack, y_true = attack.get_backdoor_test_set(images)
    assert len(x) == 30 and torch.all(y_attack == 1) and torch.all(y_true != 1)


def test_spec_round_trip(tmp_path):
    attack = _sig(target=3, seed=5, params={"delta": 30, "f": 4})
    save_attack(attack, tmp_path)
    again = load_attack(tmp_path)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(again.apply(x), attack.apply(x))
    assert again.spec.to_json() == attack.spec.to_json()


@pytest.mark.parametrize(
    "params, word",
    [({"delta": -1}, "delta"), ({"delta": 0}, "delta"), ({"delta": 300}, "delta"), ({"f": 0}, "f"),
     ({"f": "six"}, "f"), ({"f": 8}, "f")],
)
def test_invalid_params_name_the_parameter(params, word):
    with pytest.raises(SpecError, match=rf"\b{word}\b"):
        _sig(params=params)


def test_all_to_all_is_refused():
    with pytest.raises(SpecError, match="all-to-all|all-to-one"):
        _sig(all_to_all=True)
