"""TrojanNN: neuron selection, trigger optimisation inside the mask, round-trip, poisoning, validation."""

from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import attack_context, random_images, tiny_cnn
from latentguard.attacks import load_attack, make_attack, save_attack
from latentguard.attacks.trojannn import select_neurons
from latentguard.errors import SpecError
from latentguard.models import split_model

_images = partial(random_images, n=64, c=1, size=16, classes=4, seed=0)
_model = partial(tiny_cnn, 4, c=1, size=16, width=4, seed=0)
_context = partial(attack_context, build_model=_model)


def _trojannn(**kw):
    kw.setdefault("num_classes", 4)
    kw.setdefault("image_shape", (1, 16, 16))
    params = {"steps": 5, "n_images": 16}
    params.update(kw.pop("params", {}))
    return make_attack("trojannn", params=params, **kw)


def test_mask_is_a_scaled_bottom_right_square():
    attack = _trojannn()
    assert attack.mask.sum() == 9 and torch.all(attack.mask[0, 13:, 13:] == 1)  # 5 px at 32 → 3 px at 16
    big = _trojannn(image_shape=(3, 32, 32))
    assert big.mask.sum() == 25 and torch.all(big.mask[0, 27:, 27:] == 1)
    assert _trojannn(params={"size": 4, "position": "top-left"}).mask[0, :4, :4].sum() == 16


def test_trigger_changes_only_the_mask_and_raises_the_neurons():
    images = _images()
    ctx = _context(images)
    attack = _trojannn(params={"steps": 15, "lr": 0.2, "n_images": 64})
    assert not attack.is_ready
    attack.prepare(ctx)
    assert attack.is_ready and len(attack.neurons) == 2
    x = torch.rand(6, 1, 16, 16)
    fm = split_model(ctx.clean_model, example_input=x[:2])
    out = attack.apply(x)
    outside = attack.mask[0] == 0
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert torch.equal(out[:, :, ~outside], attack.trigger[:, ~outside].expand(6, 1, -1))
    assert out.min() >= 0 and out.max() <= 1
    train_x = images.tensors()[0]  # the images the trigger was optimised on
    with torch.no_grad():
        before = fm.features(train_x)[:, attack.neurons].mean()
        after = fm.features(attack.apply(train_x))[:, attack.neurons].mean()
    assert after > before


def test_neuron_selection_ranks_live_neurons_by_head_weight():
    model = _model().eval()
    fm = split_model(model, example_input=torch.rand(2, 1, 16, 16))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 3] = 5.0  # strongest, but made dead below
        model.fc.weight[:, 7] = 2.0
        model.fc.weight[:, 1] = 1.0
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(1.0)  # every neuron live ...
        model.fc1.bias[3] = -1.0  # ... but neuron 3: relu(-1) = 0 on every image
    x = torch.rand(8, 1, 16, 16)
    assert select_neurons(fm, x, 2).tolist() == [7, 1]
    assert select_neurons(fm, x, fm.latent_dim).tolist()[-1] == 3  # dead neurons come last


def test_prepare_trains_a_clean_model_when_missing():
    images = _images(n=32)
    ctx = _context(images, clean=False)
    attack = _trojannn(params={"steps": 2})
    attack.prepare(ctx)
    assert ctx.clean_model is not None and attack.is_ready


def test_spec_round_trip_with_learned_trigger(tmp_path):
    attack = _trojannn(seed=3, target=2)
    attack.prepare(_context(_images()))
    save_attack(attack, tmp_path)
    again = load_attack(tmp_path)
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(again.apply(x), attack.apply(x))
    assert torch.equal(again.neurons, attack.neurons)


def test_unprepared_attack_cannot_poison_or_be_loaded(tmp_path):
    attack = _trojannn()
    with pytest.raises(SpecError, match="prepared"):
        attack.get_poisoned_dataset(_images())
    save_attack(attack, tmp_path)
    with pytest.raises(SpecError, match="missing"):
        load_attack(tmp_path)


def test_poisoned_indices_and_labels():
    images = _images()
    attack = _trojannn(target=1, rate=0.25)
    attack.prepare(_context(images))
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 16 and np.all(images.y[idx] != 1) and np.all(poisoned.y[idx] == 1)
    rest = np.setdiff1d(np.arange(64), idx)
    assert np.array_equal(poisoned.x[rest], images.x[rest]) and np.array_equal(poisoned.y[rest], images.y[rest])
    assert np.array_equal(poisoned.x[idx][:, :13, :13], images.x[idx][:, :13, :13])

    a2a = _trojannn(all_to_all=True, rate=0.25)
    a2a.prepare(_context(images))
    poisoned, idx = a2a.get_poisoned_dataset(images)
    assert len(idx) == 16 and np.array_equal(poisoned.y[idx], (images.y[idx] + 1) % 4)


@pytest.mark.parametrize(
    "params, word",
    [({"num_neurons": 0}, "num_neurons"), ({"steps": 0}, "steps"), ({"lr": 0}, "lr"), ({"size": 0}, "size"),
     ({"size": 17}, "size"), ({"position": "middle"}, "position"), ({"n_images": 1.5}, "n_images"),
     ({"target_value": "high"}, "target_value")],
)
def test_invalid_params_name_the_parameter(params, word):
    with pytest.raises(SpecError, match=rf"\b{word}\b"):
        _trojannn(params=params)


def test_too_many_neurons_is_refused_at_preparation():
    attack = _trojannn(params={"num_neurons": 1000})
    with pytest.raises(SpecError, match="num_neurons"):
        attack.prepare(_context(_images()))
