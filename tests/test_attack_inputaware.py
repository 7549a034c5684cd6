"""Input-aware dynamic backdoor: generators, mixed batches, training through fit, serialisation."""

from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import random_images, tiny_cnn, train_with_attack
from latentguard.attacks import load_attack, make_attack, save_attack
from latentguard.errors import SpecError

CLASSES = 3


_images = partial(random_images, n=48, c=1, size=16, classes=CLASSES, seed=0)
_model = partial(tiny_cnn, CLASSES, size=16, width=4, seed=0)  # called as _model(c), c = channels


def _attack(c=1, **kw):
    params = {"mask_epochs": 1, "generator_width": 4, **kw.pop("params", {})}
    return make_attack("inputaware", num_classes=CLASSES, image_shape=(c, 16, 16), params=params, **kw)


def _train(attack, c=1):
    return train_with_attack(attack, _images(c=c), lambda: _model(c))


@pytest.fixture(scope="module")
def trained():
    attack = _attack(rate=0.25, params={"cross_ratio": 0.25})
    model, history, idx = _train(attack)
    return attack, model, history, idx


def test_train_model_runs_through_fit_and_leaves_attack_ready(trained):
    attack, model, history, idx = trained
    assert attack.is_ready
    assert len(history.epochs) == 1 and np.isfinite(history.epochs[0].loss)
    assert set(attack.phase_histories) == {"mask", "joint"}
    assert idx.dtype == np.int64 and idx.size == 0  # no fixed poisoned subset (documented)
    assert not model.training and not attack.pattern_net.training and not attack.mask_net.training


def test_apply_keeps_shape_and_range_and_is_input_dependent(trained):
    attack = trained[0]
    x = torch.rand(4, 1, 16, 16)
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    residual = out - x
    assert not torch.allclose(residual[0], residual[1])  # a different trigger per input
    p = attack.patterns(x)
    assert not torch.allclose(p[0], p[1])
    with torch.no_grad():
        m = attack.masks(x)
    assert m.shape == (4, 1, 16, 16)
    assert m.min() >= 0 and m.max() <= 1


def test_untrained_attack_is_not_ready():
    attack = _attack()
    assert not attack.is_ready and attack.tensors() == {}
    with pytest.raises(SpecError, match="not trained"):
        attack.apply(torch.rand(1, 1, 16, 16))


def test_save_load_round_trip_reproduces_apply_exactly(trained, tmp_path):
    attack = trained[0]
    save_attack(attack, tmp_path)
    loaded = load_attack(tmp_path)
    assert loaded.is_ready and loaded.spec.to_json() == attack.spec.to_json()
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(loaded.apply(x), attack.apply(x))


def test_load_without_tensors_and_with_foreign_tensors_fails(tmp_path):
    attack = _attack()
    save_attack(attack, tmp_path)  # untrained: spec only
    with pytest.raises(SpecError, match="missing"):
        load_attack(tmp_path)
    with pytest.raises(SpecError, match="unexpected"):
        attack.load_tensors({"other.weight": torch.zeros(1)})
    with pytest.raises(SpecError, match="does not fit"):
        _attack(params={"generator_width": 8}).load_tensors(_trained_tensors())


def _trained_tensors():
    a = _attack()
    a.load_tensors({**{f"pattern.{k}": v for k, v in a.pattern_net.state_dict().items()},
                    **{f"mask.{k}": v for k, v in a.mask_net.state_dict().items()}})
    return a.tensors()


@pytest.mark.parametrize("all_to_all", [False, True])
def test_mixed_batch_labels_and_cross_triggers(all_to_all):
    attack = _attack(rate=0.25, target=2, all_to_all=all_to_all, params={"cross_ratio": 0.25})
    attack.pattern_net.eval()
    attack.mask_net.eval()
    x = torch.rand(8, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    n_bd, n_cross = attack.split_sizes(8)
    assert (n_bd, n_cross) == (2, 2)
    with torch.no_grad():
        xm, ym, div = attack.mixed_batch(x, y)
    assert xm.shape == x.shape and ym.shape == y.shape
    expected_bd = (y[:2] + 1) % CLASSES if all_to_all else torch.full((2,), 2)
    assert torch.equal(ym[:2], expected_bd)
    assert torch.equal(ym[2:], y[2:])  # cross and clean samples keep their true labels
    assert torch.equal(xm[4:], x[4:])  # clean part untouched
    with torch.no_grad():
        own = attack.blend(x[:2], attack.patterns(x[:2]), attack.masks(x[:2]))
        other = x[4:6]  # cross image i takes the trigger of image i + n_cross
        cross = attack.blend(x[2:4], attack.patterns(other), attack.masks(other))
    assert torch.allclose(xm[:2], own) and torch.allclose(xm[2:4], cross)
    assert torch.isfinite(div) and div > 0


def test_mixed_batch_without_cross_samples_has_no_diversity_term():
    attack = _attack(rate=0.5, params={"cross_ratio": 0.0})
    xm, ym, div = attack.mixed_batch(torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 1, 2]))
    assert torch.equal(ym, torch.tensor([0, 0, 1, 2])) and float(div) == 0.0


def test_mask_loss_is_finite_for_identical_images():
    attack = _attack()
    loss = attack.mask_loss(torch.zeros(4, 1, 16, 16))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in attack.mask_net.parameters() if p.grad is not None)


def test_poisoned_dataset_after_training_and_colour_images():
    attack = _attack(c=3, rate=0.2)
    _train(attack, c=3)
    images = _images(n=20, c=3)
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) > 0 and np.all(poisoned.y[idx] == 0)
    assert attack.apply(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("params", "kw", "needle"),
    [
        ({"cross_ratio": 1.5}, {}, "cross_ratio"),
        ({"mask_density": -0.1}, {}, "mask_density"),
        ({"lambda_div": "big"}, {}, "lambda_div"),
        ({"mask_epochs": -1}, {}, "mask_epochs"),
        ({"generator_lr": 0}, {}, "generator_lr"),
        ({"generator_width": 0}, {}, "generator_width"),
        ({"cross_ratio": 0.5}, {"rate": 0.5}, "cross_ratio"),
        ({"bogus": 1}, {}, "bogus"),
    ],
)
def test_invalid_params_raise_spec_error_naming_the_parameter(params, kw, needle):
    with pytest.raises(SpecError, match=needle):
        make_attack("inputaware", num_classes=CLASSES, image_shape=(1, 16, 16), params=params, **kw)
