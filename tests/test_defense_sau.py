"""SAU: shared adversarial examples and their unlearning."""

import copy
import dataclasses

import pytest
import torch

from _defense_util import (
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    forbid_test_data,
    max_param_change,
    tiny_reserve,
)
from latentguard.defenses.sau import SAU, SAUParams, sau_loss, shared_pgd
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


def test_shared_pgd_stays_in_the_ball_and_leaves_models_alone(backdoored):
    model = backdoored.fresh_model().train()
    reference = copy.deepcopy(model)
    x, y = tiny_reserve(backdoored, 2).tensors()
    before = copy.deepcopy(model)
    delta = shared_pgd(model, reference, x, y, SAUParams(eps=0.1, pgd_step=0.05))
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.1 + 1e-6
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert_state_equal(before, model)
    assert all(p.grad is None for p in model.parameters())


def test_loss_terms_follow_the_lambdas(backdoored):
    model = backdoored.fresh_model().eval()
    x, y = tiny_reserve(backdoored, 2).tensors()
    p0 = SAUParams(lambda_1=1.0, lambda_2=0.0, lambda_3=0.0)
    loss_clean, logits = sau_loss(model, copy.deepcopy(model), x, y, p0)
    assert float(loss_clean.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    loss_all, _ = sau_loss(model, copy.deepcopy(model), x, y, SAUParams())
    assert float(loss_all.detach()) >= float(loss_clean.detach()) - 1e-6  # the shared risk is non-negative


def test_runs_on_the_reserve_only_keeps_architecture_and_input(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    before = copy.deepcopy(backdoored.model)
    result = SAU(epochs=1, batch_size=64).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(before, backdoored.model)
    assert_same_architecture(result.model, backdoored.model)
    assert result.params == dataclasses.asdict(SAUParams(epochs=1, batch_size=64))
    assert result.params["eps"] == 0.2 and result.params["pgd_steps"] == 5
    assert max_param_change(result.model, backdoored.model) > 0


def test_lowers_asr(backdoored):
    result = SAU(epochs=4, batch_size=32, lr=1e-3).run(backdoored.model, backdoored.reserve, device="cpu")
    ev = backdoored.evaluate(result.model)
    assert ev.asr < backdoored.asr - 0.3 and ev.acc > 0.7


def test_parameters_change_the_outcome(backdoored):
    clean = tiny_reserve(backdoored, 3)
    a = SAU(epochs=1, batch_size=15, lr=1e-3).run(backdoored.model, clean, device="cpu")
    b = SAU(epochs=1, batch_size=15, lr=1e-3, lambda_3=0.0).run(backdoored.model, clean, device="cpu")
    assert max_param_change(a.model, b.model) > 0


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"eps": 0}, {"pgd_step": -0.1}, {"pgd_steps": 0}, {"pgd_init": "center"}, {"beta_1": -1},
    {"lambda_1": 0, "lambda_2": 0, "lambda_3": 0}, {"lr": float("nan")}, {"norm_type": "L_inf"},
])
def test_invalid_params_raise_spec_error(bad):
    with pytest.raises(SpecError):
        SAU(**bad)
