"""I-BAU: universal-perturbation maximisation and the implicit-hypergradient unlearning step."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _defense_util import (
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    forbid_test_data,
    max_param_change,
    tiny_reserve,
)
from latentguard.defenses.ibau import IBAU, IBAUParams, hypergradient_loss, maximise_perturbation
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


@pytest.fixture(scope="module")
def ibau_result(backdoored):
    before = copy.deepcopy(backdoored.model)
    result = IBAU(batch_size=32).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(before, backdoored.model, msg="run() must not modify the input model")
    return result


def test_unlearning_lowers_asr(backdoored, ibau_result):
    ev = backdoored.evaluate(ibau_result.model)
    assert ev.asr < backdoored.asr - 0.3
    assert ev.acc > 0.5
    assert len(ibau_result.extra["perturbation_l2"]) == 5


def test_result_records_params_and_keeps_architecture(backdoored, ibau_result):
    assert ibau_result.params == dataclasses.asdict(IBAUParams(batch_size=32))
    assert ibau_result.params["fixed_point_steps"] == 5 and ibau_result.params["lr"] == 1e-3
    assert_same_architecture(ibau_result.model, backdoored.model)
    assert max_param_change(ibau_result.model, backdoored.model) > 0


def test_only_uses_the_clean_reserve_and_parameters_matter(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    clean = tiny_reserve(backdoored, 3)
    a = IBAU(n_rounds=1, batch_size=15).run(backdoored.model, clean, device="cpu")
    b = IBAU(n_rounds=1, batch_size=15, lr=1e-2).run(backdoored.model, clean, device="cpu")
    c = IBAU(n_rounds=1, batch_size=15, norm_bound=0.5).run(backdoored.model, clean, device="cpu")
    assert max_param_change(a.model, b.model) > 0
    assert c.extra["perturbation_l2"][0] <= 0.5 + 1e-5


def test_perturbation_respects_the_l2_bound(backdoored):
    x, _ = tiny_reserve(backdoored, 3).tensors()
    model = backdoored.fresh_model().eval()
    delta = maximise_perturbation(model, x, IBAUParams(norm_bound=1.5), torch.device("cpu"),
                                  torch.Generator().manual_seed(0))
    assert delta.shape == (1, *x.shape[1:]) and float(delta.norm()) <= 1.5 + 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_hypergradient_matches_the_explicit_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    delta = 0.3 * torch.randn(1, 1, 2, 2)
    p = IBAUParams(portion=1.0, fixed_point_steps=3, inner_lr=0.1, pert_reg=1e-3)
    loss, _ = hypergradient_loss(model, x, y, delta, p, torch.Generator().manual_seed(0))
    got = torch.autograd.grad(loss, list(model.parameters()))

    w, b = (t.detach() for t in model.parameters())
    d0 = delta.flatten()

    def outer(d, w, b):
        return F.cross_entropy((x.flatten(1) + d) @ w.T + b, y)

    def phi(d, w, b):
        inner = lambda dd: -F.cross_entropy((x.flatten(1) + dd) @ w.T + b, y) + p.pert_reg * dd.pow(2).sum()  # noqa: E731
        return d - p.inner_lr * torch.func.grad(inner)(d)

    assert float(loss.detach()) == pytest.approx(float(outer(d0, w, b)), rel=1e-6)
    g_d, g_w, g_b = torch.func.grad(outer, argnums=(0, 1, 2))(d0, w, b)
    j_d, j_w, j_b = torch.func.jacrev(phi, argnums=(0, 1, 2))(d0, w, b)
    v = torch.zeros_like(d0)
    for _ in range(p.fixed_point_steps):
        v = j_d.T @ v + g_d
    expected_w = g_w + torch.einsum("i,ijk->jk", v, j_w)
    expected_b = g_b + j_b.T @ v
    assert torch.allclose(got[0], expected_w, atol=1e-6)
    assert torch.allclose(got[1], expected_b, atol=1e-6)


@pytest.mark.parametrize("bad", [
    {"n_rounds": 0}, {"fixed_point_steps": -1}, {"lr": 0}, {"norm_bound": -1.0}, {"portion": 0},
    {"portion": 1.5}, {"pert_reg": -1e-3}, {"batch_size": True}, {"K": 5},
])
def test_invalid_params_raise_spec_error(bad):
    with pytest.raises(SpecError):
        IBAU(**bad)
