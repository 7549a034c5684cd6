"""Fine-Pruning: dormant channels of the last convolution, holdout-validated, then fine-tuning."""

import json

import pytest
import torch

import latentguard.defenses.fp as fp
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
from latentguard.defenses.tracing import last_feature_map, trace_model
from latentguard.errors import ModelError, SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_trace_finds_conv_bn_pairs_and_last_feature_map(backdoored):
    x, _ = backdoored.reserve.tensors()
    trace = trace_model(backdoored.model, x[:2])
    assert trace.convs[-1] == "block3.0"
    assert trace.conv_bn["block3.0"] == "block3.1"
    assert len(trace.conv_bn) == 5
    assert last_feature_map(trace) == "block3"


def test_runs_prunes_last_conv_and_keeps_architecture(backdoored):
    model = backdoored.fresh_model()
    before = state_copy(model)
    result = make_defense("fp", epochs=1).run(model, backdoored.reserve, device="cpu")
    assert_same_architecture(model, result.model)
    assert_state_equal(model, before)
    ex = result.extra
    assert ex["layer"] == "block3.0" and ex["bn_layer"] == "block3.1" and ex["n_channels"] == 32
    pruned = ex["pruned_channels"]
    sd = result.model.state_dict()
    for key in ("block3.0.weight", "block3.1.weight", "block3.1.bias"):
        assert torch.all(sd[key][pruned] == 0), f"{key} not zero on pruned channels after fine-tuning"
    assert ex["holdout_acc_curve"][0][0] == 0
    json.dumps(result.to_json())


def test_prune_ratio_is_respected_and_changes_the_outcome(backdoored):
    r1 = make_defense("fp", prune_ratio=0.25, epochs=0).run(backdoored.fresh_model(), backdoored.reserve,
                                                             device="cpu")
    r2 = make_defense("fp", prune_ratio=0.5, epochs=0).run(backdoored.fresh_model(), backdoored.reserve,
                                                            device="cpu")
    assert r1.extra["n_pruned"] == 8 and r2.extra["n_pruned"] == 16
    assert set(r1.extra["pruned_channels"]) < set(r2.extra["pruned_channels"])  # same dormancy order
    assert r1.params["prune_ratio"] == 0.25


def test_pruned_channels_are_the_most_dormant(backdoored):
    model = backdoored.fresh_model()
    result = make_defense("fp", prune_ratio=0.25, epochs=0).run(model, backdoored.reserve, device="cpu")
    acts = []
    handle = model.block3[1].register_forward_hook(lambda m, a, o: acts.append(torch.relu(o).mean(dim=(0, 2, 3))))
    with torch.no_grad():
        model(backdoored.reserve.tensors()[0])
    handle.remove()
    dormant = set(torch.argsort(acts[0])[:8].tolist())
    assert len(dormant & set(result.extra["pruned_channels"])) >= 6  # ranking uses the reserve minus its holdout


def test_accuracy_tolerance_controls_how_much_is_pruned(backdoored):
    strict = make_defense("fp", acc_drop=0.0, epochs=0, step=2).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    loose = make_defense("fp", acc_drop=0.5, epochs=0, step=2).run(
        backdoored.fresh_model(), backdoored.reserve, device="cpu")
    assert strict.extra["n_pruned"] <= loose.extra["n_pruned"]
    assert loose.extra["n_pruned"] > 0
    base = loose.extra["holdout_acc_curve"][0][1]
    for k, acc in loose.extra["holdout_acc_curve"]:
        if k <= loose.extra["n_pruned"]:
            assert acc >= base - 0.5 - 1e-9


def test_uses_only_the_reserve(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, fp)
    make_defense("fp", epochs=1, prune_ratio=0.1).run(backdoored.fresh_model(), backdoored.reserve,
                                                       device="cpu")
    assert len(spy.calls) == 1
    data, cfg = spy.calls[0]
    assert len(data) == 130 and rows_subset(data.x, backdoored.reserve.x) and cfg.epochs == 1


def test_named_layer_and_other_architectures():
    model = tiny_arch("preact_resnet18")
    clean = noise_images()
    r = make_defense("fp", epochs=0, prune_ratio=0.5).run(model, clean, device="cpu")
    assert r.extra["layer"] == "layer4.1.conv2" and r.extra["bn_layer"] is None and r.extra["n_pruned"] == 16
    assert torch.all(r.model.state_dict()["layer4.1.conv2.weight"][r.extra["pruned_channels"]] == 0)
    r = make_defense("fp", epochs=0, prune_ratio=0.5, layer="layer4.1.conv1").run(model, clean, device="cpu")
    assert r.extra["layer"] == "layer4.1.conv1" and r.extra["bn_layer"] == "layer4.1.bn2"
    vgg = make_defense("fp", epochs=0, prune_ratio=0.5).run(tiny_arch("vgg16_bn"), clean, device="cpu")
    assert vgg.extra["bn_layer"] is not None
    with pytest.raises(ModelError):
        make_defense("fp", layer="layer4.1.bn2").run(model, clean, device="cpu")
    with pytest.raises(ModelError):
        make_defense("fp", layer="no.such.layer").run(model, clean, device="cpu")
    with pytest.raises(ModelError):
        make_defense("fp").run(tiny_mlp(), clean, device="cpu")


@pytest.mark.parametrize("bad", [
    {"acc_drop": -0.1}, {"acc_drop": 2}, {"prune_ratio": 1.0}, {"prune_ratio": -0.5}, {"step": 0},
    {"holdout_fraction": 0}, {"holdout_fraction": 1}, {"layer": 3}, {"epochs": -1}, {"lr": -1},
])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("fp", **bad)
