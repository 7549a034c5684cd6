"""LIRA: bounded learned trigger, two-stage training through fit, look-ahead gradients, serialisation."""

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
    params = {"trigger_epochs": 1, "generator_width": 4, **kw.pop("params", {})}
    return make_attack("lira", num_classes=CLASSES, image_shape=(c, 16, 16), params=params, **kw)


def _train(attack, c=1):
    return train_with_attack(attack, _images(c=c), lambda: _model(c))


@pytest.fixture(scope="module")
def trained():
    attack = _attack(params={"eps": 0.1})
    model, history, idx = _train(attack)
    return attack, model, history, idx


def test_train_model_runs_both_stages_through_fit(trained):
    attack, model, history, idx = trained
    assert attack.is_ready and idx.size == 0 and idx.dtype == np.int64
    assert set(attack.phase_histories) == {"trigger", "injection"}
    assert len(attack.phase_histories["trigger"].epochs) == 1 and len(history.epochs) == 1
    assert not model.training and not attack.generator.training
    assert not any(p.requires_grad for p in attack.generator.parameters())


def test_apply_keeps_shape_range_and_linf_budget(trained):
    attack = trained[0]
    x = torch.rand(6, 1, 16, 16)
    out = attack.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= attack.eps + 1e-6
    assert (out - x).abs().max() > 0
    # uint8 images stay exactly on the uint8 grid
    grid = torch.randint(0, 256, (6, 1, 16, 16)).float() / 255
    q = attack.apply(grid) * 255
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert (attack.apply(grid) - grid).abs().max() <= attack.eps + 1e-6


def test_save_load_round_trip_reproduces_apply_exactly(trained, tmp_path):
    attack = trained[0]
    save_attack(attack, tmp_path)
    loaded = load_attack(tmp_path)
    assert loaded.is_ready and loaded.spec.to_json() == attack.spec.to_json()
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(loaded.apply(x), attack.apply(x))


def test_untrained_attack_is_not_ready_and_cannot_be_loaded(tmp_path):
    attack = _attack()
    assert not attack.is_ready and attack.tensors() == {}
    with pytest.raises(SpecError, match="not trained"):
        attack.apply(torch.rand(1, 1, 16, 16))
    save_attack(attack, tmp_path)
    with pytest.raises(SpecError, match="missing"):
        load_attack(tmp_path)
    with pytest.raises(SpecError, match="unexpected"):
        attack.load_tensors({"pattern.weight": torch.zeros(1)})


def test_default_eps_follows_the_image_type():
    assert _attack(c=1).eps == 0.05 and _attack(c=1).spec.params["eps"] == 0.05
    assert _attack(c=3).eps == 0.01
    assert _attack(params={"eps": 0.03}).eps == 0.03


def test_stage1_gives_each_network_its_own_gradient():
    attack = _attack(all_to_all=True)
    attack.generator.train()
    model = _model()
    model.train()
    x = torch.randint(0, 256, (8, 1, 16, 16)).float() / 255
    y = torch.arange(8) % CLASSES
    loss, logits = attack.stage1_loss(model, x, y, eps=0.05, lookahead_lr=0.1)
    assert logits.shape == (8, CLASSES)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    gen_grads = [p.grad for p in attack.generator.parameters()]
    assert all(g is not None for g in gen_grads) and any(g.abs().sum() > 0 for g in gen_grads)
    # the classifier's gradient is exactly that of the α-mixed loss on a detached trigger
    model.zero_grad()
    with torch.no_grad():
        x_bd = attack.perturb(x, 0.05)
    attack._mixed_loss(*attack._both(model, x, x_bd), y, (y + 1) % CLASSES).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_training_without_lookahead_and_on_colour_images():
    attack = _attack(c=3, params={"lookahead": False})
    model, history, _ = _train(attack, c=3)
    assert attack.is_ready and np.isfinite(history.epochs[0].loss)
    out = attack.apply(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"eps": 0}, "eps"),
        ({"eps": 1.5}, "eps"),
        ({"train_eps": -1}, "train_eps"),
        ({"alpha": 1.0}, "alpha"),
        ({"trigger_epochs": -1}, "trigger_epochs"),
        ({"lookahead": "yes"}, "lookahead"),
        ({"lookahead_lr": 0}, "lookahead_lr"),
        ({"generator_width": 2.5}, "generator_width"),
        ({"generator_lr": float("nan")}, "generator_lr"),
    ],
)
def test_invalid_params_raise_spec_error_naming_the_parameter(params, needle):
    with pytest.raises(SpecError, match=needle):
        make_attack("lira", num_classes=CLASSES, image_shape=(1, 16, 16), params=params)
