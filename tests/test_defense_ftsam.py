"""FT-SAM: the SAM ascent inside ``fit``'s loss function and the defense around it."""

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
from latentguard.defenses.ftsam import FTSAM, FTSAMParams, SAMAscent, bn_statistics_frozen
from latentguard.errors import SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_step_takes_the_gradient_at_the_perturbed_point_and_restores_weights(adaptive):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w0 = [q.detach().clone() for q in model.parameters()]
    rho = 0.5
    sam = SAMAscent(list(model.parameters()), rho, adaptive, label_smoothing=0.0)
    loss, logits = sam.loss(model, x, y)
    loss.backward()
    assert all(torch.equal(q, w) for q, w in zip(model.parameters(), w0, strict=True))  # restored

    w, b = (t.clone().requires_grad_(True) for t in w0)
    g = torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), [w, b])
    if adaptive:
        norm = torch.sqrt(sum(((t.abs() * gt) ** 2).sum() for t, gt in zip(w0, g, strict=True)))
        eps = [rho * t.pow(2) * gt / norm for t, gt in zip(w0, g, strict=True)]
    else:
        norm = torch.sqrt(sum((gt ** 2).sum() for gt in g))
        eps = [rho * gt / norm for gt in g]
    wp, bp = ((t + e).requires_grad_(True) for t, e in zip(w0, eps, strict=True))
    expected = torch.autograd.grad(F.cross_entropy(x @ wp.T + bp, y), [wp, bp])
    for q, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(q.grad, e, atol=1e-6)
    assert torch.allclose(logits, x @ w0[0].T + w0[1], atol=1e-6)
    sam.close()


def test_bn_statistics_unchanged_inside_the_context():
    bn = nn.BatchNorm1d(3).train()
    bn(torch.randn(16, 3))
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with bn_statistics_frozen(bn):
        bn(torch.randn(16, 3) * 5 + 2)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count) and bn.momentum == 0.1


def test_runs_on_the_reserve_only_keeps_architecture_and_input(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    before = copy.deepcopy(backdoored.model)
    result = FTSAM(epochs=2, batch_size=32).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(before, backdoored.model)
    assert_same_architecture(result.model, backdoored.model)
    assert result.params == dataclasses.asdict(FTSAMParams(epochs=2, batch_size=32))
    assert result.params["rho"] == 2.0 and result.params["adaptive"] is True
    assert len(result.extra["history"]["epochs"]) == 2


def test_lowers_asr(backdoored):
    result = FTSAM(epochs=10, batch_size=32).run(backdoored.model, backdoored.reserve, device="cpu")
    ev = backdoored.evaluate(result.model)
    assert ev.asr < backdoored.asr - 0.3 and ev.acc > 0.8


def test_rho_changes_the_outcome(backdoored):
    clean = tiny_reserve(backdoored, 3)
    a = FTSAM(epochs=1, batch_size=16).run(backdoored.model, clean, device="cpu")
    b = FTSAM(epochs=1, batch_size=16, rho=0.05).run(backdoored.model, clean, device="cpu")
    c = FTSAM(epochs=1, batch_size=16, adaptive=False).run(backdoored.model, clean, device="cpu")
    assert max_param_change(a.model, b.model) > 0 and max_param_change(a.model, c.model) > 0


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"rho": 0}, {"rho": -1.0}, {"lr": float("inf")}, {"momentum": 1.0}, {"weight_decay": -1},
    {"label_smoothing": 1.0}, {"adaptive": "yes"}, {"batch_size": 0}, {"rho_max": 2.0},
])
def test_invalid_params_raise_spec_error(bad):
    with pytest.raises(SpecError):
        FTSAM(**bad)
