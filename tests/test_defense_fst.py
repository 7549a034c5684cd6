"""FST: head re-initialisation, the feature-shift penalty and the norm constraint."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from _defense_util import (
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    forbid_test_data,
    max_param_change,
    tiny_reserve,
)
from latentguard.defenses.fst import FST, FSTParams, NormProjection
from latentguard.errors import ModelError, SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


def test_runs_on_the_reserve_only_keeps_architecture_input_and_head_norm(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    before = copy.deepcopy(backdoored.model)
    result = FST(epochs=2).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(before, backdoored.model)
    assert_same_architecture(result.model, backdoored.model)
    assert result.params == dataclasses.asdict(FSTParams(epochs=2))
    assert result.params["alpha"] == 0.2 and result.params["lr"] == 0.01
    assert result.extra["head"] == "fc"
    norm = float(result.model.fc.weight.detach().norm())
    assert norm == pytest.approx(float(backdoored.model.fc.weight.detach().norm()), rel=1e-5)


def test_lowers_asr_and_shifts_the_head(backdoored):
    result = FST(epochs=10, batch_size=32).run(backdoored.model, backdoored.reserve, device="cpu")
    ev = backdoored.evaluate(result.model)
    assert ev.asr < 0.2 and ev.acc > 0.5  # few steps on 130 images: accuracy is still recovering
    assert result.extra["head_cosine_to_original"] < 0


def test_alpha_drives_the_head_away(backdoored):
    clean = tiny_reserve(backdoored, 4)
    weak = FST(epochs=3, batch_size=20, alpha=0.0).run(backdoored.model, clean, device="cpu")
    strong = FST(epochs=3, batch_size=20, alpha=1.0).run(backdoored.model, clean, device="cpu")
    assert strong.extra["head_cosine_to_original"] < weak.extra["head_cosine_to_original"]
    assert max_param_change(weak.model, strong.model) > 0


def test_head_can_be_named_and_models_without_a_linear_head_are_refused(backdoored):
    clean = tiny_reserve(backdoored, 1)
    with pytest.raises(ModelError):
        FST(epochs=1, head="fc1").run(backdoored.model, clean, device="cpu")  # not the output layer
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 16), nn.Flatten())
    with pytest.raises(ModelError):
        FST(epochs=1).run(conv_only, clean, device="cpu")


def test_norm_projection_rescales():
    w = nn.Parameter(torch.randn(3, 4))
    NormProjection(w, 2.5).step()
    assert float(w.detach().norm()) == pytest.approx(2.5)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"lr": 0}, {"alpha": -0.1}, {"alpha": float("nan")}, {"momentum": 1.5},
    {"weight_decay": -1}, {"head": ""}, {"augment": 1}, {"batch_size": 0}, {"init": True},
])
def test_invalid_params_raise_spec_error(bad):
    with pytest.raises(SpecError):
        FST(**bad)
