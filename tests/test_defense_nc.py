"""Neural Cleanse: per-class trigger search, MAD verdict, unlearning."""

import copy
import dataclasses

import pytest
import torch

from _defense_util import (
    TARGET,
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    forbid_test_data,
    max_param_change,
    tiny_reserve,
)
from latentguard.defenses.base import DetectionReport
from latentguard.defenses.nc import NCParams, NeuralCleanse, reverse_engineer_trigger, stamp, unlearning_hook
from latentguard.errors import SpecError

FAST = dict(epochs=30, samples_per_epoch=64, batch_size=16, patience=2, early_stop_patience=4)


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


@pytest.fixture(scope="module")
def nc_result(backdoored):
    before = copy.deepcopy(backdoored.model)
    result = NeuralCleanse(**FAST, unlearn_epochs=2).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(before, backdoored.model, msg="run() must not modify the input model")
    return result


def test_flags_the_badnets_target_and_unlearning_lowers_asr(backdoored, nc_result):
    report = nc_result.detection
    assert isinstance(report, DetectionReport) and report.method == "nc"
    assert TARGET in report.target_classes
    assert min(range(10), key=report.norms.__getitem__) == TARGET
    assert report.scores[TARGET] > report.threshold == 2.0
    assert backdoored.evaluate(nc_result.model).asr < backdoored.asr - 0.3
    assert nc_result.extra["unlearned_trigger_asr"][TARGET] < 0.5


def test_result_records_params_and_keeps_architecture(backdoored, nc_result):
    assert nc_result.params == dataclasses.asdict(NCParams(**FAST, unlearn_epochs=2))
    assert nc_result.params["epochs"] == 30 and nc_result.params["unlearn_fraction"] == 0.2
    assert_same_architecture(nc_result.model, backdoored.model)
    assert nc_result.kind == "removal" and nc_result.seconds > 0


def test_nothing_flagged_returns_model_unchanged(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    clean = tiny_reserve(backdoored, 2)
    result = NeuralCleanse(epochs=1, samples_per_epoch=16, batch_size=16, anomaly_threshold=1e6).run(
        backdoored.model, clean, device="cpu")
    assert result.detection.target_classes == []
    assert len(result.detection.norms) == len(result.detection.scores) == 10
    assert "unchanged" in result.extra["removal"]
    assert_state_equal(result.model, backdoored.model)


def test_parameters_change_the_outcome(backdoored):
    clean = tiny_reserve(backdoored, 2)
    kw = dict(epochs=2, samples_per_epoch=16, batch_size=16, unlearn=False)
    a = NeuralCleanse(**kw).run(backdoored.model, clean, device="cpu")
    b = NeuralCleanse(**{**kw, "lr": 0.01}).run(backdoored.model, clean, device="cpu")
    assert a.detection.norms != b.detection.norms
    c = NeuralCleanse(**{**kw, "classes": [0, 1, 2]}).run(backdoored.model, clean, device="cpu")
    assert len(c.detection.norms) == 3 and c.detection.extra["classes"] == [0, 1, 2]


def test_reverse_engineer_trigger_shapes_and_model_untouched(backdoored):
    model = backdoored.fresh_model().eval()
    before = copy.deepcopy(model)
    x, _ = tiny_reserve(backdoored, 2).tensors()
    gen = torch.Generator().manual_seed(0)
    mask, pattern, asr = reverse_engineer_trigger(model, x, 3, NCParams(epochs=2, batch_size=8), torch.device("cpu"), gen)
    assert mask.shape == (16, 16) and pattern.shape == (1, 16, 16)
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1 and 0 <= float(pattern.min()) <= float(pattern.max()) <= 1
    assert 0.0 <= asr <= 1.0
    assert_state_equal(before, model)
    assert all(p.grad is None for p in model.parameters())


def test_unlearning_hook_stamps_a_fraction_and_keeps_labels():
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1.0
    hook = unlearning_hook([(mask, torch.ones(1, 4, 4))], 0.2)
    x, y = torch.zeros(10, 1, 4, 4), torch.arange(10)
    out, labels = hook(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(labels, y) and int((out[:, 0, 0, 0] == 1).sum()) == 2 and float(out.sum()) == 2.0
    assert torch.equal(stamp(x, mask, torch.ones(1, 4, 4))[:, 0, 0, 0], torch.ones(10))


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"lr": -0.1}, {"init_cost": 0}, {"cost_multiplier": 1.0}, {"attack_success_threshold": 1.5},
    {"unlearn_fraction": 0}, {"anomaly_threshold": float("nan")}, {"classes": [0, 0, 1]}, {"classes": [0, 1]},
    {"unlearn_epochs": -1}, {"batch_size": 2.5}, {"nonsense": 1},
])
def test_invalid_params_raise_spec_error(bad):
    with pytest.raises(SpecError):
        NeuralCleanse(**bad)


def test_classes_outside_the_model_raise(backdoored):
    with pytest.raises(SpecError, match="classes"):
        NeuralCleanse(classes=[0, 1, 12], epochs=1).run(backdoored.model, tiny_reserve(backdoored, 1), device="cpu")


def test_unlearning_changes_weights_when_flagged(backdoored, nc_result):
    assert max_param_change(nc_result.model, backdoored.model) > 0
