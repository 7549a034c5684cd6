"""BadNets, Blend and the shared attack machinery (spec, registry, poisoning, backdoor test set)."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import random_images
from latentguard.attacks import AttackSpec, load_attack, make_attack, save_attack
from latentguard.errors import SpecError

_images = partial(random_images, n=60, c=3, size=8, classes=3, seed=0)


def _badnets(**kw):
    return make_attack("badnets", num_classes=3, image_shape=(3, 8, 8), **kw)


def test_badnets_changes_only_the_patch():
    attack = _badnets()
    x = torch.rand(4, 3, 8, 8)
    out = attack.apply(x)
    assert torch.all(out[:, :, 5:, 5:] == 1.0)  # 3×3 white bottom-right
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[5:, 5:] = False
    assert torch.equal(out[:, :, untouched], x[:, :, untouched])


def test_badnets_position_and_pattern_options():
    attack = _badnets(params={"size": 2, "position": [1, 2], "pattern": "black"})
    out = attack.apply(torch.ones(1, 3, 8, 8))
    assert out[0, :, 1:3, 2:4].sum() == 0
    assert out.sum() == 3 * 64 - 3 * 4


def test_blend_is_convex_mix_with_alpha():
    attack = make_attack("blend", num_classes=3, image_shape=(3, 8, 8), params={"alpha": 0.2})
    x = torch.rand(2, 3, 8, 8)
    expected = 0.8 * x + 0.2 * attack.pattern
    assert torch.allclose(attack.apply(x), expected)


def test_poisoned_dataset_all_to_one():
    images = _images()
    attack = _badnets(target=1, rate=0.2, seed=3)
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 12  # round(0.2 × 60)
    assert np.all(images.y[idx] != 1)  # only images whose label changes
    assert np.all(poisoned.y[idx] == 1)
    rest = np.setdiff1d(np.arange(60), idx)
    assert np.array_equal(poisoned.y[rest], images.y[rest])
    assert np.array_equal(poisoned.x[rest], images.x[rest])
    assert np.all(poisoned.x[idx][:, 5:, 5:, :] == 255)
    # reproducible from the seed
    _, idx2 = _badnets(target=1, rate=0.2, seed=3).get_poisoned_dataset(images)
    assert np.array_equal(idx, idx2)


def test_poisoned_dataset_all_to_all_and_backdoor_test_set():
    images = _images()
    attack = _badnets(all_to_all=True, rate=0.5)
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert np.array_equal(poisoned.y[idx], (images.y[idx] + 1) % 3)
    x, y_attack, y_true = attack.get_backdoor_test_set(images)
    assert len(x) == 60  # every image's mapped label differs from its label
    assert torch.equal(y_attack, (y_true + 1) % 3)
    one = _badnets(target=2)
    x, y_attack, y_true = one.get_backdoor_test_set(images)
    assert len(x) == 40 and torch.all(y_true != 2) and torch.all(y_attack == 2)
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)


def test_spec_round_trip(tmp_path):
    attack = _badnets(target=2, rate=0.05, seed=7, params={"size": 2})
    save_attack(attack, tmp_path)
    loaded = load_attack(tmp_path / "attack.json")
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(loaded.apply(x), attack.apply(x))
    assert loaded.spec.to_json() == attack.spec.to_json()
    blend = make_attack("blend", num_classes=3, image_shape=(3, 8, 8), seed=5)
    save_attack(blend, tmp_path / "b")
    assert torch.equal(load_attack(tmp_path / "b").apply(x), blend.apply(x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"surprise": 1}, "unknown attack spec field"),
        ({"rate": 1.5}, "poison rate"),
        ({"target": -1}, "target"),
        ({"target": 3}, "not a class"),
        ({"name": "nope"}, "unknown attack"),
        ({"params": {"size": 0}}, "size"),
        ({"params": {"colour": "red"}}, "unknown parameter"),
    ],
)
def test_bad_specs_are_refused(tmp_path, change, message):
    spec = _badnets().spec.to_json()
    spec.update(change)
    (tmp_path / "attack.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=message):
        load_attack(tmp_path / "attack.json")


def test_patch_must_fit_and_data_must_match():
    with pytest.raises(SpecError, match="does not fit"):
        make_attack("badnets", num_classes=3, image_shape=(3, 4, 4), params={"size": 5})
    attack = _badnets()
    with pytest.raises(SpecError, match="built for images"):
        attack.get_poisoned_dataset(_images(c=1))
    with pytest.raises(SpecError, match="selects no image"):
        make_attack("badnets", num_classes=3, image_shape=(3, 8, 8), rate=0.001).get_poisoned_dataset(_images())


def test_spec_validation_direct():
    with pytest.raises(SpecError):
        AttackSpec(name="badnets", all_to_all="yes")
    with pytest.raises(SpecError, match="needs num_classes"):
        from latentguard.attacks.badnets import BadNets

        BadNets(AttackSpec(name="badnets"))
