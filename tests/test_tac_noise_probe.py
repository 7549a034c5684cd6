"""TAC's probes: the verdicts on the reserve under white and under smooth Gaussian pixel noise, combined with the
clean verdict."""

import numpy as np
import pytest
import torch
from torch import nn

import latentguard.defenses.tac as tac
from _row_images import row_images, row_means
from latentguard.data import Images
from latentguard.defenses import make_defense
from latentguard.defenses.base import DetectionReport
from latentguard.defenses.tac import (
    DEFAULT_NOISE_PROBE,
    DEFAULT_SMOOTH_PROBE,
    PROBE_FRACTION,
    SMOOTH_PROBE_GRID,
    SMOOTH_PROBE_SIGMA,
    detect,
    noisy_copy,
    probe_unlearning_terms,
    smooth_field,
    with_noise_probe,
    with_smooth_probe,
)
from latentguard.errors import SpecError

C, SIZE = 8, 8
ROUGHNESS_GAIN = 200.0


class _NoiseKeyed(nn.Module):
    """Class c lights up image row c; a latent unit measuring horizontal roughness (amplified) feeds class 0 with
    a small weight ``key``.

    Clean images are constant along each row (roughness 0) and the head row of class 0 barely differs from the
    others, so the clean latents show nothing; noisy copies have a large roughness unit and drift toward class 0,
    like the noise key of a Blend backdoor."""

    def __init__(self, key: float) -> None:
        super().__init__()
        self.rows = row_means(C, SIZE)
        self.head = nn.Linear(C + 1, C)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, :C] = 4.0 * torch.eye(C)
            self.head.weight[0, C] = key
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        roughness = ROUGHNESS_GAIN * (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        return self.head(torch.cat([self.rows(x.flatten(1)), roughness[:, None]], dim=1))


def _images(n_per_class: int = 20, seed: int = 0) -> Images:
    """Row c bright (its level varies per class and per image), every other row dark: constant along rows."""
    return row_images(C, SIZE, n_per_class, seed)


def test_noisy_copy_is_seeded_keeps_labels_and_adds_noise_of_sigma():
    images = _images()
    a, b = noisy_copy(images, 0.1), noisy_copy(images, 0.1)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, images.y)
    assert a.x.dtype == np.uint8 and a.x.shape == images.x.shape
    diff = (a.x.astype(float) - images.x.astype(float)) / 255
    assert 0.08 < diff.std() < 0.12  # σ = 0.1, slightly less where clipping bites
    np.testing.assert_array_equal(noisy_copy(images, 0.0).x, images.x)


def test_probe_scores_are_the_larger_index_and_flags_are_the_union():
    clean = DetectionReport("tac", norms=[1.0, 2.0, 3.0], scores=[5.0, 0.0, 1.0], threshold=4.0, target_classes=[0],
                            extra={"statistic": "both"})
    noisy = DetectionReport("tac", norms=[9.0, 9.0, 0.1], scores=[-1.0, 0.5, 7.0], threshold=4.0, target_classes=[2])
    combined = with_noise_probe(clean, noisy, 0.1)
    assert combined.scores == [5.0, 0.5, 7.0]
    assert combined.target_classes == [0, 2]
    assert combined.norms == clean.norms  # removal unlearns the clean reserve's s_p
    assert combined.extra["clean_scores"] == clean.scores and combined.extra["probe_scores"] == noisy.scores
    assert combined.extra["noise_probe"] == 0.1 and combined.extra["statistic"] == "both"


def test_probe_finds_a_noise_keyed_backdoor_the_clean_reserve_hides():
    images = _images()
    model = _NoiseKeyed(key=0.5).eval()
    plain = detect(model, images, device="cpu", noise_probe=0.0, smooth_probe=0.0)
    probed = detect(model, images, device="cpu", noise_probe=0.1, smooth_probe=0.0)
    assert 0 not in plain.target_classes
    assert probed.target_classes == [0]
    assert probed.extra["probe_scores"][0] > 4.0 > max(probed.extra["clean_scores"])


def test_probe_raises_no_flag_on_a_model_without_the_key():
    report = detect(_NoiseKeyed(key=0.0).eval(), _images(), device="cpu", noise_probe=0.1)
    assert report.target_classes == []


def test_tac_defense_passes_the_probe_and_validates_it():
    images = _images()
    result = make_defense("tac", noise_probe=0.1, detect_only=True).run(_NoiseKeyed(key=0.5).eval(), images,
                                                                         device="cpu")
    assert result.detection.target_classes == [0]
    for bad in (-0.1, 2.0, "loud"):
        with pytest.raises(SpecError, match="noise_probe"):
            make_defense("tac", noise_probe=bad)
    for bad in (0.0, 1.5, True):
        with pytest.raises(SpecError, match="probe_fraction"):
            make_defense("tac", probe_fraction=bad)
    with pytest.raises(SpecError, match="noise_unlearn"):
        make_defense("tac", noise_unlearn="yes")
    assert make_defense("tac").params.noise_unlearn == "probe_only"
    assert make_defense("tac", noise_unlearn=True).params.noise_unlearn == "always"
    assert make_defense("tac", noise_unlearn=False).params.noise_unlearn == "never"


def test_public_detect_takes_the_probe_and_refuses_a_bad_sigma():
    import latentguard

    images = _images()
    x = torch.from_numpy(images.x)  # uint8 N×H×W×C
    y = torch.from_numpy(images.y)
    model = _NoiseKeyed(key=0.5).eval()
    assert latentguard.detect(model, (x, y), noise_probe=0.1, device="cpu").target_classes == [0]
    assert 0 not in latentguard.detect(model, (x, y), noise_probe=0.0, smooth_probe=0.0, device="cpu").target_classes
    with pytest.raises(SpecError, match="noise_probe"):
        latentguard.detect(model, (x, y), noise_probe=-0.5, device="cpu")
    with pytest.raises(SpecError, match="smooth_probe"):
        latentguard.detect(model, (x, y), smooth_probe=1.5, device="cpu")


def test_probe_is_on_by_default_and_judges_a_class_balanced_share():
    images = _images(n_per_class=20)
    report = detect(_NoiseKeyed(key=0.5).eval(), images, device="cpu")
    assert report.extra["noise_probe"] == DEFAULT_NOISE_PROBE > 0 and report.target_classes == [0]
    assert report.extra["probe_size"] == C * round(20 * PROBE_FRACTION)
    whole = detect(_NoiseKeyed(key=0.5).eval(), images, device="cpu", probe_fraction=1.0)
    assert whole.extra["probe_size"] == len(images)
    with pytest.raises(SpecError, match="probe_fraction"):
        detect(_NoiseKeyed(key=0.5).eval(), images, device="cpu", probe_fraction=0.0)


def test_probe_unlearning_terms_need_a_target_the_probe_flags():
    probed = DetectionReport("tac", norms=[1.0] * 3, scores=[5.0, 6.0, 7.0], threshold=4.0, target_classes=[0, 1, 2],
                             extra={"noise_probe": 0.1, "probe_scores": [1.0, 6.0, 0.0], "clean_scores": [5.0, 0, 0],
                                    "smooth_probe": 0.3, "smooth_grid": 4, "smooth_scores": [0.0, 5.0, 7.0]})
    assert probe_unlearning_terms(probed, [1]) == [(0.1, 0), (0.3, 4)]
    assert probe_unlearning_terms(probed, [2]) == [(0.3, 4)]  # the smooth probe alone flagged it
    assert probe_unlearning_terms(probed, [0, 1]) == [(0.1, 0), (0.3, 4)]
    assert probe_unlearning_terms(probed, [0]) == []  # flagged by the clean verdict alone
    # probe_only: a target the clean verdict flags too (class 0 here, 5.0 > α; its probe index raised) is left out
    both = DetectionReport("tac", norms=[1.0] * 3, scores=[9.0, 0, 0], threshold=4.0, target_classes=[0],
                           extra={"noise_probe": 0.1, "probe_scores": [9.0, 0, 0], "clean_scores": [5.0, 0, 0]})
    assert probe_unlearning_terms(both, [0]) == [(0.1, 0)]
    assert probe_unlearning_terms(both, [0], probe_only=True) == []
    assert probe_unlearning_terms(probed, [1], probe_only=True) == [(0.1, 0), (0.3, 4)]
    plain = DetectionReport("tac", norms=[1.0] * 3, scores=[5.0, 0, 0], threshold=4.0, target_classes=[0])
    assert probe_unlearning_terms(plain, [0]) == [] and probe_unlearning_terms(None, [0]) == []


class _InputSpy(nn.Module):
    """Wraps a model and counts the training-mode batches whose pixels are off the uint8 grid (noise was added:
    clean images, cropped or flipped, stay multiples of 1/255)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.noisy_training_batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x.detach() * 255
        if self.training and ((scaled - scaled.round()).abs() > 0.01).float().mean() > 0.5:
            self.noisy_training_batches += 1
        return self.model(x)


def test_removal_fits_noisy_copies_only_when_the_probe_flags_the_target():
    images = _images(n_per_class=20)
    for unlearn in (False, True):
        spy = _InputSpy(_NoiseKeyed(key=0.5)).eval()
        result = make_defense("tac", noise_unlearn=unlearn, smooth_probe=0.0, epochs=2,
                              batch_size=40, min_steps=0).run(spy, images, device="cpu")
        assert result.detection.target_classes == [0] and result.extra["targets"] == [0]
        trained = result.model  # a copy: the spy's counter lives on it
        if unlearn:
            assert result.extra["noise_unlearn"] == [{"sigma": 0.1, "grid": 0}]
            assert trained.noisy_training_batches == 2 * len(images) // 40  # every step of both epochs
        else:
            assert "noise_unlearn" not in result.extra and trained.noisy_training_batches == 0
    assert spy.noisy_training_batches == 0  # the input model is untouched


@pytest.mark.parametrize(("beta", "noise_beta", "noisy"), [(0.0, None, False), (0.0, 1.0, True), (1.0, 0.0, False)])
def test_noise_beta_weighs_the_noise_terms_apart_from_beta(beta, noise_beta, noisy):
    images = _images(n_per_class=20)
    spy = _InputSpy(_NoiseKeyed(key=0.5)).eval()
    result = make_defense("tac", noise_unlearn=True, smooth_probe=0.0, epochs=1, batch_size=40, beta=beta,
                          noise_beta=noise_beta, min_steps=0).run(spy, images, device="cpu")
    assert result.extra["noise_unlearn"] == [{"sigma": 0.1, "grid": 0}]
    assert result.model.noisy_training_batches == (len(images) // 40 if noisy else 0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_noise_scale_sets_the_noise_terms_sigma(scale, monkeypatch):
    """The removal's noisy copies carry noise_scale × the flagging probe's σ (0.1 here); detection keeps its σ."""
    images = _images(n_per_class=20)
    monkeypatch.setattr(tac, "probe_noise", lambda x, grid: torch.ones_like(x))  # a flat +1 field: shift = σ_term
    shifts = []

    class Spy(_NoiseKeyed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                shifts.append(float(x.max()))
            return super().forward(x)

    model = Spy(key=0.5).eval()
    make_defense("tac", noise_unlearn=True, smooth_probe=0.0, epochs=1, batch_size=40, noise_scale=scale,
                 head_shift=0.0).run(model, images, device="cpu")
    # clean batches peak at ≤ 210/255; noisy ones at 210/255 + σ_term (clamped at 1)
    assert max(shifts) == pytest.approx(min(1.0, 210 / 255 + scale * 0.1), abs=0.02)


@pytest.mark.parametrize("noise_loss", ["label", "refuse"])
def test_noise_loss_chooses_what_the_noisy_copies_are_fitted_to(noise_loss, monkeypatch):
    images = _images(n_per_class=20)
    calls = []
    real = tac.refusal_loss
    monkeypatch.setattr(tac, "refusal_loss", lambda lo, y, t: calls.append(list(t)) or real(lo, y, t))
    result = make_defense("tac", noise_unlearn=True, smooth_probe=0.0, epochs=1, batch_size=40,
                          noise_loss=noise_loss, min_steps=0).run(_NoiseKeyed(key=0.5).eval(), images, device="cpu")
    assert result.extra["noise_unlearn"] == [{"sigma": 0.1, "grid": 0}]
    assert calls == ([[0]] * (len(images) // 40) if noise_loss == "refuse" else [])


def test_fire_detection_uses_the_probe_unless_switched_off():
    from latentguard.defenses.fire import repair

    images = _images(n_per_class=20)
    probed = repair(_NoiseKeyed(key=0.5).eval(), images, device="cpu", alpha=1.0, quantile=0.99, per_source=False)
    assert probed.detection.target_classes == [0] and probed.detection.extra["noise_probe"] == DEFAULT_NOISE_PROBE
    plain = repair(_NoiseKeyed(key=0.5).eval(), images, device="cpu", alpha=1.0, quantile=0.99, per_source=False,
                   noise_probe=0.0, smooth_probe=0.0)
    assert 0 not in plain.detection.target_classes and "probe_scores" not in plain.detection.extra
    with pytest.raises(SpecError, match="noise_probe"):
        make_defense("fire", noise_probe=-1)
    assert DEFAULT_SMOOTH_PROBE == 0.0 and "smooth_scores" not in probed.detection.extra  # the smooth probe is opt-in
    smooth = repair(_SmoothKeyed(key=1.0).eval(), images, device="cpu", alpha=1.0, quantile=0.99, per_source=False,
                    smooth_probe=SMOOTH_PROBE_SIGMA)
    assert smooth.detection.target_classes == [0] and smooth.detection.extra["smooth_probe"] == SMOOTH_PROBE_SIGMA
    with pytest.raises(SpecError, match="smooth_probe"):
        make_defense("fire", smooth_probe=2.0)


# ---------------------------------------------------------------------------------------- the smooth probe


class _SmoothKeyed(_NoiseKeyed):
    """Like :class:`_NoiseKeyed`, but the extra latent unit measures the squared difference between the mean of the
    left and right image halves: 0 on clean images (constant along rows), large under smooth noise, whose
    half-image means vary, small under white noise of the same σ, which averages out over each half. The head's
    class weights differ a little between classes, so the other classes' flip norms spread as on real models."""

    def __init__(self, key: float) -> None:
        super().__init__(key)
        with torch.no_grad():
            self.head.weight[:, :C] = torch.diag(4.0 * (1 + 0.1 * torch.arange(C, dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        tilt = 500.0 * (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))).pow(2)
        return self.head(torch.cat([self.rows(x.flatten(1)), tilt[:, None]], dim=1))


@pytest.mark.parametrize("grid", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [(8, 8), (16, 16), (32, 24)])
def test_smooth_field_keeps_unit_mean_variance_and_is_smooth(grid, size):
    field = smooth_field(torch.randn(4000, 1, grid, grid, generator=torch.Generator().manual_seed(0)), size)
    assert field.shape == (4000, 1, *size)
    assert field.pow(2).mean().item() == pytest.approx(1.0, rel=0.05)
    if grid < min(size):  # neighbours share most of their lattice weights: far less rough than white noise
        assert (field[..., 1:] - field[..., :-1]).pow(2).mean().item() < 0.5 * 2.0


def test_smooth_noisy_copy_is_seeded_of_sigma_and_smoother_than_white():
    images = _images()
    a, b = noisy_copy(images, 0.1, grid=4), noisy_copy(images, 0.1, grid=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, images.y)
    assert a.x.dtype == np.uint8 and a.x.shape == images.x.shape
    smooth = (a.x.astype(float) - images.x.astype(float)) / 255
    white = (noisy_copy(images, 0.1).x.astype(float) - images.x.astype(float)) / 255
    assert 0.07 < smooth.std() < 0.12
    rough = lambda d: np.abs(np.diff(d, axis=2)).mean()  # noqa: E731
    assert rough(smooth) < 0.5 * rough(white)


def test_smooth_scores_join_the_larger_index_and_keep_the_clean_verdict():
    clean = DetectionReport("tac", norms=[1.0, 2.0, 3.0], scores=[5.0, 0.0, 1.0], threshold=4.0, target_classes=[0])
    white = DetectionReport("tac", norms=[9.0] * 3, scores=[-1.0, 0.5, 2.0], threshold=4.0, target_classes=[])
    smooth = DetectionReport("tac", norms=[9.0, 0.1, 9.0], scores=[0.0, 8.0, 3.0], threshold=4.0, target_classes=[1])
    combined = with_smooth_probe(with_noise_probe(clean, white, 0.1), smooth, 0.3, 4)
    assert combined.scores == [5.0, 8.0, 3.0] and combined.target_classes == [0, 1]
    assert combined.extra["clean_scores"] == clean.scores and combined.extra["probe_scores"] == white.scores
    assert combined.extra["smooth_scores"] == smooth.scores and combined.extra["smooth_norms"] == smooth.norms
    assert (combined.extra["smooth_probe"], combined.extra["smooth_grid"]) == (0.3, 4)
    assert combined.norms == clean.norms
    alone = with_smooth_probe(clean, smooth, 0.3, 4)  # the white probe off: the clean verdict is still kept
    assert alone.extra["clean_scores"] == clean.scores and "probe_scores" not in alone.extra


def test_smooth_probe_finds_a_smooth_keyed_backdoor_that_white_noise_misses():
    images = _images()
    model = _SmoothKeyed(key=1.0).eval()
    assert detect(model, images, device="cpu", noise_probe=0.0, smooth_probe=0.0).target_classes == []
    white = detect(model, images, device="cpu", smooth_probe=0.0)
    assert white.target_classes == [] and "smooth_scores" not in white.extra
    assert detect(model, images, device="cpu").target_classes == []  # the defaults: the white probe alone
    report = detect(model, images, device="cpu", smooth_probe=SMOOTH_PROBE_SIGMA)  # both probes
    assert report.target_classes == [0] and report.extra["smooth_scores"][0] > 4.0
    assert max(report.extra["probe_scores"]) < 4.0 and max(report.extra["clean_scores"]) < 4.0
    assert (report.extra["smooth_probe"], report.extra["smooth_grid"]) == (SMOOTH_PROBE_SIGMA, SMOOTH_PROBE_GRID)
    assert detect(_SmoothKeyed(key=0.0).eval(), images, device="cpu",
                  smooth_probe=SMOOTH_PROBE_SIGMA).target_classes == []


def test_tac_validates_the_smooth_probe():
    for bad in (-0.1, 2.0, "loud", True):
        with pytest.raises(SpecError, match="smooth_probe"):
            make_defense("tac", smooth_probe=bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(SpecError, match="probe_grid"):
            make_defense("tac", probe_grid=bad)
    with pytest.raises(SpecError, match="probe_grid"):
        detect(_SmoothKeyed(key=1.0).eval(), _images(), device="cpu", probe_grid=0)


def test_removal_fits_smooth_noisy_copies_when_the_smooth_probe_flags_the_target():
    images = _images(n_per_class=20)
    spy = _InputSpy(_SmoothKeyed(key=1.0)).eval()
    result = make_defense("tac", epochs=2, batch_size=40, smooth_probe=SMOOTH_PROBE_SIGMA, min_steps=0).run(
        spy, images, device="cpu")
    assert result.detection.target_classes == [0]
    assert result.extra["noise_unlearn"] == [{"sigma": SMOOTH_PROBE_SIGMA, "grid": SMOOTH_PROBE_GRID}]
    assert result.model.noisy_training_batches == 2 * len(images) // 40
    assert spy.noisy_training_batches == 0
