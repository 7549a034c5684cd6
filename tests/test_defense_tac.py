"""TAC: the latent-QP detector of the poisoned class and its removal (fine-tune / prune) on the clean reserve."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import latentguard.defenses.tac as tac
from _defense_util import (
    NARROW,
    TARGET,
    FitSpy,
    assert_same_architecture,
    assert_state_equal,
    backdoored_digits,
    clean_digits,
    forbid_test_data,
    max_param_change,
    noise_images,
    rows_subset,
    state_copy,
    tiny_mlp,
)
from latentguard.data import Images
from latentguard.defenses import DEFENSES, fire, make_defense
from latentguard.defenses.tac import TACParams, detect, prune_latent_units
from latentguard.errors import ModelError, SpecError
from latentguard.models import load_model
from latentguard.train import TrainConfig, steps_per_epoch
from latentguard.workflows import _with_head

FIXTURE = Path(__file__).parent / "fixtures" / "user_model.py"
FAST = dict(epochs=2, batch_size=64, min_steps=0)  # enough to see that a parameter acts, not to remove the backdoor
PAPER = dict(beta=1.0, head_shift=0.0, distill=0.0)  # the paper's removal: the s_p term alone


@pytest.fixture(scope="module")
def backdoored():
    """Width-16 small_cnn, BadNets target 0, 130-image reserve."""
    return backdoored_digits()


@pytest.fixture(scope="module")
def wide():
    """The same trained model with a 270-image reserve: fine-tuning on 130 images alone costs ~20 ACC points."""
    return backdoored_digits(reserve=0.2, reserve_seed=1)


@pytest.fixture(scope="module")
def clean():
    """A small_cnn trained without poison."""
    return clean_digits(**NARROW)


# ----------------------------------------------------------------------------- detection
def test_detect_flags_the_badnets_target_and_no_other_class(backdoored):
    before = state_copy(backdoored.model)
    report = detect(backdoored.model, backdoored.reserve, device="cpu", statistic="class")
    assert report.extra["statistic"] == "class" and report.norms == report.extra["class_norms"]
    assert report.method == "tac" and report.threshold == tac.DEFAULT_THRESHOLD == 4.0
    assert report.target_classes == [TARGET] and report.backdoored
    assert len(report.norms) == len(report.scores) == 10
    assert all(np.isfinite(report.norms)) and min(report.norms) > 0
    assert int(np.argmin(report.norms)) == TARGET
    others = [s for k, s in enumerate(report.scores) if k != TARGET]
    assert report.scores[TARGET] > 1.5 * report.threshold > report.threshold > 2 * max(others)  # measured 6.5 vs 1.4
    assert report.extra["kkt_residual_max"] < 1e-6 and report.seconds > 0
    assert_state_equal(backdoored.model, before)
    # the class method is the same detector
    assert make_defense("tac", statistic="class").detect(backdoored.model, backdoored.reserve,
                                                         device="cpu").norms == report.norms


def test_default_statistic_takes_the_pairwise_index_or_the_class_index_minus_a_margin(backdoored):
    # the statistics themselves, without the probes (tests/test_tac_noise_probe.py) and the alignment
    # (tests/test_tac_alignment.py)
    off = dict(device="cpu", noise_probe=0.0, smooth_probe=0.0, alignment=False)
    report = detect(backdoored.model, backdoored.reserve, **off)
    by_class = detect(backdoored.model, backdoored.reserve, statistic="class", **off)
    pairwise = detect(backdoored.model, backdoored.reserve, statistic="pairwise", **off)
    assert report.extra["statistic"] == "both" and report.extra["sources_per_class"] == [9] * 10
    assert report.extra["class_margin"] == tac.CLASS_MARGIN == 1.0
    assert report.norms == by_class.norms and pairwise.norms == report.extra["pairwise_norms"]
    np.testing.assert_allclose(report.scores, np.maximum(np.asarray(by_class.scores) - 1.0, pairwise.scores))
    assert report.extra["class_scores"] == by_class.scores and report.extra["pairwise_scores"] == pairwise.scores
    assert report.target_classes == [TARGET]
    # on this model the pairwise index ranks the target first but scores it 2.1, under α (the class index: 6.5),
    # so the class index flags it, margin included
    assert int(np.argmax(pairwise.scores)) == TARGET and not pairwise.target_classes
    # a margin larger than the class index's lead hides it
    wide = detect(backdoored.model, backdoored.reserve, class_margin=10.0, **off)
    assert wide.target_classes == [] and wide.extra["class_margin"] == 10.0


def test_detect_does_not_flag_a_clean_model(clean):
    assert clean.asr < 0.05  # the trigger does nothing on this model
    report = detect(clean.model, clean.reserve, device="cpu")
    assert report.target_classes == [] and not report.backdoored
    assert len(report.norms) == len(report.scores) == 10
    assert max(report.scores) < report.threshold - 1  # measured 1.35


def test_a_clean_model_is_returned_unchanged(clean, monkeypatch):
    forbid_test_data(monkeypatch)
    result = make_defense("tac").run(clean.model, clean.reserve, device="cpu")
    assert result.detection.target_classes == []
    assert "no class flagged" in result.extra["removal"]
    assert_state_equal(result.model, clean.model)


# ----------------------------------------------------------------------------- removal
@pytest.fixture(scope="module")
def removal(wide):
    """The full detect-then-fine-tune run, on the reserve only (data loading forbidden, ``fit`` spied on)."""
    before = state_copy(wide.model)
    with pytest.MonkeyPatch.context() as mp:
        forbid_test_data(mp)
        spy = FitSpy(mp, tac)
        result = make_defense("tac", batch_size=64).run(wide.model, wide.reserve, device="cpu")
    return result, spy.calls, before


def test_removal_lowers_asr_and_keeps_accuracy(wide, removal):
    result, _, _ = removal
    assert wide.asr > 0.95
    after = wide.evaluate(result.model)
    assert after.asr < 0.1  # measured 0.01
    assert after.acc > wide.acc - 0.04  # measured 0.949 vs 0.962
    assert result.detection.target_classes == [TARGET] and result.extra["targets"] == [TARGET]
    assert result.extra["head_shift"]["rows"] == [TARGET] and result.extra["head_shift"]["cosine_to_original"] < 0
    assert len(result.extra["norm_trace"]) == 2  # fixed s_p (default): the initial solve and the final one


def test_the_papers_removal_pushes_the_target_away_from_small_shifts(wide):
    result = make_defense("tac", batch_size=64, **PAPER).run(wide.model, wide.reserve, device="cpu")
    after = wide.evaluate(result.model)
    assert after.asr < 0.1 and after.acc > wide.acc - 0.04  # measured 0.01 and 0.949 vs 0.962
    assert "head_shift" not in result.extra
    # the reconstructed change into the target grows: the head no longer maps a small shift to class 0
    assert result.extra["final_norms"][0] > 2 * result.extra["initial_norms"][0]


def test_removal_uses_only_the_reserve_and_leaves_the_input_alone(wide, removal):
    result, calls, before = removal
    assert_state_equal(wide.model, before)
    assert_same_architecture(result.model, wide.model)
    assert type(result.model) is type(wide.model) and result.model is not wide.model
    assert max_param_change(result.model, wide.model) > 0
    assert len(calls) == 1
    data, cfg = calls[0]
    assert len(data) == len(wide.reserve) and rows_subset(data.x, wide.reserve.x)
    # 270 images in batches of 64 take 5 steps an epoch: the step floor raises the 10 epochs to 20
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.schedule) == (20, 0.01, 64, 5e-4, "cosine")
    assert result.extra["epochs"] == 20
    assert result.kind == "removal" and result.name == "tac" and result.seconds > 0
    assert result.params == dataclasses.asdict(TACParams(batch_size=64))
    json.dumps(result.to_json())


# ----------------------------------------------------------------------------- parameters
def test_detect_only_returns_the_model_unchanged_with_a_report(backdoored, monkeypatch):
    forbid_test_data(monkeypatch)
    result = make_defense("tac", detect_only=True).run(backdoored.model, backdoored.reserve, device="cpu")
    assert result.extra == {"removal": "detect_only"}
    assert result.detection.target_classes == [TARGET] and len(result.detection.norms) == 10
    assert result.model is not backdoored.model
    assert_state_equal(result.model, backdoored.model)


def test_targets_skip_detection(backdoored, clean, monkeypatch):
    # nothing is flagged on the clean model, yet the given class is treated as poisoned, without detection
    import latentguard.defenses.tac as tac_module

    def no_detection(*_a, **_k):
        raise AssertionError("detection must not run when targets are given")

    with monkeypatch.context() as m:
        m.setattr(tac_module, "detect", no_detection)
        r = make_defense("tac", targets=3, **FAST).run(clean.model, clean.reserve, device="cpu")
    assert r.params["targets"] == [3] and r.extra["targets"] == [3] and r.detection is None
    assert "removal" not in r.extra and len(r.extra["initial_norms"]) == 1
    assert max_param_change(r.model, clean.model) > 0
    # on the backdoored model the detector flags 0, but the given targets are used
    r = make_defense("tac", targets=[5, 7], recompute="epoch", **FAST).run(backdoored.model, backdoored.reserve,
                                                                           device="cpu")
    assert r.detection is None and r.extra["targets"] == [5, 7]
    # named classes are unlearned to the end (no early stop): their norms are traced every epoch
    assert r.extra["active_trace"] == [[5, 7]] * (FAST["epochs"] + 2)  # initial, each epoch, final
    with pytest.raises(SpecError, match=re.escape("targets [10] are not classes of a 10-class model")):
        make_defense("tac", targets=[10]).run(backdoored.model, backdoored.reserve, device="cpu")


def test_prune_zeroes_the_head_columns_of_the_largest_tac_units(backdoored):
    result = make_defense("tac", strategy="prune", **FAST).run(backdoored.model, backdoored.reserve, device="cpu")
    units = result.extra["pruned_units"]
    latent_dim = backdoored.model.fc.in_features  # 64
    assert len(units) == round(0.05 * latent_dim) and units == sorted(set(units))
    assert all(isinstance(u, int) and 0 <= u < latent_dim for u in units)
    w0, w = backdoored.model.fc.weight, result.model.fc.weight
    assert bool((w0[:, units] != 0).all())  # they were not zero before
    assert bool((w[:, units] == 0).all())  # and stay zero through the fine-tuning
    kept = [u for u in range(latent_dim) if u not in units]
    assert bool((w[:, kept] != 0).any()) and max_param_change(result.model, backdoored.model) > 0
    assert_same_architecture(result.model, backdoored.model)

    more = make_defense("tac", strategy="prune", prune_ratio=0.25, epochs=0).run(backdoored.model,
                                                                                 backdoored.reserve, device="cpu")
    assert len(more.extra["pruned_units"]) == 16 and set(units) <= set(more.extra["pruned_units"])
    plain = make_defense("tac", **FAST).run(backdoored.model, backdoored.reserve, device="cpu")
    assert "pruned_units" not in plain.extra
    # a head row drawn again by the feature shift keeps the pruned columns at zero
    shifted = make_defense("tac", strategy="prune", head_shift=0.5, head_shift_rows="targets", **FAST).run(
        backdoored.model, backdoored.reserve, device="cpu")
    assert shifted.extra["pruned_units"] == units and bool((shifted.model.fc.weight[:, units] == 0).all())


def test_prune_latent_units_picks_the_largest_magnitudes():
    head = nn.Linear(4, 3)
    s = torch.tensor([[0.1, -5.0, 0.2, 0.0], [0.0, 0.3, 0.1, 3.0]])  # max |s| per unit: 0.1, 5, 0.2, 3
    assert prune_latent_units(head, s, 0.5) == [1, 3]
    assert bool((head.weight[:, [1, 3]] == 0).all()) and bool((head.weight[:, [0, 2]] != 0).all())
    assert prune_latent_units(nn.Linear(4, 3), s, 0.01) == [1]  # at least one unit


def test_recompute_epoch_and_fixed_both_run_and_differ(backdoored):
    kw = dict(epochs=3, batch_size=64, **PAPER)
    every = make_defense("tac", recompute="epoch", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    fixed = make_defense("tac", recompute="fixed", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert len(every.extra["norm_trace"]) == 3 + 2 and len(fixed.extra["norm_trace"]) == 2
    for r in (every, fixed):
        assert r.extra["targets"] == [TARGET]
        assert r.extra["final_norms"][0] > r.extra["initial_norms"][0]
        assert max_param_change(r.model, backdoored.model) > 0
    assert max_param_change(every.model, fixed.model) > 0


def test_source_surrogate_unlearns_each_sources_own_perturbation(backdoored):
    kw = dict(epochs=2, batch_size=64, targets=[TARGET], **PAPER)
    per_source = make_defense("tac", surrogate="source", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    shared = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert per_source.params["surrogate"] == "source" and shared.params["surrogate"] == "class"
    assert max_param_change(per_source.model, backdoored.model) > 0
    assert max_param_change(per_source.model, shared.model) > 0
    # the shifts: row a of the table is s_{a→p} from the pairwise QP, zero for a = p
    fm = tac.feature_model(backdoored.model, backdoored.reserve, torch.device("cpu"))
    state = tac._Perturbations(fm, backdoored.reserve, [TARGET], torch.device("cpu"), 1.0, 0.0, "source")
    y = torch.tensor([TARGET, 3, 7, 3])
    (shift,) = state.shifts(y)
    assert shift.shape == (4, fm.head.in_features)
    assert torch.all(shift[0] == 0) and torch.equal(shift[1], shift[3]) and not torch.equal(shift[1], shift[2])
    z, _ = tac.extract_features(fm, backdoored.reserve.tensors()[0], device="cpu")
    logits = fm.head(z[backdoored.reserve.y == 3] + shift[1])
    others = torch.cat([logits[:, :TARGET], logits[:, TARGET + 1:]], dim=1).amax(1)
    assert bool((logits[:, TARGET] - others >= -1e-4).all())  # s_{3→p} moves every clean 3 to p (active: margin 0)
    shared_state = tac._Perturbations(fm, backdoored.reserve, [TARGET], torch.device("cpu"), 1.0)
    assert shared_state.shifts(y)[0].shape == (fm.head.in_features,)
    # "both": the per-source term and the shared one, each weighted by β
    own, common = tac._Perturbations(fm, backdoored.reserve, [TARGET], torch.device("cpu"), 1.0, 0.0, "both").shifts(y)
    assert torch.equal(own, shift) and torch.equal(common, shared_state.shifts(y)[0])


def test_shift_scales_are_uniform_between_one_and_kappa():
    like = torch.zeros(1)
    assert tac.shift_scales(5, 1.0, like) == 1.0  # κ = 1: exactly s_p, the paper
    torch.manual_seed(0)
    c = tac.shift_scales(4000, 3.0, like)
    assert c.shape == (4000, 1) and float(c.min()) >= 1.0 and float(c.max()) <= 3.0
    assert abs(float(c.mean()) - 2.0) < 0.05 and float(c.std()) > 0.5


def test_shift_scale_unlearns_the_far_side_of_the_boundary(backdoored):
    """κ > 1 also unlearns c·s_p beyond p's boundary; κ = 1 leaves 2·s_p mapped to p (digits: 89 % vs 28 %)."""
    kw = dict(epochs=2, batch_size=64, targets=[TARGET], **PAPER)
    cpu = torch.device("cpu")
    s_p = torch.as_tensor(tac.solve_tac(tac.feature_model(backdoored.model, backdoored.reserve, cpu),
                                        backdoored.reserve, device=cpu).perturbations[TARGET], dtype=torch.float32)

    def still_mapped_to_p(kappa: float) -> float:
        result = make_defense("tac", shift_scale=kappa, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
        assert result.params["shift_scale"] == kappa
        fm = tac.feature_model(result.model, backdoored.reserve, cpu)
        z = tac.clean_latents(fm, backdoored.reserve, device=cpu)
        return float((fm.head(z + 2.0 * s_p).argmax(1) == TARGET).float().mean())

    assert still_mapped_to_p(2.5) < still_mapped_to_p(1.0) - 0.3


def test_weighted_cross_entropy_scales_the_flagged_classes_terms_only():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1, 2])
    per_sample = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    ones = torch.ones(3)
    assert torch.allclose(tac.weighted_cross_entropy(logits, y, ones), torch.nn.functional.cross_entropy(logits, y))
    w = torch.tensor([3.0, 1.0, 1.0])
    expected = (3.0 * per_sample[0] + per_sample[1] + per_sample[2]) / 3  # a mean over the batch, not over Σ w
    assert torch.allclose(tac.weighted_cross_entropy(logits, y, w), expected)


def test_anchor_loss_moves_the_flagged_class_images_back_by_s_p():
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        head.bias.zero_()
    z = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [4.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2])
    s = torch.tensor([[1.0, -1.0]])  # s_0
    f = torch.nn.functional
    expected = (f.cross_entropy(head(z[[0, 2]] - s[0]), y[[0, 2]], reduction="sum")) / 4
    assert torch.allclose(tac.anchor_loss(head, z, y, [0], s), expected)
    assert float(tac.anchor_loss(head, z[[1, 3]], y[[1, 3]], [0], s)) == 0.0  # no image of p in the batch


def test_target_anchor_adds_its_term_to_the_removal(backdoored):
    kw = dict(epochs=1, batch_size=64, targets=[TARGET], **PAPER)
    anchored = make_defense("tac", target_anchor=True, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    plain = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert anchored.params["target_anchor"] is True and max_param_change(anchored.model, plain.model) > 0


@pytest.mark.parametrize("layers", [["fc1"], []])
def test_tune_layers_fine_tunes_only_those_modules_and_the_head(backdoored, layers):
    before = backdoored.model.state_dict()
    result = make_defense("tac", tune_layers=layers, epochs=1, batch_size=64, targets=[TARGET]).run(
        backdoored.model, backdoored.reserve, device="cpu")
    after = result.model.state_dict()
    tuned = ("fc.", *(f"{n}." for n in layers))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tuned) for k in changed)  # BatchNorm buffers outside included
    assert any(k.startswith("fc.") for k in changed)
    assert all(m.momentum != 0.0 for m in result.model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen = tac._FrozenOutside(result.model, ["fc", "fc1", "fc1"], "fc")  # named twice, head included
    expected = [*result.model.fc.parameters(), *result.model.fc1.parameters()]
    assert len(frozen.trainable) == len(expected) and {id(q) for q in frozen.trainable} == {id(q) for q in expected}
    frozen.restore()
    with pytest.raises(ModelError, match="the model has no layer .block9."):
        make_defense("tac", tune_layers=["block9"], epochs=1, targets=[TARGET]).run(
            backdoored.model, backdoored.reserve, device="cpu")


def test_class_mean_offsets_and_their_removal():
    z = torch.tensor([[2.0, 0.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 3.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    u = tac.class_mean_offsets(z, labels, [0, 1])
    # μ_0 − μ_1 = (3, −2, 0), μ_1 − μ_0 its opposite
    assert np.allclose(u[0], np.array([3.0, -2.0, 0.0]) / np.sqrt(13)) and np.allclose(u[1], -u[0])
    v = np.array([[1.0, 1.0, 1.0], [3.0, -2.0, 5.0]])
    left = tac.without_component(v, u)
    assert np.allclose((left * u).sum(axis=1), 0.0)  # nothing along u_p is left
    assert np.allclose(left[1], [0.0, 0.0, 5.0])  # v − (v·u)u with v's u-part (3, −2, 0)
    with pytest.raises(SpecError, match="spare_class_mean needs reserve images of class 2"):
        tac.class_mean_offsets(z, labels, [2])


def test_spare_class_mean_unlearns_s_p_without_the_class_offset(backdoored):
    cpu = torch.device("cpu")
    fm = tac.feature_model(backdoored.model, backdoored.reserve, cpu)
    whole = tac._Perturbations(fm, backdoored.reserve, [TARGET], cpu, 1.0)
    spared = tac._Perturbations(fm, backdoored.reserve, [TARGET], cpu, 1.0, spare_class_mean=True)
    z = tac.clean_latents(fm, backdoored.reserve, device=cpu)
    u = torch.as_tensor(tac.class_mean_offsets(z, backdoored.reserve.y, [TARGET])[0], dtype=torch.float32)
    s, s_spared = whole.tensor()[0], spared.tensor()[0]
    assert abs(float(s @ u)) > 1e-3 and abs(float(s_spared @ u)) < 1e-4
    assert torch.allclose(s - s_spared, float(s @ u) * u, atol=1e-5)
    source = tac._Perturbations(fm, backdoored.reserve, [TARGET], cpu, 1.0, 0.0, "source", spare_class_mean=True)
    (table,) = source.shifts(torch.arange(10))
    assert torch.allclose(table @ u, torch.zeros(10), atol=1e-4)
    kw = dict(epochs=2, batch_size=64, targets=[TARGET], **PAPER)
    a = make_defense("tac", spare_class_mean=True, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    b = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert a.params["spare_class_mean"] is True and max_param_change(a.model, b.model) > 0


def test_target_weight_raises_the_flagged_class_clean_term(backdoored, monkeypatch):
    seen = []
    real = tac.weighted_cross_entropy
    monkeypatch.setattr(tac, "weighted_cross_entropy", lambda lo, y, w: seen.append(w.clone()) or real(lo, y, w))
    kw = dict(epochs=1, batch_size=64, targets=[TARGET], min_steps=0)
    weighted = make_defense("tac", target_weight=3.0, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    expected = torch.ones(10)
    expected[TARGET] = 3.0
    assert seen and all(torch.equal(w, expected) for w in seen)
    plain = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert max_param_change(weighted.model, plain.model) > 0


@pytest.mark.parametrize("rows", ["all", "targets"])
def test_head_shift_draws_the_rows_again_pushes_them_off_the_original_and_keeps_their_norm(backdoored, rows):
    kw = dict(epochs=1, batch_size=64, targets=[TARGET], min_steps=0)
    w0 = backdoored.model.fc.weight.detach().clone()
    shifted = make_defense("tac", head_shift=0.2, head_shift_rows=rows, redraw_others=False, **kw).run(
        backdoored.model, backdoored.reserve, device="cpu")
    plain = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    w = shifted.model.fc.weight.detach()
    info = shifted.extra["head_shift"]
    assert info["alpha"] == 0.2 and info["rows"] == ("all" if rows == "all" else [TARGET])
    if rows == "all":
        assert torch.allclose(w.norm(), w0.norm(), rtol=1e-5)
        assert float(torch.nn.functional.cosine_similarity(w.flatten(), w0.flatten(), dim=0)) < 0.5
    else:
        assert torch.allclose(w[TARGET].norm(), w0[TARGET].norm(), rtol=1e-5)
        assert float(torch.nn.functional.cosine_similarity(w[TARGET], w0[TARGET], dim=0)) < 0.5
        others = [k for k in range(10) if k != TARGET]  # fine-tuned from the given weights, not drawn again
        assert float(torch.nn.functional.cosine_similarity(w[others].flatten(), w0[others].flatten(), dim=0)) > 0.9
    assert info["cosine_to_original"] < 0.5
    assert max_param_change(shifted.model, plain.model) > 0


def test_head_shift_penalty_is_alpha_times_the_inner_product_with_the_original_rows():
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    shift = tac._HeadShift(head, [1], TACParams(head_shift=0.5, head_shift_rows="targets", redraw_others=False), seed=0)
    assert torch.equal(head.weight[0], torch.tensor([1.0, 0.0, 0.0]))  # row 0 is not a target: untouched
    with torch.no_grad():
        head.weight[1] = torch.tensor([0.0, 3.0, 4.0])
    assert float(shift.penalty().detach()) == pytest.approx(0.5 * 6.0)  # only row 1 counts: ⟨(0, 3, 4), (0, 2, 0)⟩ = 6
    shift.projection.step()
    assert float(head.weight[1].detach().norm()) == pytest.approx(2.0) and torch.equal(head.weight[0], torch.tensor([1.0, 0, 0]))


def test_redraw_others_draws_every_row_again_but_shifts_and_rescales_only_the_flagged_ones():
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    w0 = head.weight.detach().clone() * 10  # far outside the redraw's U(−1/4, 1/4)
    with torch.no_grad():
        head.weight.copy_(w0)
    shift = tac._HeadShift(head, [1], TACParams(head_shift=0.5, redraw_others=True), seed=0)
    w = head.weight.detach()
    assert w.abs().max() <= 0.25 and not torch.equal(w[0], w0[0])  # every row drawn again
    assert shift.summary()["redrawn"] == "all" and shift.summary()["rows"] == [1]
    with torch.no_grad():
        head.weight.mul_(3.0)
    expected = 0.5 * float((head.weight.detach()[1] * w0[1]).sum())  # the penalty reads row 1 alone
    assert float(shift.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    before = head.weight.detach().clone()
    shift.projection.step()
    assert float(head.weight.detach()[1].norm()) == pytest.approx(float(w0[1].norm()), rel=1e-5)  # row 1 back to its norm
    assert torch.equal(head.weight[[0, 2, 3]], before[[0, 2, 3]])  # the other rows keep whatever norm they learn
    kept = tac._HeadShift(nn.Linear(16, 4), [1], TACParams(head_shift=0.5, redraw_others=False), seed=0)
    assert kept.summary()["redrawn"] == "shifted"


@pytest.mark.parametrize("redraw", [True, False])
def test_redraw_others_resets_the_weights_on_a_unit_the_reserve_never_drives(redraw):
    """A latent unit no clean image activates (a direction only a trigger would use) carries weight −3 in every
    row but the target's: fine-tuning cannot move weights the reserve gives no gradient, so only the redraw of the
    other rows takes away the route by which that unit pushes every other class down."""
    model = tiny_mlp()
    dead = 5
    with torch.no_grad():
        model[1].weight[dead].zero_()
        model[1].bias[dead] = -1.0  # ReLU(−1) = 0 on every input
        model[3].weight[:, dead] = -3.0
    reserve = noise_images(60)
    out = make_defense("tac", targets=[TARGET], epochs=1, batch_size=30, noise_probe=0.0, min_steps=0,
                       redraw_others=redraw).run(
        model, reserve, device="cpu")
    others = out.model[3].weight.detach()[[k for k in range(10) if k != TARGET], dead]
    if redraw:
        assert others.abs().max() <= 0.25  # a fresh U(−1/√16, 1/√16) draw, untouched since
    else:
        assert others.max() < -2.9  # as given, but for weight decay
    assert out.extra["head_shift"]["redrawn"] == ("all" if redraw else "shifted")


@pytest.mark.parametrize(("epochs", "min_steps", "n", "batch", "expected"), [
    (10, 100, 270, 128, 34),  # the demo's reserve: 3 steps an epoch
    (10, 100, 2500, 128, 10),  # a CIFAR-10 reserve takes 200 steps anyway
    (2, 0, 130, 64, 2),  # no floor
    (1, 5, 10, 20, 5),  # one (ragged) batch an epoch
])
def test_epochs_for_steps_raises_epochs_to_the_step_floor(epochs, min_steps, n, batch, expected):
    per_epoch = steps_per_epoch(n, TrainConfig(batch_size=batch))
    assert tac.epochs_for_steps(epochs, min_steps, per_epoch) == expected


def test_min_steps_raises_the_epochs_of_a_head_shift_removal_only(backdoored, monkeypatch):
    spy = FitSpy(monkeypatch, tac)
    kw = dict(targets=[TARGET], epochs=1, batch_size=64, min_steps=6)  # 130 images: 3 steps an epoch
    shifted = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    paper = make_defense("tac", **kw, **PAPER).run(backdoored.model, backdoored.reserve, device="cpu")
    assert [cfg.epochs for _, cfg in spy.calls] == [2, 1]  # the paper's removal draws no row: epochs as given
    assert shifted.extra["epochs"] == 2 and "epochs" not in paper.extra


def test_kept_class_distillation_ignores_the_flagged_columns_and_matches_hinton_kd():
    teacher = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 0.0, -2.0]])
    kept = torch.tensor([0, 1, 2])
    moved_flagged = teacher.clone()
    moved_flagged[:, 3] = -50.0  # only the flagged column 3 differs: no loss
    assert float(tac.kept_class_distillation(moved_flagged, teacher, kept, 2.0)) == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.0]])
    t = (teacher[:, :3] / 2).softmax(1)
    s = (student[:, :3] / 2).softmax(1)
    expected = 4.0 * float((t * (t.log() - s.log())).sum(1).mean())  # T² · KL(t ‖ s), batch mean
    assert float(tac.kept_class_distillation(student, teacher, kept, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_distill_is_on_by_default_over_the_classes_not_flagged(backdoored, monkeypatch):
    seen = []
    real = tac.kept_class_distillation
    monkeypatch.setattr(tac, "kept_class_distillation", lambda s, t, k, temp: seen.append((t, k, temp)) or real(s, t, k, temp))
    kw = dict(epochs=1, batch_size=65, targets=[TARGET], min_steps=0)
    result = make_defense("tac", **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert len(seen) == 2 and all(k.tolist() == [c for c in range(10) if c != TARGET] and temp == 2.0 for _, k, temp in seen)
    assert max_param_change(result.model, backdoored.model) > 0
    seen.clear()
    make_defense("tac", distill=0.0, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert seen == []


def test_the_distillation_teacher_is_the_model_as_given_even_when_pruned(backdoored, monkeypatch):
    teachers = []
    real = tac._frozen_copy
    monkeypatch.setattr(tac, "_frozen_copy", lambda m: teachers.append(real(m)) or teachers[-1])
    result = make_defense("tac", strategy="prune", epochs=1, batch_size=65, targets=[TARGET]).run(
        backdoored.model, backdoored.reserve, device="cpu")
    assert result.extra["pruned_units"] and len(teachers) == 1
    assert_state_equal(teachers[0], backdoored.model)  # not the pruned head, not the redrawn row
    assert not any(q.requires_grad for q in teachers[0].parameters()) and not teachers[0].training


def test_distill_keeps_the_other_classes_closer_to_the_given_model(backdoored):
    # two even batches: a ragged 2-image batch in train mode swings the student's logits far from the teacher's
    kw = dict(epochs=2, batch_size=65, targets=[TARGET], head_shift=0.0)
    x = torch.as_tensor(backdoored.reserve.x).permute(0, 3, 1, 2).float() / 255
    others = [k for k in range(10) if k != TARGET]

    def drift(model: nn.Module) -> float:
        with torch.no_grad():
            before = backdoored.model.eval()(x)[:, others].log_softmax(1)
            after = model.eval()(x)[:, others].log_softmax(1)
        return float((before.exp() * (before - after)).sum(1).mean())

    plain = make_defense("tac", distill=0.0, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    kept = make_defense("tac", distill=3.0, **kw).run(backdoored.model, backdoored.reserve, device="cpu")
    assert drift(kept.model) < 0.5 * drift(plain.model)


def test_refusal_loss_is_minus_log_of_the_mass_off_the_flagged_classes():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0], [0.0, 4.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, 1])
    loss = tac.refusal_loss(logits, y, [1])  # the sample of class 1 is left out
    probs = logits.detach().softmax(1)
    assert float(loss.detach()) == pytest.approx(float(-(1 - probs[:2, 1]).log().mean()), rel=1e-6)
    loss.backward()
    assert (logits.grad[:2, 1] > 0).all() and (logits.grad[:2, [0, 2]] < 0).all()  # descent lowers p, raises others
    assert torch.equal(logits.grad[2], torch.zeros(3))
    two = tac.refusal_loss(logits.detach(), y, [1, 2])  # several flagged classes: their mass together
    assert float(two) == pytest.approx(float(-(probs[0, 0]).log()), rel=1e-6)
    assert float(tac.refusal_loss(logits.detach(), torch.tensor([1, 1, 1]), [1])) == 0.0


def test_zero_epochs_leave_the_weights_equal(backdoored):
    result = make_defense("tac", epochs=0).run(backdoored.model, backdoored.reserve, device="cpu")
    assert result.extra["targets"] == [TARGET] and result.extra["history"]["epochs"] == []
    assert_state_equal(result.model, backdoored.model)  # BatchNorm statistics included


def test_beta_and_stop_ratio_change_the_outcome(backdoored):
    base = make_defense("tac", **PAPER, **FAST).run(backdoored.model, backdoored.reserve, device="cpu")
    no_tac = make_defense("tac", beta=0.0, head_shift=0.0, **FAST).run(backdoored.model, backdoored.reserve, device="cpu")
    assert max_param_change(base.model, no_tac.model) > 0
    # the early stop acts on re-solved perturbations only
    resolved = make_defense("tac", recompute="epoch", **PAPER, **FAST).run(backdoored.model, backdoored.reserve,
                                                                         device="cpu")
    never_stop = make_defense("tac", recompute="epoch", stop_ratio=0.0, **PAPER, **FAST).run(
        backdoored.model, backdoored.reserve, device="cpu")
    assert max_param_change(resolved.model, never_stop.model) > 0
    fixed_never_stop = make_defense("tac", stop_ratio=0.0, **PAPER, **FAST).run(backdoored.model, backdoored.reserve, device="cpu")
    assert_state_equal(base.model, fixed_never_stop.model)


@pytest.mark.parametrize(("bad", "message"), [
    ({"beta": -1.0}, "tac: parameter beta must be a number >= 0, got -1.0"),
    ({"strategy": "x"}, "tac: parameter strategy must be one of finetune, prune, got 'x'"),
    ({"head": ""}, "tac: parameter head must be the name of the output nn.Linear, got ''"),
    ({"head": 3}, "tac: parameter head must be the name of the output nn.Linear, got 3"),
    ({"recompute": "always"}, "tac: parameter recompute must be one of epoch, fixed, got 'always'"),
    ({"surrogate": "pair"}, "tac: parameter surrogate must be one of class, source, both, got 'pair'"),
    ({"class_margin": -1}, "tac: parameter class_margin must be a number >= 0"),
    ({"mad_floor": -0.01}, "tac: parameter mad_floor must be a number >= 0 (0: no floor)"),
    ({"epochs": -1}, "tac: parameter epochs must be an integer >= 0"),
    ({"stop_ratio": -0.5}, "tac: parameter stop_ratio must be a number >= 0"),
    ({"shift_scale": 0.5}, "tac: parameter shift_scale must be a number >= 1"),
    ({"target_weight": 0}, "tac: parameter target_weight must be a number > 0"),
    ({"spare_class_mean": 1}, "tac: parameter spare_class_mean must be true or false"),
    ({"target_anchor": "no"}, "tac: parameter target_anchor must be true or false"),
    ({"tune_layers": [""]}, "tac: parameter tune_layers must be a list of module names (or null: every parameter)"),
    ({"prune_ratio": 1.0}, "tac: parameter prune_ratio must be in (0, 1)"),
    ({"noise_scale": 0}, "tac: parameter noise_scale must be a number > 0"),
    ({"noise_beta": -1}, "tac: parameter noise_beta must be a number >= 0 (or null: beta)"),
    ({"head_shift": -0.1}, "tac: parameter head_shift must be a number >= 0 (0: off)"),
    ({"head_shift_rows": "p"}, "tac: parameter head_shift_rows must be one of targets, all, got 'p'"),
    ({"redraw_others": "yes"}, "tac: parameter redraw_others must be true or false, got 'yes'"),
    ({"min_steps": -1}, "tac: parameter min_steps must be an integer >= 0 (0: no floor), got -1"),
    ({"noise_loss": "kl"}, "tac: parameter noise_loss must be one of label, refuse, got 'kl'"),
    ({"distill": -1}, "tac: parameter distill must be a number >= 0 (0: off)"),
    ({"threshold": 0}, "tac: parameter threshold must be a number > 0"),
    ({"targets": [-1]}, "tac: parameter targets must be a list of class indices"),
    ({"detect_only": "yes"}, "tac: parameter detect_only must be true or false"),
    ({"nonsense": 1}, "unknown parameter(s) nonsense for defense 'tac': allowed are"),
])
def test_invalid_params_raise_spec_error_naming_the_parameter(bad, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        make_defense("tac", **bad)


# ----------------------------------------------------------------------------- head
@pytest.fixture(scope="module")
def aux():
    """An (untrained) user model whose head must be named: an auxiliary Linear runs after ``classifier_out``.

    It takes RGB images of any size and has 5 classes; the reserve is random 32×32 images, 8 per class.
    """
    torch.manual_seed(0)
    model = load_model(f"{FIXTURE}:build_aux")
    rng = np.random.default_rng(0)
    n = 40
    reserve = Images(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 5,
                     [str(k) for k in range(5)])
    return model, reserve


def test_tac_detect_takes_the_head_name(aux):
    model, reserve = aux
    with pytest.raises(ModelError, match="pass --head NAME"):
        detect(model, reserve, device="cpu", log_norms=False)
    report = detect(model, reserve, device="cpu", head="classifier_out", log_norms=False)
    assert len(report.norms) == len(report.scores) == 5 and all(np.isfinite(report.norms))
    # the untrained model sends every random image to one class, whose ‖s_k‖ is 0: on the log scale (the
    # default) that class is the extreme outlier, flagged rather than refused
    zero = [k for k, v in enumerate(report.norms) if v == 0]
    assert len(zero) == 1
    logged = detect(model, reserve, device="cpu", head="classifier_out")
    assert logged.norms == report.norms and logged.target_classes == zero
    assert all(np.isfinite(logged.scores)) and logged.scores[zero[0]] > 10 * max(logged.scores[k] for k in range(5) if k != zero[0])
    with pytest.raises(ModelError, match="not the output layer"):
        detect(model, reserve, device="cpu", head="embed", log_norms=False)


def test_tac_defense_takes_the_head_name(aux):
    model, reserve = aux
    before = state_copy(model)
    with pytest.raises(ModelError, match="pass --head NAME"):
        make_defense("tac", detect_only=True, log_norms=False).run(model, reserve, device="cpu")
    defense = make_defense("tac", head="classifier_out", detect_only=True, log_norms=False)
    result = defense.run(model, reserve, device="cpu")
    assert result.params["head"] == "classifier_out" and result.extra == {"removal": "detect_only"}
    expected = detect(model, reserve, device="cpu", head="classifier_out", log_norms=False).norms
    assert result.detection.norms == expected
    assert defense.detect(model, reserve, device="cpu").norms == expected
    # removal splits the model at the named head as well
    removed = make_defense("tac", head="classifier_out", targets=[1], epochs=1, batch_size=20, log_norms=False).run(
        model, reserve, device="cpu")
    assert removed.extra["targets"] == [1]
    assert max_param_change(removed.model, model) > 0
    assert_state_equal(model, before)


def test_fire_repair_takes_the_head_name(aux):
    model, reserve = aux
    with pytest.raises(ModelError, match="pass --head NAME"):
        fire.repair(model, reserve, target=1, device="cpu")
    wrapper = fire.repair(model, reserve, target=1, head="classifier_out", device="cpu")
    x, _ = reserve.tensors()
    with torch.no_grad():
        assert wrapper(x[:4]).shape == (4, 5)
    result = make_defense("fire", target=1, head="classifier_out").run(model, reserve, device="cpu")
    assert result.params["head"] == "classifier_out" and isinstance(result.model, fire.RepairedModel)
    with pytest.raises(SpecError, match="head"):
        make_defense("fire", head="")


def test_defend_command_passes_head_to_the_defenses_that_take_it():
    params = {"epochs": 2}
    assert _with_head("tac", params, "classifier_out") == {"epochs": 2, "head": "classifier_out"}
    assert params == {"epochs": 2}  # not modified in place
    assert _with_head("fire", {}, "classifier_out") == {"head": "classifier_out"}
    assert _with_head("ft", {"epochs": 1}, "classifier_out") == {"epochs": 1}  # FT has no head parameter
    assert _with_head("tac", {"epochs": 2}, None) == {"epochs": 2}
    assert _with_head("tac", {"head": "mine"}, "classifier_out") == {"head": "mine"}  # --param head=... wins
    assert _with_head("no_such_defense", {"a": 1}, "x") == {"a": 1}
    assert make_defense("tac", **_with_head("tac", {}, "classifier_out")).params.head == "classifier_out"
    # every registered defense accepts what it is given
    took = set()
    for name in DEFENSES:
        defense = make_defense(name, **_with_head(name, {}, "classifier_out"))
        if getattr(defense.params, "head", None) == "classifier_out":
            took.add(name)
    assert {"tac", "fire", "fst"} <= took
