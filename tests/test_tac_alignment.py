"""TAC's alignment verdict: a class whose minimal flip leans on its own mean clean latent (joined like a probe)."""

import numpy as np
import pytest
import torch
from torch import nn

import latentguard.defenses.tac as tac
from _row_images import row_images, row_means
from latentguard.data import Images
from latentguard.defenses import make_defense
from latentguard.defenses.tac import detect, probe_unlearning_terms
from latentguard.errors import SpecError

C, SIZE, TARGET = 8, 8, 3


class _SpareUnits(nn.Module):
    """Class c lights up image row c (latent unit c); C more latent units stay 0 on every image.

    Every class but TARGET also reads its own spare unit, with more weight (10) than its feature (4): the cheapest
    way into such a class runs mostly along a direction its clean images never use. TARGET reads its own feature
    only, so its flip is "more of TARGET's typical feature": the alignment's signature. The QP verdict sees
    nothing (TARGET's flip is the longest, not the shortest)."""

    def __init__(self, spare_for_target_only: bool = False) -> None:
        super().__init__()
        self.rows = row_means(C, SIZE)
        self.head = nn.Linear(2 * C, C)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, :C] = 4.0 * torch.eye(C)
            for c in range(C):
                if (c == TARGET) == spare_for_target_only:
                    self.head.weight[c, C + c] = 10.0
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.rows(x.flatten(1))
        return self.head(torch.cat([feats, torch.zeros_like(feats)], dim=1))


def _images() -> Images:
    return row_images(C, SIZE, n_per_class=10, background=0)  # black other rows: μ_c lies along unit c


def test_alignment_flags_a_target_the_flip_norms_miss_and_joins_like_a_probe():
    model, images = _SpareUnits().eval(), _images()
    plain = detect(model, images, device="cpu", noise_probe=0.0, alignment=False)
    assert plain.target_classes == [] and "alignment_scores" not in plain.extra
    assert int(np.argmax(plain.extra["class_norms"])) == TARGET  # the QP verdict: TARGET is the hardest to reach
    report = detect(model, images, device="cpu", noise_probe=0.0)  # on by default
    assert tac.DEFAULT_ALIGNMENT is True
    assert report.target_classes == [TARGET]
    a, idx = np.asarray(report.extra["alignment"]), np.asarray(report.extra["alignment_scores"])
    assert a[TARGET] < 0.8 * np.median(a) and idx[TARGET] > report.threshold > 2 * np.delete(idx, TARGET).max()
    np.testing.assert_allclose(idx, np.abs(report.extra["alignment_index"]))
    assert report.extra["alignment_index"][TARGET] > 0  # the flip leans on μ_p
    assert ((a > 0) & (a <= 1 + 1e-7)).all()
    # the QP verdict is kept apart: the probes' noise terms answer to it alone
    assert report.extra["clean_scores"] == plain.scores
    np.testing.assert_allclose(report.scores, np.maximum(plain.scores, idx))
    assert probe_unlearning_terms(report, [TARGET], probe_only=True) == []  # no probe ran, so no noise term


def test_alignment_also_flags_a_target_whose_flip_avoids_its_mean_latent():
    # the mirror image (as clean-label SIG targets showed): only TARGET reads a spare unit its clean images never
    # use, so its flip runs along it, while every other class is reached through its own typical feature
    model = _SpareUnits(spare_for_target_only=True).eval()
    report = detect(model, _images(), device="cpu", noise_probe=0.0)
    a, index = np.asarray(report.extra["alignment"]), np.asarray(report.extra["alignment_index"])
    assert a[TARGET] > np.median(a) and index[TARGET] < -report.threshold
    assert TARGET in report.target_classes and report.scores[TARGET] == pytest.approx(-index[TARGET])


def test_alignment_runs_only_on_the_clean_reserve_not_on_the_probes():
    report = detect(_SpareUnits().eval(), _images(), device="cpu", noise_probe=0.1)
    without = detect(_SpareUnits().eval(), _images(), device="cpu", noise_probe=0.1, alignment=False)
    assert report.extra["probe_scores"] == without.extra["probe_scores"]  # the probe's verdict has no alignment
    assert len(report.extra["alignment_scores"]) == len(report.extra["probe_scores"]) == C
    expected = np.maximum.reduce([report.extra["clean_scores"], report.extra["alignment_scores"],
                                  report.extra["probe_scores"]])
    np.testing.assert_allclose(report.scores, expected)


def test_alignment_is_skipped_when_a_class_has_no_clean_sample():
    images = _images()
    keep = np.flatnonzero(images.y != 5)
    report = detect(_SpareUnits().eval(), images.subset(keep), device="cpu", noise_probe=0.0)
    assert report.extra["alignment"].startswith("skipped") and "alignment_scores" not in report.extra


def test_tac_takes_and_validates_the_alignment_switch():
    model, images = _SpareUnits().eval(), _images()
    off = make_defense("tac", alignment=False, noise_probe=0.0, detect_only=True).run(model, images, device="cpu")
    on = make_defense("tac", noise_probe=0.0, detect_only=True).run(model, images, device="cpu")
    assert off.detection.target_classes == [] and on.detection.target_classes == [TARGET]
    with pytest.raises(SpecError, match="alignment"):
        make_defense("tac", alignment="yes")
    with pytest.raises(SpecError, match="alignment"):
        detect(model, images, device="cpu", alignment=1)
