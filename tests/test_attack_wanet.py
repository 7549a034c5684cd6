"""WaNet: the warping field, static noise-mode poisoning, spec round-trip and parameter validation."""

from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import random_images
from latentguard.attacks import load_attack, make_attack, save_attack
from latentguard.errors import SpecError

_images = partial(random_images, n=100, c=1, size=16, classes=4, seed=0)


def _wanet(**kw):
    kw.setdefault("num_classes", 4)
    kw.setdefault("image_shape", (1, 16, 16))
    return make_attack("wanet", **kw)


def test_zero_strength_is_identity():
    attack = _wanet(params={"s": 0.0})
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(attack.apply(x), x, atol=1e-5)


def test_warp_keeps_shape_and_range_and_changes_the_image():
    attack = _wanet(image_shape=(3, 16, 12))
    x = torch.rand(5, 3, 16, 12)
    out = attack.apply(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 1e-3


def test_field_is_the_normalised_upsampled_grid():
    attack = _wanet(params={"k": 4, "s": 0.5})
    # bicubic upsampling with align_corners keeps the control points (every 5th pixel for k=4 on 16 px),
    # and the control grid is normalised to a mean absolute value of 1
    control = attack.noise_grid[0, ::5, ::5]
    assert control.shape == (4, 4, 2)
    assert torch.isclose(control.abs().mean(), torch.tensor(1.0), atol=1e-5)
    grid = attack.grid[0]
    assert grid.min() >= -1 and grid.max() <= 1
    expected = (attack.identity_grid + 0.5 * attack.noise_grid / 16).clamp(-1, 1)
    assert torch.allclose(attack.grid, expected)


def test_deterministic_from_seed():
    x = torch.rand(2, 1, 16, 16)
    a, b, c = _wanet(seed=3), _wanet(seed=3), _wanet(seed=4)
    assert torch.equal(a.apply(x), b.apply(x))
    assert not torch.equal(a.apply(x), c.apply(x))


def test_spec_round_trip_restores_the_saved_field(tmp_path):
    attack = _wanet(seed=7, target=2, params={"s": 0.8, "k": 3})
    save_attack(attack, tmp_path)
    assert (tmp_path / "attack.safetensors").exists()
    again = load_attack(tmp_path)
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(again.apply(x), attack.apply(x))
    # the saved field wins over the seed
    attack.noise_grid = torch.randn_like(attack.noise_grid)
    attack._build_grid()
    save_attack(attack, tmp_path)
    assert torch.equal(load_attack(tmp_path).apply(x), attack.apply(x))


def test_poisoning_backdoor_and_cross_indices():
    images = _images()
    attack = _wanet(target=1, rate=0.1, seed=2)
    poisoned, idx = attack.get_poisoned_dataset(images)
    cross = attack.cross_indices
    assert len(idx) == 10 and len(cross) == 20  # rho_a = 0.1, rho_n = 2 × 0.1
    assert not set(idx) & set(cross)
    assert np.all(images.y[idx] != 1) and np.all(poisoned.y[idx] == 1)
    assert np.array_equal(poisoned.y[cross], images.y[cross])  # noise mode keeps labels
    rest = np.setdiff1d(np.arange(100), np.concatenate([idx, cross]))
    assert np.array_equal(poisoned.x[rest], images.x[rest])
    assert np.array_equal(poisoned.y[rest], images.y[rest])
    assert np.any(poisoned.x[cross] != images.x[cross])
    # backdoor images get exactly the backdoor warp, noise images a different one
    assert np.array_equal(poisoned.x[idx], attack.apply_images(images, idx))
    assert np.any(poisoned.x[cross] != attack.apply_images(images, cross))
    # static and reproducible
    again, idx2 = _wanet(target=1, rate=0.1, seed=2).get_poisoned_dataset(images)
    assert np.array_equal(idx, idx2) and np.array_equal(again.x, poisoned.x)


def test_all_to_all_labels_and_no_cross():
    images = _images()
    attack = _wanet(all_to_all=True, rate=0.2, params={"cross_ratio": 0})
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 20 and len(attack.cross_indices) == 0
    assert np.array_equal(poisoned.y[idx], (images.y[idx] + 1) % 4)


def test_cross_count_is_capped_by_free_images():
    images = _images(n=20)
    attack = _wanet(rate=0.5, params={"cross_ratio": 2})
    _, idx = attack.get_poisoned_dataset(images)
    assert len(idx) + len(attack.cross_indices) == 20


@pytest.mark.parametrize(
    "params, word",
    [({"k": 1}, "k"), ({"k": 2.5}, "k"), ({"k": 17}, "k"), ({"s": -0.1}, "s"), ({"grid_rescale": 0}, "grid_rescale"),
     ({"cross_ratio": -1}, "cross_ratio")],
)
def test_invalid_params_name_the_parameter(params, word):
    with pytest.raises(SpecError, match=rf"\b{word}\b"):
        _wanet(params=params)


def test_bad_saved_field_is_refused():
    attack = _wanet()
    with pytest.raises(SpecError, match="noise_grid"):
        attack.load_tensors({"noise_grid": torch.zeros(1, 8, 8, 2)})
