"""FIRE: inference-time repair of a backdoored model along its latent backdoor directions.

Ahlers et al. (arXiv 2602.10780) view a trigger as directions ``βₗ`` in the latent spaces between layers:
triggered inputs sit near ``xₗ + βₗ``. At inference the features of layer ``ℓ`` are moved back,
``x̃ₗ = xₗ − αₗ βₗ``, and the rest of the network runs unchanged. :func:`repair` estimates the directions,
clean statistics and repair strengths and returns a :class:`RepairedModel`: an ``nn.Module`` wrapping the
original model through forward hooks (same call signature, weights untouched).

Where the repair acts (``layer``): the penultimate latent, i.e. the input of the linear head (default,
``"penultimate"``), or the OUTPUT of any named module(s); a direction has the shape of what it shifts.

Where a direction comes from (``source``; estimators in :mod:`latentguard.latent.directions`):

``"qp"`` (clean data only, default)
    the backdoor target ``p`` is given (``target``) or detected by TAC on the reserve's penultimate latents
    (the QP for every class, the classes with abnormally small ``‖s_k‖`` flagged at TAC's default α); the
    direction is the TAC flip perturbation ``s_p`` at the penultimate layer and, at an intermediate layer, a
    shared offset ``δ`` optimised through the rest of the network to push clean data into ``p`` under an L2
    penalty (our extension; no poisoned sample needed);
``"centroid"`` (clean data only)
    the offset of the clean class-``p`` mean from the other classes' mean at the layer (a backdoor moves
    triggered inputs to where ``p`` lives; any layer, no optimisation);
``"paired"``
    mean (or top principal direction) of the activation differences of paired clean/triggered images;
``"unpaired"``
    the paper's difference of means between suspicious images (enlarged with augmented views) and the clean
    reserve seen through the same augmentations.

How the shift is applied (``rule``):

``"constant"``
    the paper's rule ``x̃ = x − α β`` for every input.
``"gated"`` (default)
    only the excess of the projection on the unit direction ``β̂`` over what clean data of the input's class
    shows is removed: ``π(x) = ⟨x, β̂⟩``, ``τ_c`` = the clean ``quantile`` of ``π`` over the clean inputs of
    class ``c``, and ``x̃ = x − α · max(0, π(x) − τ_c) · β̂``. An input below its threshold runs bit-identically
    to the undefended model. Statistics must be per class: the projection is naturally high on clean images
    of the target class, so one threshold shared by all classes fires on them. With ``floor=True`` the shift
    stops at the clean mean ``μ_c`` of the class, ``min(α·excess, max(excess, π − μ_c))``, so that a strong
    trigger's large excess is not pushed past the class it came from into a third class. The default is
    ``floor=False``, by measurement on the real-data zoo (``benchmarks/fire_floor.md``, ACC / ASR %): CIFAR-10 BadNets 80.5 / 27.6 with the floor → 80.2 / 4.6 without, WaNet
    78.9 / 28.5 → 79.7 / 23.2, GTSRB BadNets 97.7 / 59.0 → 97.8 / 6.8. A real trigger moves the latent along
    s_p about twice as far as the minimal flip ‖s_p‖ (``benchmarks/tac_direction.md``) and partly across it;
    stopping at the class mean leaves that orthogonal rest enough to keep the target, while the full
    ``α · excess`` overshoots it. On digits the floor helped (below); the real-data models decided.
    The clean-accuracy ``tolerance`` (default 0.02) bounds that choice; at 0.01 the zoo keeps ACC within one
    point on every cell but CIFAR-10 BadNets' ASR rises from 4.6 to 13.4 % (``benchmarks/fire_tolerance.md``).

Which class ``c`` indexes the statistics (``gate``):

``"predicted"``
    the unrepaired prediction. On a triggered input that is the target ``p`` itself, so the input is compared
    with clean images of ``p`` — where the trigger moves latents to where ``p`` already lives, the gate never
    opens.
``"neutral"`` (default)
    the prediction once the projection on ``β̂`` is set to its clean mean, ``x − (π(x) − π̄) β̂``: the class the
    input supports apart from the backdoor direction. A triggered image of class ``k`` is then compared with
    clean images of ``k`` (low projection: the gate opens), a clean image of ``p`` keeps ``p`` (high
    threshold: untouched).

The per-source stage (``per_source``, on by default for ``source="qp"`` at the penultimate layer): a real
trigger moves an image of class ``a`` along that class's own TAC perturbation ``s_{a→p}``: on the GTSRB
models the median per-image cosine of the real trigger change is 0.74–0.87 with ``s_{a→p}`` against 0.29–0.66
with the shared ``s_p`` (``benchmarks/tac_direction.md``), so the shared shift leaves part of the trigger. The pairwise QP on the labelled reserve gives every
``s_{a→p}``; an input whose projection on ``β̂`` exceeds ``τ_flag`` (the clean ``quantile`` over all clean
inputs) is, after the shared shift, also moved back by ``α · max(0, ⟨x, û_{a→p}⟩ − τ_{a→p})`` along
``û_{a→p}``, with ``a`` the best class but ``p`` of the unrepaired latent and ``τ_{a→p}`` the clean quantile
over class ``a``. Cross-fitting also counts synthetic inputs ``x + s_{a→p}`` of each class ``a``. The stage was
chosen on eight zoo models under the earlier α rule (``select="restored"``; those rows are in
``benchmarks/fire_zoo/superseded.jsonl``). Re-measured with everything else at its default (``qp`` against
``qp-shared``; ACC / ASR %): GTSRB TrojanNN 98.0 / 96.6 → 97.6 / 0.0, GTSRB BadNets 97.8 / 6.8 → 97.5 / 1.2,
GTSRB WaNet 97.2 / 86.6 → 97.1 / 35.5, CIFAR-10 WaNet 78.6 / 12.1 → 78.8 / 10.6, GTSRB Blend 97.3 / 0.0 →
96.5 / 0.0, CIFAR-10 SIG 75.1 / 0.1 → 75.1 / 0.0, CIFAR-10 TrojanNN 80.8 / 0.0 → 81.3 / 0.1; worse on CIFAR-10
BadNets, 80.2 / 4.6 → 80.1 / 9.9, and CIFAR-10 InputAware (built later, held out), 80.3 / 30.1 → 80.5 / 35.5.

The defaults (but the floor) were chosen by measurement on digits: ``small_cnn`` width 16 trained 6 epochs on 10 % poisoned
data (target 0), clean reserve of 200 training images, ``source="qp"`` at the penultimate layer, α and
quantile chosen as below; test ACC / ASR / RA, means over 4 seeds:

=======  ====================  ====================  ====================  ====================  ====================
attack   undefended            constant              constant, α = 1       gated, predicted      gated, neutral
=======  ====================  ====================  ====================  ====================  ====================
badnets  0.968 / 0.954 / 0.04  0.953 / 0.840 / 0.15  0.722 / 0.129 / 0.60  0.968 / 0.925 / 0.07  0.961 / 0.279 / 0.60
blend    0.969 / 0.992 / 0.01  0.938 / 0.816 / 0.13  0.678 / 0.001 / 0.45  0.969 / 0.993 / 0.01  0.959 / 0.454 / 0.36
=======  ====================  ====================  ====================  ====================  ====================

The constant shift removes the backdoor only at a strength that costs about 25–30 points of clean accuracy;
the strength it may use within 2 points (α 0.25–0.5) leaves most of the backdoor in place. Gating by the
predicted class leaves triggered inputs alone. The neutral gate (here with the floor) removes about 70 % of badnets' and 55 % of
blend's success for about one point of accuracy (seeds vary: badnets ASR 0.05–0.65); without the floor it
gets badnets 0.963 / 0.477 / 0.47 and blend 0.961 / 0.618 / 0.30. The score's AUROC on triggered vs clean
test images is 0.960 (badnets) and 0.934 (blend) with neutral-class statistics, 0.846 / 0.668 with
predicted-class ones. On the same models ``source="centroid"`` gives 0.961 / 0.376 / 0.55 and
0.954 / 0.588 / 0.38, ``source="paired"`` (triggered copies of the reserve) 0.963 / 0.131 / 0.78 and
0.958 / 0.396 / 0.50.

Choosing ``α`` and ``quantile`` (clean data only): ``folds``-fold cross-fitting on the clean reserve — for
each fold the statistics are fitted on the other folds and every candidate (quantile × α) is applied to the
fold. A candidate is feasible when its clean accuracy stays within ``tolerance`` of the undefended model's;
among the feasible ones the one that best *undoes synthetic backdoor inputs* wins: the direction itself, once
and twice, is added to the fold's activations (``x + β``, ``x + 2β``; a real trigger moves the latent 1.1–2.3×
as far as the minimal flip), and of the inputs this flips, the fraction the repair moves off the prediction
the synthetic trigger caused is counted, as ASR counts (ties: smaller α, then higher quantile). The earlier
rule, ``select="restored"``, added ``x + β`` alone and counted the inputs brought back to their clean
prediction; its share falls once α overshoots along ``β`` (past the clean class), while a real trigger, which
also moves the latent across ``β``, needs that overshoot, so it chose α 1–2 where the backdoor needed more. On
18 digits models (``small_cnn`` width 16, 12 epochs, target 0, a reserve of 20 % of the training set, seeds
0–5; a development set, not the zoo) ``"left"`` brings BadNets' mean test ASR from 24.0 to 11.2 % and
Blend's from 54.0 to 23.9 % (worse on none of the 12), at 1.9 and 1.2 points of ACC against 1.6 and 1.3; on
SIG models whose backdoor did not take (ASR ≤ 6 %) it spends 1.6 points against 0.9. The price is RA: the
larger α sends triggered inputs past their clean class into others (mean RA 49 → 34 % BadNets, 29 → 16 %
Blend). Rules in between (the best "restored" share among the candidates within ε of the best "left" share)
move along the same trade-off on these models (ε = 0.01: ASR 20.9 / 27.1 %, RA 39.8 / 23.1 %); none kept both.
On the zoo (``benchmarks/fire_zoo/``, rows ``qp`` against ``qp-restored``, one seed) the two rules choose
the same α on three of the nine flagged models (CIFAR-10 BadNets, WaNet, TrojanNN) and ``"left"`` a larger one
on the other six; GTSRB TrojanNN goes from 97.7 / 10.0 / 21.8 to 97.6 / 0.0 / 1.7
(ACC / ASR / RA %), GTSRB BadNets keeps ASR 1.2 % with RA 63.0 → 27.8 %, GTSRB WaNet 37.4 → 35.5 %, CIFAR-10
InputAware 36.2 → 35.5 %, and GTSRB Blend costs 0.3 more points of ACC (ASR 0.0 % with both).
``select="restored"`` is the choice when triggered inputs must get their own label
back rather than just lose the attacker's. With the paired or unpaired
source the defender's real suspicious inputs rank first: the share the repair moves off the backdoor's
prediction (paired: of the triggered copies the backdoor flips; unpaired: of the suspicious images predicted as
their most frequent class), then, paired only, the share brought back to the clean partner's prediction; the
synthetic share breaks the remaining ties. The final statistics are then computed on the whole reserve.

Per-input suspicion (:meth:`RepairedModel.score`, the defense result's ``input_score``): the projection
standardised by the clean mean and standard deviation of the input's class (as chosen by ``gate``),
``(π − μ_c) / σ_c``, the maximum over directions and layers; higher = more suspicious.

Run-time refinement: :meth:`RepairedModel.observe` folds inputs whose score exceeds a threshold into an
:class:`~latentguard.latent.directions.OnlineDirection` (running difference of means against the clean
reference, bounded memory) and re-derives the directions and statistics, so the repair follows the
poisoned inputs it sees.

Saving: :func:`save_repair` writes a ``torch.save`` file of tensors, strings, numbers and lists only
(loadable with ``torch.load(weights_only=True)``); :func:`load_repair` refuses anything that needs unpickling
of objects and checks the directions against the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import Defense, DefenseResult, register_defense
from latentguard.defenses.fire.build import SOURCES, _augmented, _check_images, repair  # noqa: F401  (re-exported)
from latentguard.defenses.fire.choice import (  # noqa: F401  (re-exported: importable from here as before the split)
    _FAST_CHOICE,
    ALPHAS_GATED,
    ALPHAS_MEASURED,
    ALPHAS_QP,
    QUANTILES,
    RESTORED_SCALES,
    SELECTIONS,
    SYNTHETIC_SCALES,
    _adding,
    _choose,
    _head_inputs,
    _Inputs,
    _Observed,
    _predict,
    _Restoration,
    _stratified_folds,
)
from latentguard.defenses.fire.sites import (  # noqa: F401  (re-exported)
    PENULTIMATE,
    _collect,
    _flat,
    _hooks,
    _layer_names,
    _on,
    _resolve_sites,
    _Site,
    _site_shape,
)
from latentguard.defenses.fire.storage import (  # noqa: F401  (re-exported)
    _SAFETENSORS_KEY,
    _check_layer_shapes,
    _field,
    _read_safetensors,
    load_repair,
    save_repair,
)
from latentguard.defenses.fire.wrapper import (  # noqa: F401  (re-exported)
    _SOURCE_TENSORS,
    _STATE_TENSORS,
    DEFAULT_QUANTILE,
    FORMAT,
    GATES,
    MAX_CALIBRATION,
    RULES,
    RepairedModel,
    _gate_shift,
    _HeadCache,
)
from latentguard.errors import SpecError

__all__ = [
    "GATES",
    "PENULTIMATE",
    "RULES",
    "SELECTIONS",
    "SOURCES",
    "Fire",
    "RepairedModel",
    "load_repair",
    "repair",
    "save_repair",
]


@register_defense
class Fire(Defense):
    """FIRE as a run-time defense on the clean reserve (``source="qp"``); see the module docstring."""

    name = "fire"
    kind = "runtime"

    @dataclass
    class Params:
        layer: str | list[str] | None = None
        rule: str = "gated"
        gate: str = "neutral"
        floor: bool = False
        source: str = "qp"
        alpha: float | None = None
        quantile: float | None = None
        target: int | list[int] | None = None
        tolerance: float = 0.02
        folds: int = 4
        head: str | None = None  # name of the output nn.Linear (None: found automatically)
        per_source: bool | None = None  # the per-source stage (None: on for the qp source, gated rule, penultimate layer)
        select: str = "left"  # how synthetic triggers rank the alpha / quantile candidates ("left" or "restored")
        noise_probe: float | None = None  # σ of TAC's noise probe in the detection (None: TAC's default, 0: off)
        smooth_probe: float | None = None  # σ of TAC's smooth probe in the detection (None: TAC's default, 0: off)

        def __post_init__(self) -> None:
            if self.per_source is not None and not isinstance(self.per_source, bool):
                raise SpecError(f"fire: per_source must be true, false or null (automatic), got {self.per_source!r}")
            if self.per_source and (self.rule != "gated" or self.source != "qp" or _layer_names(self.layer) != [PENULTIMATE]):
                raise SpecError("fire: per_source needs source='qp', rule='gated' and the penultimate layer alone")
            if self.head is not None and not (isinstance(self.head, str) and self.head):
                raise SpecError(f"fire: head must be the name of the output nn.Linear, got {self.head!r}")
            for value, allowed, what in ((self.rule, RULES, "rule"), (self.gate, GATES, "gate"),
                                         (self.source, SOURCES, "source"), (self.select, SELECTIONS, "select")):
                if value not in allowed:
                    raise SpecError(f"fire: {what} must be one of {', '.join(allowed)}, got {value!r}")
            if self.source not in ("qp", "centroid"):
                raise SpecError(
                    f"fire: source {self.source!r} needs suspicious samples, which a defense run does not get: "
                    "use source='qp' or 'centroid', or call latentguard.defenses.fire.repair(..., poisoned=...)"
                )
            _layer_names(self.layer)
            a = self.alpha
            if a is not None and (isinstance(a, bool) or not (isinstance(a, int | float) and math.isfinite(a) and a >= 0)):
                raise SpecError(f"fire: alpha must be a non-negative number, got {a!r}")
            if self.quantile is not None and not (isinstance(self.quantile, int | float) and 0 < self.quantile <= 1):
                raise SpecError(f"fire: quantile must be in (0, 1], got {self.quantile!r}")
            if not (isinstance(self.tolerance, int | float) and 0 <= self.tolerance < 1):
                raise SpecError(f"fire: tolerance must be in [0, 1), got {self.tolerance!r}")
            for what, n in (("noise_probe", self.noise_probe), ("smooth_probe", self.smooth_probe)):
                if n is not None and (isinstance(n, bool) or not (isinstance(n, int | float) and 0 <= n <= 1)):
                    raise SpecError(f"fire: {what} must be a pixel-noise σ in [0, 1] or null (TAC's), got {n!r}")
            if isinstance(self.folds, bool) or not (isinstance(self.folds, int) and self.folds >= 2):
                raise SpecError(f"fire: folds must be an integer >= 2, got {self.folds!r}")

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        wrapper = repair(model, clean, target=p.target, layer=p.layer, rule=p.rule, gate=p.gate, floor=p.floor,
                         source=p.source, alpha=p.alpha, quantile=p.quantile, tolerance=p.tolerance, folds=p.folds,
                         device=device, seed=seed, head=p.head, per_source=p.per_source, select=p.select,
                         noise_probe=p.noise_probe, smooth_probe=p.smooth_probe)
        return self._result(wrapper, detection=wrapper.detection, input_score=wrapper.score, extra=dict(wrapper.info))
