"""LF: the low-pass universal perturbation, its budget, round-trip, poisoning and parameter validation."""

import math
from functools import partial

import numpy as np
import pytest
import torch

from _attack_util import attack_context, random_images, tiny_cnn
from latentguard.attacks import load_attack, make_attack, save_attack
from latentguard.attacks.lf import dct2, gaussian_low_pass, targeted_deepfool
from latentguard.errors import SpecError

_images = partial(random_images, n=64, c=1, size=16, classes=4, seed=0)
_model = partial(tiny_cnn, 4, c=1, size=16, width=4, seed=0)
_context = partial(attack_context, build_model=_model)


def _lf(**kw):
    kw.setdefault("num_classes", 4)
    kw.setdefault("image_shape", (1, 16, 16))
    params = {"n_images": 16, "max_passes": 2, "deepfool_steps": 5, "fooling_rate": 1.0}
    params.update(kw.pop("params", {}))
    return make_attack("lf", params=params, **kw)


def _high_frequency_share(v: torch.Tensor, cutoff: float) -> float:
    """Share of the (DC-free) DCT energy at normalised radius sqrt((k/H)² + (l/W)²) >= cutoff."""
    spec = dct2(v.double())
    spec[..., 0, 0] = 0
    h, w = v.shape[-2:]
    k = torch.arange(h, dtype=torch.float64)[:, None] / h
    l_ = torch.arange(w, dtype=torch.float64)[None, :] / w
    high = (k**2 + l_**2).sqrt() >= cutoff
    energy = spec.pow(2)
    return float(energy[..., high].sum() / energy.sum().clamp_min(1e-30))


def test_low_pass_filter_is_a_gaussian_blur():
    # a constant passes unchanged; a DCT cosine of frequency f = k/(2n) is scaled by exp(-2π²σ²f²)
    const = torch.full((1, 16, 16), 0.3)
    assert torch.allclose(gaussian_low_pass(const, 3.0), const, atol=1e-6)
    i = torch.arange(16, dtype=torch.float64)
    for k in (1, 4, 12):
        wave = torch.cos(math.pi * (2 * i + 1) * k / 32)[None, :].expand(16, 16)[None]
        gain = math.exp(-2 * math.pi**2 * 9 * (k / 32) ** 2)
        assert torch.allclose(gaussian_low_pass(wave, 3.0), gain * wave, atol=1e-9)
    ii, jj = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((ii + jj) % 2).float()[None] - 0.5
    assert gaussian_low_pass(checker, 3.0).abs().max() < 0.02  # only boundary leakage survives
    noise = torch.randn(1, 16, 16)
    assert _high_frequency_share(noise, 0.5) > 0.3
    assert _high_frequency_share(gaussian_low_pass(noise, 3.0), 0.5) < 1e-6


def test_learned_trigger_is_low_pass_and_within_budget():
    attack = _lf(params={"budget": 0.1})
    assert math.isclose(attack.sigma, 3.0)  # 6 px at 32 px, scaled to 16 px
    attack.prepare(_context(_images()))
    v = attack.trigger
    assert v.shape == (1, 16, 16)
    assert v.min() >= 0 and v.max() <= 0.1 + 1e-6 and v.max() - v.min() > 0.05
    assert _high_frequency_share(v, 0.5) < 1e-4
    x = torch.rand(5, 1, 16, 16)
    out = attack.apply(x)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out, (x + v).clamp(0, 1))
    assert (out - x).abs().max() <= 0.1 + 1e-6


def test_targeted_deepfool_reaches_the_target():
    model = _model().eval()
    x = torch.rand(8, 1, 16, 16)
    target = torch.full((8,), 2)
    r, ok = targeted_deepfool(model, x, target, steps=50, overshoot=0.02)
    assert ok.sum() >= 6
    with torch.no_grad():
        assert torch.all(model(x[ok] + r[ok]).argmax(1) == 2)


def test_prepare_trains_a_clean_model_when_missing():
    ctx = _context(_images(n=32), clean=False)
    attack = _lf(params={"max_passes": 1, "deepfool_steps": 2})
    attack.prepare(ctx)
    assert ctx.clean_model is not None and attack.is_ready


def test_spec_round_trip_with_learned_trigger(tmp_path):
    attack = _lf(seed=4, target=3)
    attack.prepare(_context(_images()))
    save_attack(attack, tmp_path)
    again = load_attack(tmp_path)
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(again.apply(x), attack.apply(x))


def test_unprepared_attack_refuses_to_poison_and_to_load(tmp_path):
    attack = _lf()
    with pytest.raises(SpecError, match="prepared"):
        attack.get_poisoned_dataset(_images())
    save_attack(attack, tmp_path)
    with pytest.raises(SpecError, match="missing"):
        load_attack(tmp_path)


def test_poisoned_indices_and_labels():
    images = _images()
    ctx = _context(images)
    attack = _lf(target=0, rate=0.25)
    attack.prepare(ctx)
    poisoned, idx = attack.get_poisoned_dataset(images)
    assert len(idx) == 16 and np.all(images.y[idx] != 0) and np.all(poisoned.y[idx] == 0)
    rest = np.setdiff1d(np.arange(64), idx)
    assert np.array_equal(poisoned.x[rest], images.x[rest]) and np.array_equal(poisoned.y[rest], images.y[rest])
    expected = np.clip(np.rint(images.x[idx] + attack.trigger.permute(1, 2, 0).numpy() * 255), 0, 255)
    assert np.abs(poisoned.x[idx].astype(int) - expected.astype(int)).max() <= 1

    a2a = _lf(all_to_all=True, rate=0.25)
    a2a.prepare(ctx)
    poisoned, idx = a2a.get_poisoned_dataset(images)
    assert len(idx) == 16 and np.array_equal(poisoned.y[idx], (images.y[idx] + 1) % 4)


@pytest.mark.parametrize(
    "params, word",
    [({"budget": 0}, "budget"), ({"budget": 2}, "budget"), ({"sigma": -1}, "sigma"), ({"n_images": 0}, "n_images"),
     ({"max_passes": 0}, "max_passes"), ({"fooling_rate": 1.5}, "fooling_rate"), ({"overshoot": -1}, "overshoot"),
     ({"deepfool_steps": 2.5}, "deepfool_steps")],
)
def test_invalid_params_name_the_parameter(params, word):
    with pytest.raises(SpecError, match=rf"\b{word}\b"):
        _lf(params=params)
