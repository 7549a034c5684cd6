"""Estimators of latent backdoor directions (latentguard.latent.directions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from latentguard.errors import LatentGuardError
from latentguard.latent.directions import (
    OnlineDirection,
    class_mean_direction,
    class_projection_stats,
    layer_flip_delta,
    paired_direction,
    qp_direction,
    unit_directions,
    unpaired_direction,
)
from latentguard.latent.qp import minimal_flip_perturbations


def _planted(n=200, shape=(6, 3), seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(shape, generator=g, dtype=torch.float64)
    clean = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    triggered = clean + beta + noise * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    return clean, triggered, beta


# ----------------------------------------------------------------------------- paired / unpaired
def test_paired_mean_difference_recovers_the_planted_direction():
    clean, triggered, beta = _planted()
    est = paired_direction(clean, triggered)
    assert est.shape == beta.shape
    assert torch.allclose(est, beta, atol=0.02)
    assert torch.allclose(est, (triggered - clean).mean(dim=0))  # exactly the mean of the differences


def test_paired_pca_is_robust_to_pairs_that_do_not_move():
    clean, triggered, beta = _planted(n=300)
    triggered[:60] = clean[:60] + 0.3 * torch.randn_like(clean[:60])  # a fifth of pairs without the shift
    est = paired_direction(clean, triggered, method="pca")
    cos = torch.dot(est.flatten(), beta.flatten()) / (est.norm() * beta.norm())
    assert cos > 0.99
    assert torch.dot(est.flatten(), beta.flatten()) > 0  # oriented along the shift


def test_paired_rejects_mismatched_pairs_and_unknown_method():
    clean, triggered, _ = _planted(n=10)
    with pytest.raises(LatentGuardError, match="same shape"):
        paired_direction(clean, triggered[:9])
    with pytest.raises(LatentGuardError, match="unknown method"):
        paired_direction(clean, triggered, method="median")
    with pytest.raises(LatentGuardError, match="NaN"):
        paired_direction(clean, triggered * float("nan"))


def test_unpaired_difference_of_means():
    g = torch.Generator().manual_seed(1)
    beta = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    clean = torch.randn(500, 3, generator=g, dtype=torch.float64)
    suspicious = torch.randn(80, 3, generator=g, dtype=torch.float64) + beta  # different images, different count
    est = unpaired_direction(clean, suspicious)
    assert torch.allclose(est, suspicious.mean(0) - clean.mean(0))
    assert torch.allclose(est, beta, atol=0.3)
    with pytest.raises(LatentGuardError, match="differ per sample"):
        unpaired_direction(clean, suspicious[:, :2])


# ----------------------------------------------------------------------------- online
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=17), min_size=1, max_size=12), st.integers(0, 10_000))
def test_online_estimate_equals_batch_estimate_for_any_batching(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(40, 4, 2, generator=g, dtype=torch.float64)
    stream = torch.randn(sum(sizes) + 1, 4, 2, generator=g, dtype=torch.float64) + 3.0
    online = OnlineDirection((4, 2), reference=clean.mean(dim=0))
    start = 0
    for n in [*sizes, 1]:
        online.update(stream[start : start + n])
        start += n
    assert online.count == stream.shape[0]
    assert torch.allclose(online.direction, unpaired_direction(clean, stream), atol=1e-10)


def test_online_memory_is_bounded_and_pairs_track_the_paired_mean():
    clean, triggered, beta = _planted(n=5000, shape=(8,))
    online = OnlineDirection((8,))
    nbytes = online.nbytes
    for s in range(0, 5000, 50):
        online.update_pairs(clean[s : s + 50], triggered[s : s + 50])
        assert online.nbytes == nbytes  # O(|S|) whatever the stream length
    assert torch.allclose(online.direction, paired_direction(clean, triggered), atol=1e-10)
    assert torch.allclose(online.direction, beta, atol=0.01)


def test_online_decay_follows_a_drifting_trigger_and_prior_blends():
    old, new = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    forgetful = OnlineDirection((3,), decay=0.5)
    exact = OnlineDirection((3,))
    for v in [old] * 20 + [new] * 10:
        forgetful.update(v.repeat(4, 1))
        exact.update(v.repeat(4, 1))
    assert torch.allclose(forgetful.direction, new, atol=0.01)
    assert torch.allclose(exact.direction, new / 3, atol=1e-9)
    prior = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    blended = OnlineDirection((3,), prior=prior, prior_weight=10)
    assert torch.equal(blended.direction, prior)  # nothing seen yet
    blended.update(new.repeat(10, 1))
    assert torch.allclose(blended.direction, (prior + new) / 2)
    with pytest.raises(LatentGuardError, match="decay"):
        OnlineDirection((3,), decay=1.0)
    with pytest.raises(LatentGuardError, match="shape"):
        exact.update(torch.zeros(2, 4))


# ----------------------------------------------------------------------------- clean-data directions
def test_qp_direction_is_the_tac_flip_perturbation():
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(100, 12, generator=g))
    head = nn.Linear(12, 4)
    s = qp_direction(z, head.weight.detach(), head.bias.detach(), 2)
    ref = minimal_flip_perturbations(z, head.weight.detach(), head.bias.detach(), classes=[2])
    assert torch.allclose(s, torch.from_numpy(ref.perturbations[0]))
    with torch.no_grad():
        pred = head((z + s.float()).float()).argmax(1)
    assert (pred == 2).float().mean() > 0.97  # every clean latent flips to the target (up to rounding)


def test_layer_flip_delta_pushes_clean_data_toward_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(96, 1, 6, 6)
    with torch.no_grad():
        before = model(x).argmax(1)
    target = int(torch.bincount(before, minlength=5).argmin())  # the class the model predicts least
    delta = layer_flip_delta(model, "1", x, target, epochs=20, lr=0.2, batch_size=96, device="cpu")
    assert delta.shape == (4, 6, 6)  # the layer output's shape
    handle = model[1].register_forward_hook(lambda _m, _a, out: out + delta.float())
    try:
        with torch.no_grad():
            after = model(x).argmax(1)
    finally:
        handle.remove()
    assert (after == target).float().mean() > 0.9 > (before == target).float().mean()
    assert all(p.requires_grad for p in model.parameters())  # weights untouched and trainable again
    # a stronger L2 penalty gives a smaller offset
    small = layer_flip_delta(model, "1", x, target, l2=50.0, epochs=20, lr=0.2, batch_size=96, device="cpu")
    assert small.norm() < delta.norm()


def test_class_mean_direction():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(90, 2, 3, generator=g, dtype=torch.float64)
    classes = torch.arange(90) % 3
    acts[classes == 1] += 2.0
    est = class_mean_direction(acts, classes, 1)
    assert est.shape == (2, 3)
    assert torch.allclose(est, acts[classes == 1].mean(0) - acts[classes != 1].mean(0))
    with pytest.raises(LatentGuardError, match="inside and outside"):
        class_mean_direction(acts, torch.zeros(90), 0)


def test_layer_flip_delta_rejects_bad_target():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(LatentGuardError, match="not a class"):
        layer_flip_delta(model, "1", torch.rand(4, 1, 2, 2), 7, epochs=1, device="cpu")


# ----------------------------------------------------------------------------- statistics
def test_class_projection_stats_per_predicted_class():
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(60, 2, generator=g, dtype=torch.float64)
    pred = torch.arange(60) % 3  # class 3 never predicted
    tau, mu, sd = class_projection_stats(proj, pred, 4, 0.9)
    assert tau.shape == mu.shape == sd.shape == (2, 4)
    for c in range(3):
        rows = proj[pred == c]
        assert torch.allclose(tau[:, c], torch.quantile(rows, 0.9, dim=0))
        assert torch.allclose(mu[:, c], rows.mean(0))
        assert torch.allclose(sd[:, c], rows.std(0))
    assert torch.allclose(tau[:, 3], torch.quantile(proj, 0.9, dim=0))  # fallback: all samples
    const = class_projection_stats(torch.ones(5, 1), torch.zeros(5), 2, 1.0)[2]
    assert torch.all(const > 0)  # never a zero standard deviation


def test_unit_directions():
    beta = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    u = unit_directions(beta)
    assert torch.allclose(u, torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float64))
    assert np.isfinite(u.numpy()).all()
