"""ShrinkPad: shrink every input and zero-pad it back at a random offset before the model."""

import json

import pytest
import torch
from torch import nn

import latentguard.defenses.shrinkpad  # noqa: F401  (registration)
from _defense_util import NARROW, assert_state_equal, backdoored_digits, noise_images, state_copy
from latentguard.defenses.base import make_defense
from latentguard.defenses.shrinkpad import ShrinkPadModel, shrink_pad
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_shrink_pad_geometry():
    x = torch.ones(64, 1, 16, 16)
    out = shrink_pad(x, 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.all(out.flatten(1).sum(1) == 14 * 14)  # a 14×14 image of ones, the rest zero padding
    rows = out[:, 0].amax(dim=2)  # which rows hold the image
    tops = {int(torch.nonzero(r > 0.5)[0]) for r in rows}
    assert tops == {0, 1, 2}  # every vertical offset occurs
    assert torch.equal(shrink_pad(x, 0), x)
    with pytest.raises(SpecError):
        shrink_pad(x, 16)


def test_wrapper_keeps_the_model_and_its_call_signature(backdoored):
    before = state_copy(backdoored.model)
    result = make_defense("shrinkpad").run(backdoored.model, backdoored.reserve, device="cpu")
    assert result.kind == "runtime"
    wrapper = result.model
    assert isinstance(wrapper, ShrinkPadModel)
    assert result.extra == {"pad": 2, "image_size": [16, 16]} and result.params["pad"] is None
    assert list(wrapper.state_dict()) == [f"model.{k}" for k in backdoored.model.state_dict()]
    assert_state_equal(backdoored.model, before)
    json.dumps(result.to_json())
    x, _ = backdoored.test.tensors()
    assert wrapper(x[:7]).shape == (7, 10)
    assert wrapper(backdoored.backdoor_set[0][:3]).shape == (3, 10)  # uint8 input like the model accepts


def test_pad_parameter_and_reproducibility(backdoored):
    x, _ = backdoored.test.tensors()
    a = make_defense("shrinkpad", pad=4).run(backdoored.model, backdoored.reserve, device="cpu", seed=1).model
    b = make_defense("shrinkpad", pad=4).run(backdoored.model, backdoored.reserve, device="cpu", seed=1).model
    assert a.pad == 4 and torch.equal(a(x[:20]), b(x[:20]))
    with pytest.raises(SpecError):
        make_defense("shrinkpad", pad=16).run(backdoored.model, backdoored.reserve, device="cpu")
    big = noise_images()
    assert make_defense("shrinkpad").run(nn.Flatten(), big, device="cpu").extra["pad"] == 2


def test_lowers_badnets_asr_and_keeps_accuracy(backdoored):
    before = backdoored.evaluate(backdoored.model)
    defended = make_defense("shrinkpad").run(backdoored.model, backdoored.reserve, device="cpu").model
    after = backdoored.evaluate(defended)
    assert after.asr < before.asr - 0.2
    assert after.acc > before.acc - 0.15


@pytest.mark.parametrize("bad", [{"pad": -1}, {"pad": 2.5}, {"fill": 2}, {"size": 3}])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("shrinkpad", **bad)
