"""Deep TAC: the minimal universal flip at a layer below the head, and removal that unlearns it."""

import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import latentguard.defenses.tac as tac
from _defense_util import TARGET, assert_state_equal, backdoored_digits, max_param_change, state_copy
from latentguard.defenses import make_defense
from latentguard.defenses.deep_flip import LayerShift, ball_attack, flip_share, minimal_universal_flip
from latentguard.errors import ModelError, SpecError
from latentguard.latent.qp import minimal_flip_perturbations
from latentguard.models import named_layer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([("body", nn.Linear(6, 12)), ("act", nn.ReLU()), ("head", nn.Linear(12, 4))]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_linear_top_the_search_is_bounded_by_the_exact_qp(seed):
    """Above the ReLU only the head is left, so the exact TAC QP gives the smallest shift flipping every sample."""
    model = _mlp(seed)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z = model.act(model.body(x))
    exact = minimal_flip_perturbations(z.double(), model.head.weight.detach().double(),
                                       model.head.bias.detach().double())
    target = int(np.argmin(exact.norms))
    others = x[model(x).argmax(1) != target]
    flip = minimal_universal_flip(model, "act", others, target, flip_rate=1.0, steps=30, bisections=8)
    assert flip.share == 1.0 and flip.layer == "act" and flip.target == target
    assert float(flip.delta.norm()) <= flip.radius * (1 + 1e-6)
    # the QP over all 40 samples (a superset of ``others``) needs at least as long a shift as any that flips
    # ``others`` alone, so it bounds the search from above; the lower bound only checks the scale
    assert flip.radius > 0.2 * exact.norms[target]
    assert float(flip.delta.norm()) <= 1.5 * exact.norms[target]
    with torch.no_grad():
        shifted = model.head(model.act(model.body(others)) + flip.delta)
    assert bool((shifted.argmax(1) == target).all())
    assert not named_layer(model, "act")._forward_hooks  # the search leaves no hook behind


def test_a_lower_flip_rate_needs_a_shorter_shift():
    model = _mlp(3)
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(3))
    target = 1
    x = x[model(x).argmax(1) != target]
    most = minimal_universal_flip(model, "act", x, target, flip_rate=0.9)
    half = minimal_universal_flip(model, "act", x, target, flip_rate=0.5)
    assert half.share >= 0.5 and most.share >= 0.9
    assert half.radius < most.radius


def test_ball_attack_stays_in_the_ball_and_moves_toward_the_target():
    model = _mlp(4)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(4))
    shift = LayerShift(model, "act")
    try:
        start = torch.full((12,), 100.0)
        delta = ball_attack(model, shift, x, 2, radius=3.0, start=start, steps=5)
        assert float(delta.norm()) <= 3.0 * (1 + 1e-6)
        assert flip_share(model, shift, x, 2, delta) > flip_share(model, shift, x, 2, torch.zeros(12))
    finally:
        shift.remove()
    assert not named_layer(model, "act")._forward_hooks


def test_an_unreachable_target_raises_a_model_error():
    model = _mlp(5)
    with torch.no_grad():
        model.head.weight[0] = 0.0
        model.head.bias[0] = -1e4  # class 0 can never win, whatever the shift
    x = torch.randn(20, 6)
    with pytest.raises(ModelError, match=re.escape("sends 90% of the clean images to class 0: pick a layer nearer")):
        minimal_universal_flip(model, "act", x, 0, max_radius_doublings=3)


def test_a_shift_of_the_wrong_shape_is_refused():
    model = _mlp(6)
    shift = LayerShift(model, "act")
    try:
        with shift.applied(torch.zeros(5)), pytest.raises(ModelError, match="gives \\(12,\\) per sample, not \\(5,\\)"):
            model(torch.randn(2, 6))
    finally:
        shift.remove()


# ----------------------------------------------------------------------------- removal
@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits()


@pytest.fixture(scope="module")
def runs(backdoored):
    """The paper's TAC removal (β = 1, no head shift) with the target given, with and without the deep term (same
    seed, default 10 epochs)."""
    before = state_copy(backdoored.model)
    common = dict(targets=[TARGET], batch_size=64, beta=1.0, head_shift=0.0, distill=0.0)
    plain = make_defense("tac", **common).run(backdoored.model, backdoored.reserve, device="cpu", seed=0)
    deep = make_defense("tac", deep_layer="block3", **common).run(backdoored.model, backdoored.reserve,
                                                                  device="cpu", seed=0)
    return plain, deep, before


def test_deep_removal_records_its_shift_and_leaves_no_hook(backdoored, runs):
    plain, deep, before = runs
    assert_state_equal(backdoored.model, before)
    (info,) = deep.extra["deep"]
    assert info["layer"] == "block3" and info["target"] == TARGET
    assert info["radius"] > 0 and info["flip_share"] >= 0.9
    assert "deep" not in plain.extra
    for model in (deep.model, backdoored.model):
        assert not any(m._forward_hooks for m in model.modules())


def test_the_deep_term_removes_more_of_the_backdoor(backdoored, runs):
    plain, deep, _ = runs
    after_plain, after_deep = backdoored.evaluate(plain.model), backdoored.evaluate(deep.model)
    # measured on this 130-image reserve: plain 75.8 / 8.6 %, with the deep term 80.4 / 4.2 % (ACC / ASR)
    assert after_deep.asr < 0.75 * after_plain.asr
    assert after_deep.acc > after_plain.acc - 0.02


def test_deep_beta_weighs_the_deep_term_alone(backdoored, monkeypatch):
    calls = []
    real = tac._DeepTerms.loss

    def spy(self, model, x, y):
        calls.append(1)
        return real(self, model, x, y)

    monkeypatch.setattr(tac._DeepTerms, "loss", spy)
    common = dict(targets=[TARGET], batch_size=64, epochs=1, deep_layer="block3", min_steps=0)
    make_defense("tac", deep_beta=0.0, **common).run(backdoored.model, backdoored.reserve, device="cpu")
    assert calls == []  # a zero weight skips the deep term's pass
    only_deep = make_defense("tac", beta=0.0, deep_beta=0.5, **common).run(backdoored.model, backdoored.reserve,
                                                                          device="cpu")
    assert len(calls) == 3  # one per batch of the 130-image reserve, even with β = 0
    assert only_deep.params["deep_beta"] == 0.5
    assert max_param_change(only_deep.model, backdoored.model) > 0


def test_an_unknown_deep_layer_names_the_model_layers(backdoored):
    with pytest.raises(ModelError, match="the model has no layer 'blocks3': use one of"):
        make_defense("tac", targets=[TARGET], deep_layer="blocks3", epochs=1).run(
            backdoored.model, backdoored.reserve, device="cpu")


@pytest.mark.parametrize(("bad", "message"), [
    ({"deep_layer": ""}, "tac: parameter deep_layer must be a module name of the model (or null: off), got ''"),
    ({"deep_layer": 3}, "tac: parameter deep_layer must be a module name of the model (or null: off), got 3"),
    ({"deep_flip_rate": 0}, "tac: parameter deep_flip_rate must be in (0, 1], got 0"),
    ({"deep_steps": 0}, "tac: parameter deep_steps must be an integer >= 1, got 0"),
    ({"deep_images": 0}, "tac: parameter deep_images must be an integer >= 1, got 0"),
    ({"deep_beta": -1}, "tac: parameter deep_beta must be a number >= 0 (or null: beta), got -1"),
])
def test_invalid_deep_params_raise_spec_error(bad, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        make_defense("tac", **bad)
