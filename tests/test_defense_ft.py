"""Vanilla fine-tuning on the clean reserve."""

import json

import pytest

import latentguard.defenses.ft as ft
from _defense_util import (
    NARROW,
    FitSpy,
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    rows_subset,
    state_copy,
)
from latentguard.defenses.base import make_defense
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_runs_and_keeps_architecture_and_input_model(backdoored):
    model = backdoored.fresh_model()
    before = state_copy(model)
    result = make_defense("ft", epochs=1).run(model, backdoored.reserve, device="cpu")
    assert result.name == "ft" and result.kind == "removal"
    assert_same_architecture(model, result.model)
    assert_state_equal(model, before)
    assert result.model is not model
    assert result.params["epochs"] == 1 and result.params["lr"] == 0.01
    assert result.seconds > 0
    json.dumps(result.to_json())


def test_trains_only_on_the_reserve_with_its_parameters(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, ft)
    make_defense("ft", epochs=2, lr=0.02, batch_size=32, schedule="constant").run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    assert len(spy.calls) == 1
    data, cfg = spy.calls[0]
    assert len(data) == len(backdoored.reserve) == 130
    assert rows_subset(data.x, backdoored.reserve.x)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.schedule, cfg.optimizer) == (2, 0.02, 32, "constant", "sgd")
    assert cfg.crop_padding == 2  # 16-px images: size / 8


def test_zero_epochs_is_the_identity(backdoored):
    model = backdoored.fresh_model()
    result = make_defense("ft", epochs=0).run(model, backdoored.reserve, device="cpu")
    assert_state_equal(result.model, state_copy(model))


def test_epochs_change_the_outcome(backdoored):
    a = make_defense("ft", epochs=1).run(backdoored.fresh_model(), backdoored.reserve, device="cpu").model
    b = make_defense("ft", epochs=3).run(backdoored.fresh_model(), backdoored.reserve, device="cpu").model
    assert any(not (a.state_dict()[k] == b.state_dict()[k]).all() for k in a.state_dict())


def test_clean_fine_tuning_lowers_badnets_asr(backdoored):
    before = backdoored.evaluate(backdoored.model)
    result = make_defense("ft", epochs=15, lr=0.05, batch_size=32).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    after = backdoored.evaluate(result.model)
    assert before.asr > 0.9
    assert after.asr < before.asr - 0.1
    assert after.acc > 0.7


@pytest.mark.parametrize("bad", [
    {"epochs": -1}, {"epochs": 1.5}, {"lr": 0}, {"lr": float("nan")}, {"batch_size": 0}, {"momentum": 1.0},
    {"weight_decay": -1}, {"schedule": "step"}, {"augment": "yes"}, {"nonsense": 1},
])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("ft", **bad)
