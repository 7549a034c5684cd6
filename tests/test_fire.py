"""FIRE: the run-time latent repair wrapper, its save/load, the registered defense, and digits end to end."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from latentguard.attacks import make_attack
from latentguard.data import Images, clean_reserve, load_data
from latentguard.defenses import fire
from latentguard.defenses.base import make_defense
from latentguard.defenses.fire import RepairedModel, load_repair, repair, save_repair
from latentguard.defenses.fire import choice as fire_choice
from latentguard.errors import ModelError, SpecError, UnsafeFileError
from latentguard.evaluation import evaluate
from latentguard.latent.directions import class_projection_stats
from latentguard.latent.qp import pairwise_flip_perturbations
from latentguard.metrics import auroc
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit


class Tiny(nn.Module):
    def __init__(self, latent: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, latent), nn.ReLU())
        self.fc = nn.Linear(latent, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _bands(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """6×6 grey images whose class is the brightest of three horizontal bands."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 150, (n, 6, 6, 1))
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 2] += 100
    return x.astype(np.uint8), y


@pytest.fixture(scope="module")
def tiny_trained() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    x, y = _bands(150, 0)
    fit(model, Images(x, y, ["a", "b", "c"]), TrainConfig(epochs=10, batch_size=50, lr=0.05, optimizer="adam", augment=False),
        device="cpu")
    return model.eval()


@pytest.fixture
def tiny(tiny_trained) -> tuple[Tiny, Images, torch.Tensor]:
    model = copy.deepcopy(tiny_trained)
    clean = Images(*_bands(90, 1), ["a", "b", "c"])
    x = torch.from_numpy(_bands(64, 2)[0]).permute(0, 3, 1, 2).float() / 255
    return model, clean, x


def _head_input(model: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    """The input the head actually receives (a forward hook sees it after every pre-hook)."""
    seen = []
    handle = model.fc.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            fn(x)
    finally:
        handle.remove()
    return seen[-1]


# ----------------------------------------------------------------------------- the wrapper's rules
@pytest.mark.parametrize("rule", ["constant", "gated"])
def test_alpha_zero_leaves_outputs_unchanged(tiny, rule):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, rule=rule, alpha=0.0, quantile=0.9, device="cpu")
    assert not wrapper.active
    with torch.no_grad():
        assert torch.equal(wrapper(x), model(x))


def test_constant_shift_moves_latents_by_exactly_alpha_beta(tiny):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=2, rule="constant", alpha=0.7, device="cpu")
    beta = wrapper.directions["penultimate"]
    assert beta.shape == (1, 8) and beta.norm() > 0
    moved = _head_input(model, wrapper, x) - _head_input(model, model, x)
    assert torch.allclose(moved, -0.7 * beta[0].expand_as(moved), atol=1e-6)
    with torch.no_grad():  # and the rest of the network runs on the shifted latent
        assert torch.allclose(wrapper(x), model.fc(model.body(x) - 0.7 * beta[0]), atol=1e-6)


@pytest.mark.parametrize("gate", ["neutral", "predicted"])
@pytest.mark.parametrize("layer", [None, "body.4"])
def test_gated_rule_leaves_inputs_below_threshold_bit_identical(tiny, gate, layer):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, layer=layer, gate=gate, alpha=2.0, quantile=0.5, per_source=False,
                     device="cpu")
    name = layer or "penultimate"
    proj, cls = wrapper.projections(x)
    tau = wrapper.thresholds[name][0]
    below = proj[name][:, 0] < tau[cls]
    assert 0 < int(below.sum()) < len(x)  # both kinds present
    with torch.no_grad():
        out, ref = wrapper(x), model(x)
    assert torch.equal(out[below], ref[below])
    assert not torch.equal(out[~below], ref[~below])


@pytest.mark.parametrize("floor", [False, True])
def test_gated_rule_removes_alpha_times_the_excess(tiny, floor):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=0, gate="predicted", floor=floor, alpha=3.0, quantile=0.6, per_source=False,
                     device="cpu")
    z = _head_input(model, model, x)
    unit = wrapper.directions["penultimate"][0] / wrapper.directions["penultimate"][0].norm()
    pred = model.fc(z).argmax(1)
    proj = z @ unit
    excess = (proj - wrapper.thresholds["penultimate"][0][pred]).clamp_min(0)
    amount = 3.0 * excess  # x̃ = x − α·max(0, π − τ_c)·β̂
    if floor:  # ... but never past the clean mean of the class
        amount = torch.minimum(amount, torch.maximum(excess, proj - wrapper._mu0[0][pred]))
    assert (excess > 0).any() and (not floor or (amount < 3.0 * excess).any())
    assert torch.allclose(_head_input(model, wrapper, x), z - amount[:, None] * unit, atol=1e-5)


def test_thresholds_are_per_class_clean_quantiles(tiny):
    model, clean, x = tiny
    wrapper = repair(model, clean, source="unpaired", poisoned=x[:10], gate="predicted", alpha=1.0, quantile=0.8,
                     augment=2, device="cpu")
    xc, _ = clean.tensors()
    with torch.no_grad():
        z = model.body(xc)
        pred = model.fc(z).argmax(1)
    unit = wrapper.directions["penultimate"].double()
    unit = unit / unit.norm(dim=1, keepdim=True)
    tau, mu, sd = class_projection_stats(z.double() @ unit.T, pred, 3, 0.8)
    assert torch.allclose(wrapper.thresholds["penultimate"], tau.float(), atol=1e-5)
    # the thresholds only look at clean images and the model's predictions: labels and the suspicious
    # samples' number do not enter them once the direction is fixed
    relabelled = Images(clean.x, np.roll(clean.y, 1), clean.class_names)
    again = RepairedModel(model, layers=["penultimate"], directions=wrapper.directions, alphas={"penultimate": 1.0},
                          gate="predicted", quantile=0.8, head="fc").calibrate(relabelled)
    assert torch.allclose(again.thresholds["penultimate"], wrapper.thresholds["penultimate"])
    score = wrapper.score(xc)
    expected = ((z.double() @ unit.T)[:, 0] - mu[0, pred]) / sd[0, pred]
    assert torch.allclose(score.double(), expected, atol=1e-4)


def test_several_targets_and_intermediate_shapes(tiny):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=[0, 2], layer=["body.0", "penultimate"], alpha=1.0, quantile=0.9,
                     device="cpu")
    assert wrapper.directions["body.0"].shape == (2, 4, 6, 6)  # the layer output's shape
    assert wrapper.directions["penultimate"].shape == (2, 8)
    assert wrapper.thresholds["body.0"].shape == (2, 3)
    with torch.no_grad():
        assert wrapper(x).shape == (64, 3)
    assert wrapper.score(x).shape == (64,)


def test_wrapper_follows_dtype_and_device_moves(tiny):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, alpha=2.0, quantile=0.5, device="cpu")
    with torch.no_grad():
        out32 = wrapper(x)
        wrapper.double()  # the buffers and the cached head tensors follow
        out64 = wrapper(x.double())
    assert out64.dtype == torch.float64
    assert torch.allclose(out64.float(), out32, atol=1e-4)


def test_centroid_source_is_the_class_mean_offset(tiny):
    model, clean, _ = tiny
    wrapper = repair(model, clean, target=2, source="centroid", alpha=1.0, quantile=0.9, device="cpu")
    with torch.no_grad():
        z = model.body(clean.tensors()[0])
        pred = model.fc(z).argmax(1)
    expected = z[pred == 2].mean(0) - z[pred != 2].mean(0)
    assert torch.allclose(wrapper.directions["penultimate"][0], expected, atol=1e-5)


def test_centroid_of_a_class_the_model_never_predicts_uses_the_labels(tiny):
    model, clean, _ = tiny
    with torch.no_grad():
        model.fc.bias[2] -= 1e3  # no clean image is predicted as class 2 any more
        z = model.body(clean.tensors()[0])
        assert not bool((model.fc(z).argmax(1) == 2).any())
    wrapper = repair(model, clean, target=2, source="centroid", alpha=1.0, quantile=0.9, device="cpu")
    y = torch.as_tensor(clean.y)
    expected = z[y == 2].mean(0) - z[y != 2].mean(0)
    assert torch.allclose(wrapper.directions["penultimate"][0], expected, atol=1e-5)
    assert wrapper.info["centroid_from_labels"] == [2]


def test_per_source_stage_moves_flagged_inputs_along_their_source_direction(tiny):
    model, clean, x = tiny
    p, alpha = 1, 2.0
    wrapper = repair(model, clean, target=p, gate="predicted", alpha=alpha, quantile=0.6, per_source=True, device="cpu")
    shared = repair(model, clean, target=p, gate="predicted", alpha=alpha, quantile=0.6, per_source=False, device="cpu")
    xc, yc = clean.tensors()
    with torch.no_grad():
        zc = model.body(xc)
    # the directions are the pairwise QP's s_{a→p}, on the reserve's labelled latents (zero for a = p)
    pairs = pairwise_flip_perturbations(zc.double().numpy(), yc.numpy(), model.fc.weight.detach().double().numpy(),
                                        model.fc.bias.detach().double().numpy())
    src = wrapper._srcbeta0[0]
    assert torch.allclose(src[0], torch.from_numpy(pairs.perturbations[0, p]).float(), atol=1e-5)
    assert not bool(src[p].any())
    # thresholds: τ_flag over every clean input, τ_{a→p} over the clean inputs of (gate) class a
    unit = shared.directions["penultimate"][0] / shared.directions["penultimate"][0].norm()
    pred = model.fc(zc).argmax(1)
    assert torch.allclose(wrapper._flagtau0[0], torch.quantile((zc @ unit).double(), 0.6).float(), atol=1e-5)
    u0 = src[0] / src[0].norm()
    assert torch.allclose(wrapper._srctau0[0, 0], torch.quantile((zc[pred == 0] @ u0).double(), 0.6).float(), atol=1e-5)
    # the rule: after the shared shift, flagged inputs lose α·max(0, ⟨z₁, û_{a→p}⟩ − τ_{a→p}) along û_{a→p},
    # with a the best class but p on the unrepaired latent; the others keep the shared result exactly
    z = _head_input(model, model, x)
    z1 = _head_input(model, shared, x)
    flag = z @ unit > wrapper._flagtau0[0]
    others = model.fc(z).detach().clone()
    others[:, p] = -float("inf")
    a = others.argmax(1)
    units = wrapper._srcunit0[0][a]
    excess = ((z1 * units).sum(1) - wrapper._srctau0[0][a]).clamp_min(0) * flag
    assert 0 < int(flag.sum()) < len(x) and bool((excess > 0).any())
    got = _head_input(model, wrapper, x)
    assert torch.allclose(got, z1 - alpha * excess[:, None] * units, atol=1e-5)
    assert torch.equal(got[~flag], z1[~flag])


def test_per_source_argument_errors(tiny):
    model, clean, _ = tiny
    for kwargs in ({"rule": "constant"}, {"layer": "body.4"}, {"source": "centroid"}):
        with pytest.raises(SpecError, match="per_source needs"):
            repair(model, clean, target=1, per_source=True, device="cpu", **kwargs)
    assert repair(model, clean, target=1, alpha=1.0, quantile=0.9, device="cpu").per_source  # on by default here
    assert not repair(model, clean, target=1, rule="constant", alpha=1.0, device="cpu").per_source
    with pytest.raises(SpecError, match="per_source must be"):
        repair(model, clean, target=1, per_source="yes", device="cpu")
    with pytest.raises(SpecError, match="per_source"):
        make_defense("fire", per_source=True, rule="constant")


def test_repair_argument_errors(tiny):
    model, clean, _ = tiny
    with pytest.raises(SpecError, match="needs suspicious samples"):
        repair(model, clean, source="paired", device="cpu")
    with pytest.raises(SpecError, match="unknown rule"):
        repair(model, clean, rule="shift", device="cpu")
    with pytest.raises(SpecError, match="target"):
        repair(model, clean, target=5, device="cpu")
    with pytest.raises(ModelError, match="no layer"):
        repair(model, clean, target=0, layer="nope", device="cpu")
    with pytest.raises(SpecError, match="one triggered image per clean image"):
        repair(model, clean, source="paired", poisoned=torch.rand(3, 1, 6, 6), device="cpu")


# ----------------------------------------------------------------------------- save / load
def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, torch.Tensor | str | int | float | bool)


@pytest.mark.parametrize("kwargs", [{}, {"rule": "constant"}, {"layer": ["body.0", "penultimate"]}, {"per_source": True}])
def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path, kwargs):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, alpha=1.5, quantile=0.7, device="cpu", **kwargs)
    path = save_repair(wrapper, tmp_path / "fire.pt")
    raw = torch.load(path, weights_only=True)  # tensors and plain metadata only
    assert _plain(raw) and raw["format"] == "latentguard.fire/1"
    assert not any(k.startswith(("body", "fc", "model")) for k in raw)  # no model weights
    loaded = load_repair(model, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), wrapper(x))
    assert torch.equal(loaded.score(x), wrapper.score(x))
    assert loaded.alphas == wrapper.alphas and loaded.targets == [1]
    assert loaded.per_source == wrapper.per_source == (kwargs.get("rule", "gated") == "gated" and "layer" not in kwargs)
    with pytest.raises(SpecError, match="calibrate"):
        loaded.observe(x)  # online refinement needs clean reference data again
    loaded.calibrate(clean)
    assert loaded.observe(x, threshold=-1e9) == len(x)


def test_safetensors_repair_file_round_trip_and_corruption(tiny, tmp_path):
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, alpha=1.5, quantile=0.7, device="cpu")
    path = save_repair(wrapper, tmp_path / "fire.safetensors")
    loaded = load_repair(model, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), wrapper(x))
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.safetensors.*repair"):
        load_repair(model, tmp_path / "truncated.safetensors")


def test_load_refuses_mismatched_shapes_with_one_line_errors(tiny, tmp_path):
    model, clean, _ = tiny
    path = save_repair(repair(model, clean, target=1, alpha=1.0, quantile=0.9, device="cpu"), tmp_path / "r.pt")
    with pytest.raises(ModelError, match="another model") as exc:
        load_repair(Tiny(latent=16), path)
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="another model"):
        load_repair(Tiny(classes=5), path)
    with pytest.raises(ModelError, match="no layer"):
        load_repair(Tiny(), path, head="classifier")


def test_load_checks_intermediate_layer_shapes(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clean = Images(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 4, list("abcd"))
    small = build_model("small_cnn", 4, in_channels=1, image_size=8, width=4)
    wrapper = repair(small, clean, target=0, layer="block3", rule="constant", alpha=1.0, device="cpu")
    path = save_repair(wrapper, tmp_path / "b3.pt")
    load_repair(small, path)  # fits
    wider = build_model("small_cnn", 4, in_channels=1, image_size=8, width=8)
    with pytest.raises(ModelError, match="block3.*another model"):
        load_repair(wider, path)


def test_load_refuses_pickled_objects_and_other_files(tiny, tmp_path):
    model, clean, _ = tiny
    state = repair(model, clean, target=1, alpha=1.0, quantile=0.9, device="cpu").state()
    state["evil"] = Tiny()  # an object needing unpickling of a class
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="refused"):
        load_repair(model, tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError):
        load_repair(model, tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a FIRE repair file"):
        load_repair(model, tmp_path / "other.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(ModelError):
        load_repair(model, tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- the registered defense
def test_fire_defense_runs_on_the_clean_reserve(tiny):
    model, clean, x = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = make_defense("fire", target=1, alpha=1.0, quantile=0.9).run(model, clean, device="cpu")
    assert result.name == "fire" and result.kind == "runtime"
    assert isinstance(result.model, RepairedModel)
    assert result.input_score(x).shape == (64,)
    assert result.params["rule"] == "gated" and result.extra["targets"] == [1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    with pytest.raises(SpecError, match="rule"):
        make_defense("fire", rule="shift")
    with pytest.raises(SpecError, match="suspicious samples"):
        make_defense("fire", source="paired")
    with pytest.raises(SpecError, match="alpha"):
        make_defense("fire", alpha=-1.0)


def test_synthetic_selection_counts_what_asr_counts(tiny):
    """``select="left"`` scores a candidate by the synthetic inputs it moves off the prediction their trigger
    caused (x + β and x + 2β); ``"restored"`` by those of x + β brought back to their clean prediction."""
    model, clean, x = tiny
    wrapper = repair(model, clean, target=1, alpha=1.0, quantile=0.9, per_source=False, device="cpu")
    held = fire._Inputs(wrapper, x, 64, torch.device("cpu"))
    base = held.predict(repaired=False)
    left = fire._Restoration(wrapper, held, base, "left")
    restored = fire._Restoration(wrapper, held, base, "restored")
    assert len(left.cases) == 2 and len(restored.cases) == 1  # scales (1, 2) against (1,)
    assert left.flipped > restored.flipped > 0
    beta = wrapper.directions["penultimate"][0]
    for (_hook, xs, ys, bad), scale in zip(left.cases, fire.SYNTHETIC_SCALES, strict=True):
        z = _head_input(model, model, xs.x) + scale * beta  # the synthetic trigger, computed by hand
        assert torch.equal(bad, model.fc(z).argmax(1)) and bool((bad != ys).all())
    wrapper.set_alpha(0.0)  # no repair: nothing undone
    assert left.count() == restored.count() == 0
    for a in (1.0, 4.0, 16.0):
        wrapper.set_alpha(a)
        # every input restored to its clean prediction has also left the triggered one
        assert left.count() >= restored.count()
    wrapper.set_alpha(16.0)
    assert left.count() > 0
    with pytest.raises(SpecError, match="select"):
        repair(model, clean, target=1, select="best", device="cpu")
    with pytest.raises(SpecError, match="select"):
        make_defense("fire", select="best")


@pytest.mark.parametrize("source", ["qp", "centroid"])
@pytest.mark.parametrize("rule", ["gated", "constant"])
def test_fast_choice_on_head_latents_matches_full_passes(tiny, monkeypatch, rule, source):
    model, clean, x = tiny
    captured = []
    capture = fire_choice._head_inputs  # patched where _Inputs looks them up (the choice module)
    monkeypatch.setattr(fire_choice, "_head_inputs", lambda *a: captured.append(capture(*a)) or captured[-1])
    built, n_captured = {}, {}
    for fast in (True, False):
        monkeypatch.setattr(fire_choice, "_FAST_CHOICE", fast)
        built[fast] = repair(model, clean, target=[1, 2], rule=rule, source=source, batch_size=16, device="cpu")
        n_captured[fast] = len(captured)
    assert captured and all(c is not None for c in captured)  # the fast run really used cached latents
    assert n_captured[False] == n_captured[True]  # and the full run really made full passes
    fast, full = built[True], built[False]
    assert fast.alphas == full.alphas and fast.quantile == full.quantile
    assert fast.info["synthetic_flipped"] == full.info["synthetic_flipped"] > 0
    assert len(fast.info["candidates"]) == len(full.info["candidates"]) > 1
    for a, b in zip(fast.info["candidates"], full.info["candidates"], strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    with torch.no_grad():
        assert torch.equal(fast(x).argmax(1), full(x).argmax(1))
        assert torch.equal(fast(x), full(x))


def test_fast_choice_falls_back_when_the_output_is_not_the_heads(tiny):
    model, clean, _ = tiny

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * 1.0

    wrapper = repair(Scaled(), clean, target=1, alpha=1.0, quantile=0.9, device="cpu")
    assert fire._head_inputs(wrapper, clean.tensors()[0], 32, torch.device("cpu")) is None
    assert fire._head_inputs(repair(model, clean, target=1, alpha=1.0, quantile=0.9, device="cpu"),
                             clean.tensors()[0], 32, torch.device("cpu")) is not None


# ----------------------------------------------------------------------------- digits, end to end
@pytest.fixture(scope="module")
def digits_badnets():
    torch.manual_seed(0)
    data = load_data("digits")
    attack = make_attack("badnets", num_classes=10, image_shape=(1, 16, 16), target=0, rate=0.1)
    poisoned, idx = attack.get_poisoned_dataset(data.train)
    model = build_model("small_cnn", 10, in_channels=1, image_size=16, width=16)
    fit(model, poisoned, TrainConfig(epochs=6, batch_size=64, lr=0.05, augment=False), device="cpu")
    model.eval()
    clean = data.train.subset(clean_reserve(data.train, 0.15, exclude=idx))
    backdoor = attack.get_backdoor_test_set(data.test)
    before = evaluate(model, data.test, backdoor_set=backdoor, device="cpu")
    assert before.asr > 0.6 and before.acc > 0.9  # a working backdoor
    return model, clean, data.test, attack, backdoor, before


def _auroc(wrapper, test, backdoor) -> float:
    s_clean, s_trig = wrapper.score(test.tensors()[0]), wrapper.score(backdoor[0])
    return auroc(torch.cat([s_trig, s_clean]).numpy(), np.r_[np.ones(len(s_trig)), np.zeros(len(s_clean))])


def test_digits_gated_repair_lowers_asr_and_keeps_acc(digits_badnets):
    model, clean, test, _, backdoor, before = digits_badnets
    wrapper = repair(model, clean, target=0, device="cpu")  # α and quantile chosen on the clean reserve
    after = evaluate(wrapper, test, backdoor_set=backdoor, device="cpu")
    assert wrapper.per_source and wrapper.info["select"] == "left"  # the defaults at the penultimate layer
    assert after.asr < 0.2 * before.asr
    assert after.acc >= before.acc - 0.03
    assert _auroc(wrapper, test, backdoor) > 0.9
    assert wrapper.info["cv_acc_after"] >= wrapper.info["cv_acc_before"] - 0.02
    # the earlier rule stops at a smaller α: more triggered inputs get their true label back, more stay on p
    restoring = repair(model, clean, target=0, select="restored", device="cpu")
    kept = evaluate(restoring, test, backdoor_set=backdoor, device="cpu")
    assert restoring.alphas["penultimate"] < wrapper.alphas["penultimate"]
    assert kept.ra > before.ra + 0.3 and kept.ra > after.ra
    assert after.asr < kept.asr < 0.5 * before.asr
    assert kept.acc >= before.acc - 0.03


def test_digits_shared_stage_alone_lowers_asr_and_keeps_acc(digits_badnets):
    model, clean, test, _, backdoor, before = digits_badnets
    wrapper = repair(model, clean, target=0, per_source=False, device="cpu")
    after = evaluate(wrapper, test, backdoor_set=backdoor, device="cpu")
    assert not wrapper.per_source and not wrapper.info["per_source"]
    assert after.asr < 0.5 * before.asr
    assert after.acc >= before.acc - 0.03


def test_digits_paired_and_online_refinement(digits_badnets):
    model, clean, test, attack, backdoor, before = digits_badnets
    triggered = attack.apply(clean.tensors()[0])
    paired = repair(model, clean, source="paired", poisoned=triggered, device="cpu")
    assert evaluate(paired, test, backdoor_set=backdoor, device="cpu").asr < 0.5 * before.asr
    # α and quantile: among candidates within tolerance, the most real triggered copies moved off the target wins
    info = paired.info
    with torch.no_grad():
        flips = int((model(triggered).argmax(1) != model(clean.tensors()[0]).argmax(1)).sum())
    assert info["observed_flipped"] == flips > 0
    feasible = [c for c in info["candidates"] if c["ok"]]
    best = max(feasible, key=lambda c: (round(c["observed_left"], 9), round(c["observed_restored"], 9),
                                        round(c["synthetic"], 9), -c["alpha"], c["quantile"]))
    assert (paired.alphas["penultimate"], paired.quantile) == (best["alpha"], best["quantile"])
    assert info["observed_left"] == pytest.approx(best["observed_left"]) and best["observed_left"] > 0.5
    assert info["observed_restored"] == pytest.approx(best["observed_restored"])
    # unpaired: the suspicious images predicted as their most frequent class (the target) count; none can be
    # "restored" (no clean partner), so moving them off that class decides
    suspicious = backdoor[0][:60]
    unpaired = repair(model, clean, source="unpaired", poisoned=suspicious, device="cpu")
    with torch.no_grad():
        pred = model(suspicious.float() / 255).argmax(1)
    assert unpaired.info["observed_flipped"] == int((pred == 0).sum()) > 30
    assert unpaired.info["observed_restored"] == 0.0 and unpaired.info["observed_left"] > 0.5
    assert evaluate(unpaired, test, backdoor_set=backdoor, device="cpu").asr < 0.5 * before.asr
    # start from the clean-data direction, then observe a stream of clean and triggered inputs
    wrapper = repair(model, clean, target=0, device="cpu")
    half = len(backdoor[0]) // 2
    rest = tuple(t[half:] for t in backdoor)
    asr_before = evaluate(wrapper, test, backdoor_set=rest, device="cpu").asr
    stream = torch.cat([test.tensors()[0][:200], backdoor[0][:half].float() / 255])
    stream = stream[torch.randperm(len(stream), generator=torch.Generator().manual_seed(0))]
    flagged = sum(wrapper.observe(stream[s : s + 32]) for s in range(0, len(stream), 32))
    assert flagged > half // 3
    after = evaluate(wrapper, test, backdoor_set=rest, device="cpu")
    assert after.asr < asr_before and after.acc >= before.acc - 0.03


def test_evaluating_a_wrapper_leaves_its_model_in_eval_mode(digits_badnets):
    # a wrapper used to start in train mode, and restoring that flag after evaluation switched the wrapped
    # model's BatchNorm to batch statistics: every later call of the model itself changed its predictions
    model, clean, test, _, backdoor, _ = digits_badnets
    wrapper = repair(model, clean, target=0, device="cpu")
    assert not wrapper.training and not model.training
    x = test.tensors()[0][:64]
    with torch.no_grad():
        before = model(x)
    evaluate(wrapper, test, backdoor_set=backdoor, device="cpu")
    assert not model.training and all(not m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
