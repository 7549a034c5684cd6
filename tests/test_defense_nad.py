"""Neural Attention Distillation: teacher fine-tuning, then attention-distilling fine-tuning of the student."""

import json

import pytest
import torch

import latentguard.defenses.nad as nad
from _defense_util import (
    NARROW,
    FitSpy,
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    noise_images,
    rows_subset,
    state_copy,
    tiny_arch,
    tiny_mlp,
)
from latentguard.defenses.base import make_defense
from latentguard.defenses.nad import attention_map
from latentguard.defenses.tracing import example_input, trace_model
from latentguard.errors import ModelError, SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_attention_map_is_normalised_channel_energy():
    f = torch.randn(3, 5, 4, 4)
    am = attention_map(f, 2.0)
    assert am.shape == (3, 16)
    assert torch.allclose(am.norm(dim=1), torch.ones(3), atol=1e-4)
    raw = f.pow(2).sum(1).flatten(1)
    assert torch.allclose(am, raw / raw.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(attention_map(7.0 * f), am, atol=1e-5)  # scale invariant
    with pytest.raises(ModelError):
        attention_map(torch.randn(3, 5))


def test_runs_with_teacher_then_student_on_the_reserve_only(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, nad)
    model = backdoored.fresh_model()
    before = state_copy(model)
    result = make_defense("nad", teacher_epochs=1, epochs=1).run(model, backdoored.reserve, device="cpu")
    assert_same_architecture(model, result.model)
    assert_state_equal(model, before)
    assert result.extra["layers"] == ["block3"] and result.params["betas"] is None
    h, w = trace_model(model, example_input(backdoored.reserve)).shapes["block3"][2:]
    assert result.extra["betas"] == [pytest.approx(5000.0 * h * w / 64)]  # the authors' β for an 8×8 map, rescaled
    assert len(spy.calls) == 2  # teacher, then student
    (t_data, t_cfg), (s_data, s_cfg) = spy.calls
    assert t_cfg.epochs == 1 and s_cfg.epochs == 1
    for data in (t_data, s_data):
        assert len(data) == 130 and rows_subset(data.x, backdoored.reserve.x)
    assert result.extra["mean_attention_loss"] > 0
    json.dumps(result.to_json())


def test_beta_changes_the_outcome(backdoored):
    kw = dict(teacher_epochs=1, epochs=1, lr=0.05)
    plain = make_defense("nad", betas=[0], **kw).run(backdoored.fresh_model(), backdoored.reserve,
                                                     device="cpu")
    distil = make_defense("nad", betas=[5000], **kw).run(backdoored.fresh_model(), backdoored.reserve,
                                                         device="cpu")
    assert plain.extra["mean_attention_loss"] == 0
    a, b = plain.model.state_dict(), distil.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_distillation_lowers_badnets_asr(backdoored):
    before = backdoored.evaluate(backdoored.model)
    result = make_defense("nad", betas=[300], teacher_epochs=5, epochs=10, lr=0.01, batch_size=32).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    after = backdoored.evaluate(result.model)
    assert after.asr < before.asr - 0.2
    assert after.acc > 0.6


def test_layers_and_architectures(backdoored):
    r = make_defense("nad", layers=["block2", "block3"], betas=[100, 1000], teacher_epochs=0, epochs=1).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    assert r.extra["layers"] == ["block2", "block3"]
    pre = make_defense("nad", teacher_epochs=0, epochs=1, batch_size=20).run(tiny_arch("preact_resnet18"),
                                                                             noise_images(), device="cpu")
    assert pre.extra["layers"] == ["layer4"]
    with pytest.raises(ModelError):
        make_defense("nad", layers=["nope"], teacher_epochs=0).run(backdoored.fresh_model(), backdoored.reserve, device="cpu")
    with pytest.raises(ModelError):
        make_defense("nad", teacher_epochs=0).run(tiny_mlp(), noise_images(), device="cpu")
    with pytest.raises(ModelError):  # a 2-D activation has no spatial attention
        make_defense("nad", layers=["fc1"], teacher_epochs=0, epochs=1).run(backdoored.fresh_model(), backdoored.reserve,
                                                                            device="cpu")


@pytest.mark.parametrize("bad", [
    {"betas": [-1]}, {"betas": []}, {"betas": [1, 2]}, {"layers": ["a"], "betas": [1, 2]}, {"power": 0},
    {"teacher_epochs": -1}, {"epochs": -2}, {"lr": 0}, {"batch_size": 0}, {"layers": []},
])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("nad", **bad)
