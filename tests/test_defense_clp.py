"""Channel Lipschitzness-based Pruning (data-free)."""

import json

import pytest
import torch
from torch import nn

import latentguard.defenses.clp  # noqa: F401  (registration)
from _defense_util import (
    NARROW,
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    noise_images,
    state_copy,
    tiny_arch,
    tiny_mlp,
)
from latentguard.defenses.base import make_defense
from latentguard.defenses.clp import channel_lipschitz_upper_bound
from latentguard.errors import ModelError, SpecError


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(**NARROW)


def test_uclc_is_the_spectral_norm_of_the_bn_scaled_kernel():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 2)
    got = channel_lipschitz_upper_bound(conv, bn)
    for k in range(4):
        w = conv.weight[k].reshape(3, -1) * (bn.weight[k] / (bn.running_var[k] + bn.eps).sqrt()).abs()
        assert torch.isclose(got[k], torch.linalg.svdvals(w.detach())[0], rtol=1e-5)


def test_runs_keeps_architecture_and_input_model(backdoored):
    model = backdoored.fresh_model()
    before = state_copy(model)
    result = make_defense("clp").run(model, backdoored.reserve, device="cpu")
    assert_same_architecture(model, result.model)
    assert_state_equal(model, before)
    assert result.params == {"u": 3.0, "layers": None, "bare_convs": False}
    assert len(result.extra["layers"]) == 5
    json.dumps(result.to_json())
    sd = result.model.state_dict()
    for conv, idx in result.extra["pruned"].items():
        bn = {p["conv"]: p["bn"] for p in result.extra["layers"]}[conv]
        assert torch.all(sd[f"{bn}.weight"][idx] == 0) and torch.all(sd[f"{bn}.bias"][idx] == 0)


def test_prunes_a_planted_high_lipschitz_channel():
    model = tiny_arch("small_cnn")
    with torch.no_grad():
        model.block3[1].weight[5] *= 50.0  # channel 5 of the last conv-BN pair (16 channels) becomes an outlier
    result = make_defense("clp").run(model, noise_images(), device="cpu")
    assert 5 in result.extra["pruned"]["block3.0"]
    assert result.model.block3[1].weight[5] == 0 and result.model.block3[1].bias[5] == 0


def test_is_data_free(backdoored):
    a = make_defense("clp", u=1.0).run(backdoored.fresh_model(), backdoored.reserve, device="cpu").model
    b = make_defense("clp", u=1.0).run(backdoored.fresh_model(), noise_images(seed=3), device="cpu").model
    assert_state_equal(a, state_copy(b))


def test_u_controls_how_much_is_pruned(backdoored):
    counts = [make_defense("clp", u=u).run(backdoored.fresh_model(), backdoored.reserve, device="cpu")
              .extra["n_pruned"] for u in (0.0, 1.0, 3.0)]
    assert counts[0] >= counts[1] >= counts[2]
    assert counts[0] > counts[2]


def test_layers_bare_convs_and_architectures(backdoored):
    r = make_defense("clp", u=0.0, layers=["block3.0"]).run(backdoored.fresh_model(), backdoored.reserve,
                                                              device="cpu")
    assert list(r.extra["pruned"]) == ["block3.0"]
    pre = make_defense("clp").run(tiny_arch("preact_resnet18"), noise_images(), device="cpu")
    assert {"conv": "layer1.0.conv1", "bn": "layer1.0.bn2"} in pre.extra["layers"]
    assert all(p["bn"] is not None for p in pre.extra["layers"])
    with pytest.raises(ModelError):
        make_defense("clp").run(tiny_arch("vit_tiny"), noise_images(), device="cpu")  # no conv-BN pair
    vit = make_defense("clp", bare_convs=True, u=1.0).run(tiny_arch("vit_tiny"), noise_images(), device="cpu")
    assert vit.extra["layers"] == [{"conv": "patch_embed", "bn": None}]
    for idx in vit.extra["pruned"].get("patch_embed", []):
        assert torch.all(vit.model.patch_embed.weight[idx] == 0)
    with pytest.raises(ModelError):
        make_defense("clp").run(tiny_mlp(), noise_images(), device="cpu")
    with pytest.raises(ModelError):
        make_defense("clp", layers=["block3.1"]).run(backdoored.fresh_model(), backdoored.reserve,
                                                     device="cpu")


@pytest.mark.parametrize("bad", [{"u": -1}, {"u": float("inf")}, {"u": "3"}, {"layers": []}, {"layers": [1]},
                                 {"bare_convs": 1}, {"threshold": 3}])
def test_invalid_parameters(bad):
    with pytest.raises(SpecError):
        make_defense("clp", **bad)
