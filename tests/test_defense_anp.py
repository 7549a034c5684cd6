"""Adversarial Neuron Pruning: masks under adversarial neuron perturbation, pruned by threshold."""

import json

import pytest
import torch
from torch import nn

import latentguard.defenses.anp as anp
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
from latentguard.defenses.anp import _NeuronPerturbation
from latentguard.defenses.base import holdout_split, make_defense
from latentguard.errors import ModelError, SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_hook_equals_perturbed_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 4, 3, 3)
    x_hat = (x - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    pt = _NeuronPerturbation(bn, torch.device("cpu"))
    with torch.no_grad():
        pt.mask.copy_(torch.tensor([1.0, 0.5, 0.0, 0.8]))
    pt.noise_w = torch.tensor([0.1, -0.2, 0.3, 0.0])
    pt.noise_b = torch.tensor([0.4, 0.0, -0.4, 0.1])
    pt.perturbed = True
    expected = x_hat * (bn.weight * (pt.mask + pt.noise_w)).view(1, -1, 1, 1) + (bn.bias * (1 + pt.noise_b)).view(1, -1, 1, 1)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    pt.perturbed = False
    expected = x_hat * (bn.weight * pt.mask).view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    pt.remove()
    assert torch.allclose(bn(x), x_hat * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1), atol=1e-5)


def test_runs_keeps_architecture_input_model_and_bn_statistics(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, anp)
    model = backdoored.fresh_model()
    before = state_copy(model)
    result = make_defense("anp", iterations=4, batch_size=64).run(model, backdoored.reserve, device="cpu")
    assert_same_architecture(model, result.model)
    assert_state_equal(model, before)
    assert result.extra["mask_steps"] == 4 and result.params["iterations"] == 4
    json.dumps(result.to_json())
    data, cfg = spy.calls[0]
    # 4 batches drawn with replacement
    assert rows_subset(data.x, backdoored.reserve.x) and len(data) == 4 * 64
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.schedule) == (0.2, 0.9, 64, "constant")
    sd, sd0 = result.model.state_dict(), before
    for name, idx in result.extra["pruned"].items():
        assert torch.all(sd[f"{name}.weight"][idx] == 0)
    for k in sd:  # only BatchNorm scales of pruned neurons differ; running statistics are restored
        if not k.endswith(".weight") or k[: -len(".weight")] not in result.extra["pruned"]:
            assert torch.equal(sd[k], sd0[k]), k


def test_zero_iterations_keep_masks_at_one_and_prune_nothing(backdoored):
    model = backdoored.fresh_model()
    result = make_defense("anp", iterations=0).run(model, backdoored.reserve, device="cpu")
    assert result.extra["n_pruned"] == 0 and result.extra["mask_steps"] == 0
    assert_state_equal(result.model, state_copy(model))


def test_threshold_controls_pruning(backdoored):
    low = make_defense("anp", iterations=6, batch_size=64, threshold=0.0).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    high = make_defense("anp", iterations=6, batch_size=64, threshold=1.0).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    assert low.extra["n_pruned"] == 0
    assert high.extra["n_pruned"] > 0
    assert high.extra["threshold"] == 1.0


def test_threshold_chosen_on_the_holdout_only(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, anp)
    r = make_defense("anp", iterations=4, batch_size=64, threshold=None, acc_drop=0.05).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    data, _ = spy.calls[0]
    mask_part, holdout = holdout_split(backdoored.reserve, 0.2, seed=0)
    assert rows_subset(data.x, mask_part.x)  # masks are learned without the holdout
    assert not rows_subset(holdout.x[:1], data.x)
    assert r.extra["threshold_chosen_on_holdout"] is True
    curve = dict(r.extra["holdout_acc_curve"])
    assert r.extra["threshold"] in curve
    base = r.extra["holdout_acc_curve"][0][1]
    assert all(acc >= base - 0.05 - 1e-9 for thr, acc in curve.items() if thr <= r.extra["threshold"])


def test_other_architectures_and_missing_batchnorm():
    r = make_defense("anp", iterations=2, batch_size=40).run(tiny_arch("preact_resnet18"), noise_images(),
                                                             device="cpu")
    assert r.extra["n_neurons"] > 0
    with pytest.raises(ModelError):
        make_defense("anp").run(tiny_mlp(), noise_images(), device="cpu")
    with pytest.raises(ModelError):
        make_defense("anp").run(tiny_arch("vit_tiny"), noise_images(), device="cpu")
    with pytest.raises(ModelError):
        make_defense("anp", layers=["block3.0"]).run(tiny_arch("small_cnn"), noise_images(), device="cpu")
    r = make_defense("anp", iterations=1, layers=["block3.1"]).run(tiny_arch("small_cnn"), noise_images(),
                                                                   device="cpu")
    assert r.extra["n_neurons"] == 16


@pytest.mark.parametrize("bad", [
    {"eps": -0.1}, {"alpha": 1.5}, {"anp_steps": 0}, {"mask_lr": 0}, {"iterations": -1}, {"batch_size": 0},
    {"threshold": 1.2}, {"acc_drop": -1}, {"holdout_fraction": 1.0}, {"layers": []}, {"augment": None},
])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("anp", **bad)
