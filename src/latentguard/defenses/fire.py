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
over class ``a``. Cross-fitting also counts synthetic inputs ``x + s_{a→p}`` of each class ``a``. Measured on
the zoo with everything else at its default (``benchmarks/fire_zoo/``, ``qp`` against ``qp-shared``; ACC / ASR %):
GTSRB TrojanNN 98.0 / 96.6 → 97.7 / 10.0, GTSRB BadNets 97.8 / 6.8 → 97.5 / 1.2, GTSRB WaNet 97.3 / 92.1 →
97.3 / 37.4, CIFAR-10 WaNet 79.7 / 23.2 → 78.8 / 10.6, CIFAR-10 TrojanNN 81.2 / 2.1 → 81.3 / 0.1, GTSRB Blend
97.3 / 0.0 → 96.8 / 0.0, CIFAR-10 SIG 75.1 / 0.1 unchanged; worse on CIFAR-10 BadNets, 80.2 / 4.6 → 80.1 / 9.9.

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
Blend). On the zoo (``benchmarks/fire_zoo/``, rows ``qp`` against ``qp-restored``, one seed) the two rules choose
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

import contextlib
import itertools
import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import (
    Defense,
    DefenseResult,
    DetectionReport,
    register_defense,
)
from latentguard.defenses.tac import PAIRWISE_MAX_CLASSES, latent_report
from latentguard.device import resolve_device
from latentguard.errors import ModelError, SpecError, UnsafeFileError
from latentguard.inference import eval_mode, to_float_images
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
from latentguard.models import named_layer, split_model

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

PENULTIMATE = "penultimate"
RULES = ("gated", "constant")
GATES = ("neutral", "predicted")
SOURCES = ("qp", "centroid", "paired", "unpaired")
SELECTIONS = ("left", "restored")
FORMAT = "latentguard.fire/1"

#: Candidate strengths. The QP direction is the *smallest* shift that flips the clean data, so a real trigger
#: may be larger; a measured (paired/unpaired) direction is not exceeded by the constant rule.
ALPHAS_GATED = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)
ALPHAS_QP = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
ALPHAS_MEASURED = (0.25, 0.5, 0.75, 1.0)
QUANTILES = (0.9, 0.95, 0.99, 1.0)
DEFAULT_QUANTILE = 0.99
MAX_CALIBRATION = 2048
#: Strengths ``c`` of the synthetic triggers ``x + c·β`` that choose α under ``select="left"``: the minimal flip
#: and twice it (a real trigger moves the latent 1.1–2.3× as far as ``s_p``, ``benchmarks/tac_direction.md``).
SYNTHETIC_SCALES = (1.0, 2.0)
#: ``select="restored"`` (the rule before ``"left"``): the minimal flip alone, counted back to the clean prediction.
RESTORED_SCALES = (1.0,)


# ----------------------------------------------------------------------------------------------------------
# sites: where a direction lives
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Site:
    name: str  # PENULTIMATE or a module name
    module: nn.Module
    kind: str  # "input" (forward pre-hook on the head) or "output" (forward hook)


def _resolve_sites(model: nn.Module, layers: Sequence[str], head: str | None) -> list[_Site]:
    sites = []
    for name in layers:
        if name == PENULTIMATE:
            if head is None:
                raise ModelError("the penultimate layer needs the head's name: pass head=NAME")
            module = named_layer(model, head)
            if not isinstance(module, nn.Linear):
                raise ModelError(f"layer {head!r} is a {type(module).__name__}, not the nn.Linear head: pass head=NAME")
            sites.append(_Site(name, module, "input"))
        else:
            sites.append(_Site(name, named_layer(model, name), "output"))
    return sites


def _layer_names(layer: str | Sequence[str] | None) -> list[str]:
    if layer is None:
        return [PENULTIMATE]
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"layer must be a layer name, a list of names or None (penultimate), got {layer!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"layer lists {names} with repeats: give each layer once")
    return names


@contextlib.contextmanager
def _hooks(pairs: Sequence[tuple[_Site, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for site, fn in pairs:
            if site.kind == "input":
                handles.append(site.module.register_forward_pre_hook(fn))
            else:
                handles.append(site.module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _on(site: _Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable:
    """A hook applying ``fn`` to the site's tensor (head input or module output); ``None`` = unchanged."""
    if site.kind == "input":

        def pre(_m: nn.Module, args: tuple) -> tuple | None:
            out = fn(args[0])
            return None if out is None else (out, *args[1:])

        return pre
    return lambda _m, _a, out: fn(out)


def _flat(t: Any, site: _Site, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ModelError(f"layer {site.name!r} produces {type(t).__name__}, not a tensor: repair another layer")
    flat = t.reshape(t.shape[0], -1)
    if flat.shape[1] != dim:
        raise ModelError(
            f"the repair's direction for layer {site.name!r} has {dim} elements but the layer gives "
            f"{flat.shape[1]} per sample: the repair was made for another model"
        )
    return flat


def _module_device(m: nn.Module) -> torch.device:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _collect(
    model: nn.Module, sites: Sequence[_Site], x: torch.Tensor, batch_size: int, dev: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unrepaired activations at ``sites`` (flattened, float32 CPU) and logits, batched, in eval mode."""
    acts: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    logits = []
    current: dict[str, torch.Tensor] = {}

    def grab(site: _Site) -> Callable:
        def keep(t: torch.Tensor) -> None:
            current[site.name] = t.reshape(t.shape[0], -1)

        return _on(site, keep)

    with eval_mode(model), _hooks([(s, grab(s)) for s in sites]):
        for start in range(0, x.shape[0], batch_size):
            current.clear()
            out = model(to_float_images(x[start : start + batch_size]).to(dev))
            for s in sites:
                if s.name not in current:
                    raise ModelError(f"layer {s.name!r} did not run during the forward pass: pick a layer on the model's path")
                acts[s.name].append(current[s.name].float().cpu())
            logits.append(out.float().cpu())
    if not logits:
        raise SpecError("no images given")
    return {n: torch.cat(v) for n, v in acts.items()}, torch.cat(logits)


@torch.no_grad()
def _site_shape(model: nn.Module, site: _Site, x1: torch.Tensor) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []

    def keep(t: torch.Tensor) -> None:
        seen.append(tuple(t.shape[1:]))

    with eval_mode(model), _hooks([(site, _on(site, keep))]):
        model(x1.to(_module_device(model)))
    if not seen:
        raise ModelError(f"layer {site.name!r} did not run during the forward pass: pick a layer on the model's path")
    return seen[-1]


# ----------------------------------------------------------------------------------------------------------
# the repaired model
# ----------------------------------------------------------------------------------------------------------


class RepairedModel(nn.Module):
    """A model whose latent features are shifted back along backdoor directions at inference (FIRE).

    ``forward`` has the wrapped model's signature; the weights are not modified and the hooks exist only
    during the wrapper's own calls (``wrapper.model(x)`` runs the undefended model; for the same reason one
    wrapper should not be called from several threads at once).

    Read-only views: ``directions`` (layer → ``(K, *S)`` directions ``β``, ``K`` = number of target classes),
    ``thresholds`` (layer → ``(K, C)`` clean thresholds ``τ``), ``alphas`` (layer → ``α``), ``targets``,
    ``info`` (how the repair was built) and ``detection`` (the detection report when the target was detected).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str],
        directions: Mapping[str, torch.Tensor],
        alphas: Mapping[str, float],
        rule: str = "gated",
        gate: str = "neutral",
        floor: bool = False,
        quantile: float = DEFAULT_QUANTILE,
        head: str | None = None,
        num_classes: int | None = None,
        targets: Sequence[int] = (),
        source: str = "qp",
        thresholds: Mapping[str, torch.Tensor] | None = None,
        proj_mean: Mapping[str, torch.Tensor] | None = None,
        proj_std: Mapping[str, torch.Tensor] | None = None,
        proj_ref: Mapping[str, torch.Tensor] | None = None,
        per_source: bool = False,
        source_directions: torch.Tensor | None = None,
        source_thresholds: torch.Tensor | None = None,
        flag_thresholds: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise SpecError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
        if gate not in GATES:
            raise SpecError(f"unknown gate {gate!r}: use one of {', '.join(GATES)}")
        if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
            raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
        self.model = model
        self.rule = rule
        self.gate = gate
        self.floor = bool(floor)
        self.per_source = bool(per_source)
        self.quantile = float(quantile)
        self.head_name = head
        self.source = source
        self.info: dict[str, Any] = dict(info or {})
        self.detection: DetectionReport | None = None
        self._sites = _resolve_sites(model, list(layers), head)
        self.layers = [s.name for s in self._sites]
        head_mod = named_layer(model, head) if head is not None else None
        if num_classes is None:
            if thresholds is not None:
                num_classes = int(torch.as_tensor(next(iter(thresholds.values()))).shape[-1])
            elif isinstance(head_mod, nn.Linear):
                num_classes = head_mod.out_features
            else:
                raise ModelError("num_classes is unknown: pass num_classes= or the head's name")
        self.num_classes = int(num_classes)
        if isinstance(head_mod, nn.Linear) and head_mod.out_features != self.num_classes:
            raise ModelError(
                f"the repair is for {self.num_classes} classes but the head {head!r} has {head_mod.out_features} "
                "outputs: the repair was made for another model"
            )
        self.targets = [int(t) for t in targets]
        if any(not 0 <= t < self.num_classes for t in self.targets):
            raise ModelError(f"targets {self.targets} are not classes of a {self.num_classes}-class model")
        self._alpha: dict[str, float] = {}
        self._active: bool | None = None
        self._fused: _HeadCache | None = None
        self._hook_fns: list[tuple[_Site, Callable]] | None = None
        self._single_head_site = len(self._sites) == 1 and self._sites[0].kind == "input"
        self._calibrated = thresholds is not None
        for i, site in enumerate(self._sites):
            beta = torch.as_tensor(directions[site.name]).detach().float().cpu()
            if beta.dim() < 2 or beta.shape[0] < 1:
                raise ModelError(f"direction for layer {site.name!r} must be (K, ...), got shape {tuple(beta.shape)}")
            if site.kind == "input" and beta[0].numel() != site.module.in_features:
                raise ModelError(
                    f"the repair's penultimate direction has {beta[0].numel()} elements but the head {head!r} "
                    f"takes {site.module.in_features}: the repair was made for another model"
                )
            k = beta.shape[0]
            stats = {}
            for key, given, fill in (("tau", thresholds, 0.0), ("mu", proj_mean, 0.0), ("sd", proj_std, 1.0)):
                t = torch.full((k, self.num_classes), fill) if given is None else torch.as_tensor(given[site.name]).float().cpu()
                if t.shape != (k, self.num_classes):
                    raise ModelError(
                        f"statistics for layer {site.name!r} must have shape ({k}, {self.num_classes}), got {tuple(t.shape)}"
                    )
                stats[key] = t
            ref = torch.zeros(k) if proj_ref is None else torch.as_tensor(proj_ref[site.name]).float().cpu().reshape(-1)
            if ref.shape != (k,):
                raise ModelError(f"reference projections for layer {site.name!r} must have shape ({k},), got {tuple(ref.shape)}")
            self.register_buffer(f"_beta{i}", beta)
            self.register_buffer(f"_unit{i}", unit_directions(beta.double()).float())
            self.register_buffer(f"_shift{i}", torch.zeros(beta[0].numel()))
            self.register_buffer(f"_ref{i}", ref)
            for key, t in stats.items():
                self.register_buffer(f"_{key}{i}", t)
        if self.per_source:
            self._init_source_stage(source_directions, source_thresholds, flag_thresholds)
        self.set_alpha(dict(alphas))
        # clean calibration cache (kept in memory only): images, activations, projections, classes
        self._calib_x: torch.Tensor | None = None
        self._calib_acts: dict[str, torch.Tensor] | None = None
        self._calib_proj: dict[str, torch.Tensor] | None = None
        self._calib_cls: torch.Tensor | None = None
        self._calib_batch = 256
        self._online: dict[str, OnlineDirection] | None = None
        self.eval()  # an inference wrapper: its model runs in eval mode (BatchNorm running statistics)

    def _init_source_stage(self, directions: torch.Tensor | None, thresholds: torch.Tensor | None,
                           flags: torch.Tensor | None) -> None:
        """Buffers of the per-source stage: ``s_{a→p}`` (K, C, d), their unit vectors, the clean thresholds
        ``τ_{a→p}`` (K, C) along them and the flag thresholds ``τ_flag`` (K,) on the shared direction."""
        if not self._single_head_site or self.rule != "gated":
            raise SpecError("per_source works with the gated rule at the penultimate layer alone: drop layer= or rule=")
        k, d = self._buf("beta", 0).shape[0], self._buf("beta", 0)[0].numel()
        if len(self.targets) != k:
            raise ModelError(f"per_source needs one target class per direction: {k} direction(s), targets {self.targets}")
        if directions is None:
            raise ModelError("per_source needs the per-source directions s_{a→p}: build the repair with repair(..., per_source=True)")
        src = torch.as_tensor(directions).detach().float().cpu()
        if src.shape != (k, self.num_classes, d) or not bool(torch.isfinite(src).all()):
            raise ModelError(f"per-source directions must be finite with shape ({k}, {self.num_classes}, {d}), "
                             f"got {tuple(src.shape)}: the repair was made for another model")
        tau = torch.zeros(k, self.num_classes) if thresholds is None else torch.as_tensor(thresholds).float().cpu()
        flag = torch.full((k,), math.inf) if flags is None else torch.as_tensor(flags).float().cpu().reshape(-1)
        if tau.shape != (k, self.num_classes) or flag.shape != (k,):
            raise ModelError(f"per-source thresholds must have shapes ({k}, {self.num_classes}) and ({k},), "
                             f"got {tuple(tau.shape)} and {tuple(flag.shape)}")
        self.register_buffer("_srcbeta0", src)
        self.register_buffer("_srcunit0", unit_directions(src.double().reshape(k * self.num_classes, d))
                             .reshape(k, self.num_classes, d).float())
        self.register_buffer("_srctau0", tau)
        self.register_buffer("_flagtau0", flag)

    # ------------------------------------------------------------------ views and settings
    def _buf(self, kind: str, i: int) -> torch.Tensor:
        return getattr(self, f"_{kind}{i}")

    @property
    def directions(self) -> dict[str, torch.Tensor]:
        return {s.name: self._buf("beta", i) for i, s in enumerate(self._sites)}

    @property
    def thresholds(self) -> dict[str, torch.Tensor]:
        return {s.name: self._buf("tau", i) for i, s in enumerate(self._sites)}

    @property
    def alphas(self) -> dict[str, float]:
        return dict(self._alpha)

    @property
    def active(self) -> bool:
        """False when the wrapper cannot change any output (every α or direction is zero)."""
        if self._active is None:
            self._active = any(self._alpha[s.name] > 0 and bool(self._buf("beta", i).any())
                               for i, s in enumerate(self._sites))
        return self._active

    def _changed(self) -> None:
        """Forget what is derived from α, the directions or the statistics (recomputed on next use)."""
        self._active = None
        self._fused = None
        self._hook_fns = None

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> RepairedModel:
        out = super()._apply(fn, *args, **kwargs)  # .to()/.cuda()/.half() replace the buffers
        self._changed()
        return out

    def set_alpha(self, alpha: float | Mapping[str, float]) -> RepairedModel:
        """Set ``α`` (one number for every layer, or layer → number)."""
        values = dict(alpha) if isinstance(alpha, Mapping) else {n: alpha for n in self.layers}
        if set(values) != set(self.layers):
            raise SpecError(f"alpha must give one value per repaired layer {self.layers}, got {sorted(values)}")
        for i, site in enumerate(self._sites):
            a = values[site.name]
            if isinstance(a, bool) or not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
                raise SpecError(f"alpha for layer {site.name!r} must be a non-negative number, got {a!r}")
            self._alpha[site.name] = float(a)
            beta = self._buf("beta", i)
            self._buf("shift", i).copy_((float(a) * beta.sum(dim=0)).reshape(-1))
        self._changed()
        return self

    def set_quantile(self, quantile: float) -> RepairedModel:
        """Recompute the thresholds for another clean ``quantile`` (needs the calibration cache)."""
        if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
            raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
        self.quantile = float(quantile)
        self._refresh_stats(recompute_classes=False)
        return self

    def extra_repr(self) -> str:
        return (f"rule={self.rule!r}, gate={self.gate!r}, layers={self.layers}, alphas={self._alpha}, "
                f"quantile={self.quantile}, targets={self.targets}, per_source={self.per_source}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.active:
            return self.model(x, *args, **kwargs)
        if self.rule == "gated" and not self._calibrated:
            raise SpecError("the gated repair has no clean statistics yet: call wrapper.calibrate(clean) first")
        if self.rule == "gated" and not self._single_head_site:
            return self._gated_passes(x, *args, **kwargs)
        with _hooks(self._repair_hooks()):
            return self.model(x, *args, **kwargs)

    def _repair_hooks(self) -> list[tuple[_Site, Callable]]:
        """The hooks of a one-pass repair (constant rule, or gated at the penultimate site), built once per setting."""
        if self._hook_fns is None:
            if self.rule == "constant":
                self._hook_fns = [(s, self._constant_hook(i, s)) for i, s in enumerate(self._sites)]
            else:
                self._hook_fns = [(self._sites[0], self._gated_head_hook())]
        return self._hook_fns

    def _head_forward(self, z: torch.Tensor) -> torch.Tensor:
        """``forward`` from the head's input ``z`` on (single penultimate site): the head with the repair's hook."""
        head = self._sites[0].module
        if not self.active:
            return head(z)
        if self.rule == "gated" and not self._calibrated:
            raise SpecError("the gated repair has no clean statistics yet: call wrapper.calibrate(clean) first")
        with _hooks(self._repair_hooks()):
            return head(z)

    def _constant_hook(self, i: int, site: _Site) -> Callable:
        shift = self._buf("shift", i)
        return _on(site, lambda t: (_flat(t, site, shift.numel()) - shift.to(t.dtype)).reshape(t.shape))

    def _fused_head(self, like: torch.Tensor) -> _HeadCache:
        """Cached tensors of the penultimate fast path, rebuilt when the head, the device or the repair change."""
        head = self._sites[0].module
        w, b = head.weight, head.bias
        key = (id(w), w._version, None if b is None else (id(b), b._version), like.device, like.dtype)
        if self._fused is None or self._fused.key != key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
                opts = {"device": like.device, "dtype": like.dtype}
                unit = self._buf("unit", 0).to(**opts).contiguous()
                wd = w.detach().to(**opts)
                tau_t = self._buf("tau", 0).T.to(**opts).contiguous()
                self._fused = _HeadCache(
                    key=key, unit=unit, weight=wd,
                    bias=torch.zeros(wd.shape[0], **opts) if b is None else b.detach().to(**opts),
                    neutral=-(unit @ wd.T), ref=self._buf("ref", 0).to(**opts), tau_t=tau_t,
                    tau_min=tau_t.min(dim=0).values, mu_t=self._buf("mu", 0).T.to(**opts).contiguous(),
                )
                if self.per_source:
                    self._fused.src_unit = self._srcunit0.to(**opts).contiguous()
                    self._fused.src_tau = self._srctau0.to(**opts)
                    self._fused.flag_tau = self._flagtau0.to(**opts)
        return self._fused

    def _head_classes(self, zf: torch.Tensor, proj: torch.Tensor, cache: _HeadCache) -> torch.Tensor:
        """Gate classes at the penultimate site: the head's prediction, on the neutralised latent if ``gate``
        says so (``logits + (π − π̄) A`` with ``A = −β̂ Wᵀ``: the head is linear)."""
        logits = F.linear(zf, cache.weight, cache.bias)
        if self.gate == "neutral":
            logits = torch.addmm(logits, proj - cache.ref, cache.neutral)
        return logits.argmax(dim=1)

    def _head_pass(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections ``(N, K)`` and gate classes at the penultimate site, from the latents alone."""
        cache = self._fused_head(zf)
        proj = F.linear(zf, cache.unit)
        return proj, self._head_classes(zf, proj, cache)

    def _gated_head_hook(self) -> Callable:
        site = self._sites[0]
        dim, alpha = self._buf("unit", 0).shape[1], self._alpha[site.name]

        def shared(zf: torch.Tensor, proj: torch.Tensor, cache: _HeadCache) -> torch.Tensor | None:
            if not bool((proj > cache.tau_min).any()):  # below every class's threshold: nothing to do
                return None
            cls = self._head_classes(zf, proj, cache)
            thr = cache.tau_t[cls]
            excess = (proj - thr).clamp_min(0)
            if not bool((excess > 0).any()):
                return None
            amount = alpha * excess
            if self.floor:
                amount = torch.minimum(amount, torch.maximum(excess, proj - cache.mu_t[cls]))
            return _gate_shift(zf, cache.unit, amount)

        def fn(z: torch.Tensor) -> torch.Tensor | None:
            zf = _flat(z, site, dim)
            cache = self._fused_head(zf)
            proj = F.linear(zf, cache.unit)
            out = shared(zf, proj, cache)
            if self.per_source:
                out = self._source_stage(zf, proj, out, cache, alpha)
            return None if out is None else out.reshape(z.shape)

        return _on(site, fn)

    def _source_stage(self, zf: torch.Tensor, proj: torch.Tensor, shifted: torch.Tensor | None, cache: _HeadCache,
                      alpha: float) -> torch.Tensor | None:
        """The per-source stage: an input whose projection on ``β̂_p`` exceeds the clean ``τ_flag`` is moved
        back along ``û_{a→p}`` (the unit TAC perturbation from its likely source class ``a``, the best class
        but ``p`` on the unrepaired latent) by ``α · max(0, ⟨x, û_{a→p}⟩ − τ_{a→p})``, after the shared shift.

        On the GTSRB zoo models a real trigger moves each class along its own ``s_{a→p}`` more than along the
        shared ``s_p`` (``benchmarks/tac_direction.md``); what the shared shift leaves is removed here."""
        flag = proj > cache.flag_tau
        if not bool(flag.any()):
            return shifted
        out = (zf if shifted is None else shifted).clone()
        logits = F.linear(zf, cache.weight, cache.bias)
        for k, p in enumerate(self.targets):
            rows = flag[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            others = logits[rows].clone()
            others[:, p] = -math.inf
            src = others.argmax(dim=1)
            unit = cache.src_unit[k][src]
            excess = ((out[rows] * unit).sum(dim=1) - cache.src_tau[k][src]).clamp_min(0)
            out[rows] = out[rows] - (alpha * excess)[:, None].to(out.dtype) * unit.to(out.dtype)
        return out

    def _amount(self, i: int, proj: torch.Tensor, cls: torch.Tensor, excess: torch.Tensor, alpha: float) -> torch.Tensor:
        """How far to move along each unit direction: ``α · excess``, with ``floor`` never past the class mean."""
        amount = alpha * excess
        if self.floor:
            room = torch.maximum(excess, proj - self._buf("mu", i)[:, cls].T)
            amount = torch.minimum(amount, room)
        return amount

    def _capture(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        acts: dict[str, torch.Tensor] = {}

        def grab(i: int, site: _Site) -> Callable:
            dim = self._buf("unit", i).shape[1]

            def keep(t: torch.Tensor) -> None:
                acts[site.name] = _flat(t, site, dim)

            return _on(site, keep)

        with _hooks([(s, grab(i, s)) for i, s in enumerate(self._sites)]):
            logits = self.model(x, *args, **kwargs)
        missing = [s.name for s in self._sites if s.name not in acts]
        if missing:
            raise ModelError(f"layer(s) {missing} did not run during the forward pass: repair layers on the model's path")
        return acts, logits

    def _neutral_logits(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits with every site's projections set to their clean means (the backdoor direction neutralised)."""

        def hook(i: int, site: _Site) -> Callable:
            unit, ref = self._buf("unit", i), self._buf("ref", i)

            def fn(t: torch.Tensor) -> torch.Tensor:
                tf = _flat(t, site, unit.shape[1])
                proj = tf.to(unit.dtype) @ unit.T
                return (tf - ((proj - ref) @ unit).to(tf.dtype)).reshape(t.shape)

            return _on(site, fn)

        with _hooks([(s, hook(i, s)) for i, s in enumerate(self._sites)]):
            return self.model(x, *args, **kwargs)

    def _analyse(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Unrepaired activations, projections (layer → ``(N, K)``), logits and gate classes of a batch."""
        acts, logits = self._capture(x, *args, **kwargs)
        proj = {s.name: acts[s.name].to(self._buf("unit", i).dtype) @ self._buf("unit", i).T for i, s in enumerate(self._sites)}
        if self.gate == "predicted":
            cls = logits.argmax(dim=1)
        elif self._single_head_site:
            cls = self._head_pass(acts[self.layers[0]])[1]
        else:
            cls = self._neutral_logits(x, *args, **kwargs).argmax(dim=1)
        return acts, proj, logits, cls

    def _gated_passes(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Gated repair at intermediate layers: an unrepaired pass, then repaired passes on open-gate rows only.

        With ``gate="neutral"`` the neutralised pass runs only on rows whose projection exceeds the lowest
        class threshold somewhere (the other rows cannot open a gate).
        """
        acts, logits = self._capture(x, *args, **kwargs)
        n = x.shape[0]
        dev = logits.device
        proj = [acts[s.name].to(self._buf("unit", i).dtype) @ self._buf("unit", i).T for i, s in enumerate(self._sites)]
        if self.gate == "predicted":
            cls = logits.argmax(dim=1)
        else:
            cand = torch.zeros(n, dtype=torch.bool, device=dev)
            for i, p in enumerate(proj):
                cand |= (p > self._buf("tau", i).min(dim=1).values).any(dim=1)
            if not bool(cand.any()):
                return logits
            cls = torch.zeros(n, dtype=torch.int64, device=dev)
            ci = cand.nonzero().squeeze(1)
            cls[ci] = self._neutral_logits(x[ci.to(x.device)], *args, **kwargs).argmax(dim=1).to(dev)
        excess = [(p - self._buf("tau", i)[:, cls].T).clamp_min(0) for i, p in enumerate(proj)]
        amounts = [self._amount(i, p, cls, e, self._alpha[s.name]) for i, (s, p, e) in enumerate(zip(self._sites, proj, excess, strict=True))]
        rows = torch.zeros(n, dtype=torch.bool, device=dev)
        for e in excess:
            rows |= (e > 0).any(dim=1)
        if not bool(rows.any()):
            return logits
        idx = rows.nonzero().squeeze(1)

        def hook(i: int, site: _Site) -> Callable:
            unit, amount = self._buf("unit", i), amounts[i][idx]
            return _on(site, lambda t: _gate_shift(_flat(t, site, unit.shape[1]), unit, amount).reshape(t.shape))

        with _hooks([(s, hook(i, s)) for i, s in enumerate(self._sites)]):
            repaired = self.model(x[idx.to(x.device)], *args, **kwargs)
        out = logits.clone()
        out[idx] = repaired.to(out.dtype)
        return out

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def projections(self, x: torch.Tensor, *, batch_size: int = 512) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Projections ``π`` (layer → ``(N, K)``) of the unrepaired activations on the unit directions, and
        the class each input's statistics are taken from (``gate``). Images float in [0, 1] or uint8."""
        dev = _module_device(self)
        proj: dict[str, list[torch.Tensor]] = {s.name: [] for s in self._sites}
        classes = []
        with eval_mode(self):
            for start in range(0, x.shape[0], batch_size):
                _, p, _, cls = self._analyse(to_float_images(x[start : start + batch_size]).to(dev))
                for name, v in p.items():
                    proj[name].append(v.float().cpu())
                classes.append(cls.cpu())
        k = {s.name: self._buf("unit", i).shape[0] for i, s in enumerate(self._sites)}
        return (
            {n: torch.cat(v) if v else torch.zeros(0, k[n]) for n, v in proj.items()},
            torch.cat(classes) if classes else torch.zeros(0, dtype=torch.int64),
        )

    @torch.no_grad()
    def score(self, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        """Per-input suspicion ``max_{layer, k} (π − μ_c) / σ_c`` (CPU float, higher = more suspicious)."""
        proj, cls = self.projections(x, batch_size=batch_size)
        best = torch.full((cls.shape[0],), -math.inf)
        for i, s in enumerate(self._sites):
            mu, sd = self._buf("mu", i).cpu(), self._buf("sd", i).cpu()
            z = (proj[s.name] - mu[:, cls].T) / sd[:, cls].T
            best = torch.maximum(best, z.max(dim=1).values)
        return torch.where(torch.isfinite(best), best, torch.zeros_like(best))

    # ------------------------------------------------------------------ clean statistics
    @torch.no_grad()
    def calibrate(
        self,
        clean: Images | torch.Tensor,
        *,
        quantile: float | None = None,
        batch_size: int = 256,
        max_samples: int = MAX_CALIBRATION,
        seed: int = 0,
    ) -> RepairedModel:
        """Compute the clean statistics (thresholds, means, standard deviations, reference projections).

        ``clean`` are clean images (an Images container or a float/uint8 NCHW tensor); at most
        ``max_samples`` of them (a seeded random subset) are used and kept in memory for :meth:`observe` and
        :meth:`set_quantile`. Only the model's predictions are used, never labels.
        """
        x = clean.tensors()[0] if isinstance(clean, Images) else to_float_images(clean)
        if x.dim() != 4 or x.shape[0] < 1:
            raise SpecError(f"calibration images must be a non-empty (N, C, H, W) batch, got {tuple(x.shape)}")
        if x.shape[0] > max_samples:
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            x = x[keep.sort().values]
        if quantile is not None:
            if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
                raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
            self.quantile = float(quantile)
        self._calib_x = x.cpu()
        self._calib_acts, _ = _collect(self.model, self._sites, x, batch_size, _module_device(self))
        self._calib_batch = batch_size
        self._online = None
        self._refresh_stats(recompute_classes=True)
        return self

    @torch.no_grad()
    def _refresh_stats(self, recompute_classes: bool = True) -> None:
        if self._calib_acts is None or self._calib_x is None:
            raise SpecError("no clean calibration data: call wrapper.calibrate(clean) first")
        if recompute_classes or self._calib_proj is None or self._calib_cls is None:
            self._calib_proj = {}
            for i, s in enumerate(self._sites):
                proj = self._calib_acts[s.name].double() @ self._buf("unit", i).double().T
                self._calib_proj[s.name] = proj
                self._buf("ref", i).copy_(proj.mean(dim=0).float())
            self._changed()
            self._calib_cls = self._clean_classes()
        for i, s in enumerate(self._sites):
            tau, mu, sd = class_projection_stats(self._calib_proj[s.name], self._calib_cls, self.num_classes, self.quantile)
            self._buf("tau", i).copy_(tau.float())
            self._buf("mu", i).copy_(mu.float())
            self._buf("sd", i).copy_(sd.float())
        if self.per_source:
            self._source_stats()
        self._calibrated = True
        self._changed()

    def _source_stats(self) -> None:
        """Clean thresholds of the per-source stage: ``τ_flag`` = the ``quantile`` of ``π`` over all clean inputs,
        ``τ_{a→p}`` = the ``quantile`` of ``⟨x, û_{a→p}⟩`` over the clean inputs of (gate) class ``a``."""
        assert self._calib_acts is not None and self._calib_proj is not None and self._calib_cls is not None
        name = self.layers[0]
        acts = self._calib_acts[name].double()
        self._flagtau0.copy_(torch.quantile(self._calib_proj[name], self.quantile, dim=0).float())
        for k in range(self._srcunit0.shape[0]):
            proj = acts @ self._srcunit0[k].double().T  # (N, C): column a is ⟨x, û_{a→p}⟩
            tau, _, _ = class_projection_stats(proj, self._calib_cls, self.num_classes, self.quantile)
            self._srctau0[k].copy_(tau.diagonal().float())

    def _clean_classes(self) -> torch.Tensor:
        assert self._calib_x is not None and self._calib_acts is not None and self._calib_proj is not None
        dev = _module_device(self)
        if self._single_head_site:
            name = self.layers[0]
            z = self._calib_acts[name].to(dev)
            return self._head_pass(z)[1].cpu()
        out = []
        with eval_mode(self.model):
            for start in range(0, self._calib_x.shape[0], self._calib_batch):
                xb = self._calib_x[start : start + self._calib_batch].to(dev)
                logits = self.model(xb) if self.gate == "predicted" else self._neutral_logits(xb)
                out.append(logits.argmax(dim=1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ online refinement
    @torch.no_grad()
    def observe(
        self,
        x: torch.Tensor,
        *,
        threshold: float = 3.0,
        decay: float | None = None,
        prior_weight: float = 32.0,
        batch_size: int = 512,
    ) -> int:
        """Refine the directions from run-time inputs; returns how many of ``x`` were flagged.

        Inputs whose :meth:`score` exceeds ``threshold`` are folded into a running mean of suspicious
        activations per layer (:class:`~latentguard.latent.directions.OnlineDirection`: bounded memory, the
        current direction as a prior worth ``prior_weight`` samples, optional forgetting ``decay``); the
        direction becomes ``mean(flagged) − mean(clean reference)`` and the clean statistics are recomputed
        from the calibration cache. ``α`` is kept (the gated rule only uses the unit direction).
        """
        if self._calib_acts is None:
            raise SpecError("online refinement needs clean reference data: call wrapper.calibrate(clean) first")
        if any(self._buf("beta", i).shape[0] != 1 for i in range(len(self._sites))):
            raise SpecError("online refinement supports one direction per layer: repair one target at a time")
        flagged = self.score(x, batch_size=batch_size) > threshold
        n = int(flagged.sum())
        if self._online is None:
            self._online = {
                s.name: OnlineDirection(
                    (self._calib_acts[s.name].shape[1],),
                    reference=self._calib_acts[s.name].double().mean(dim=0),
                    prior=self._buf("beta", i)[0].reshape(-1).double().cpu(),
                    prior_weight=prior_weight,
                    decay=decay,
                )
                for i, s in enumerate(self._sites)
            }
        if n == 0:
            return 0
        xs = to_float_images(x)[flagged.to(x.device)]
        acts, _ = _collect(self.model, self._sites, xs, batch_size, _module_device(self))
        for i, s in enumerate(self._sites):
            online = self._online[s.name]
            online.update(acts[s.name])
            beta = self._buf("beta", i)
            beta.copy_(online.direction.float().reshape(beta.shape))
            self._buf("unit", i).copy_(unit_directions(beta.double()).float())
        self.set_alpha(self._alpha)
        self._refresh_stats(recompute_classes=True)
        self.info["observed_flagged"] = int(self.info.get("observed_flagged", 0)) + n
        return n

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the repair on the same model: tensors and plain metadata only."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "rule": self.rule,
            "gate": self.gate,
            "floor": self.floor,
            "source": self.source,
            "quantile": float(self.quantile),
            "head": self.head_name or "",
            "layers": list(self.layers),
            "alphas": [float(self._alpha[n]) for n in self.layers],
            "targets": list(self.targets),
            "num_classes": int(self.num_classes),
            "calibrated": bool(self._calibrated),
        }
        for i in range(len(self._sites)):
            for key, kind in _STATE_TENSORS:
                out[f"{key}.{i}"] = self._buf(kind, i).detach().cpu().clone()
        if self.per_source:
            out["per_source"] = True
            for key, kind in _SOURCE_TENSORS:
                out[key] = self._buf(kind, 0).detach().cpu().clone()
        return out


_STATE_TENSORS = (("beta", "beta"), ("thresholds", "tau"), ("proj_mean", "mu"), ("proj_std", "sd"), ("proj_ref", "ref"))
_SOURCE_TENSORS = (("source_beta", "srcbeta"), ("source_thresholds", "srctau"), ("flag_thresholds", "flagtau"))


@dataclass
class _HeadCache:
    key: tuple
    unit: torch.Tensor  # (K, d) unit directions
    weight: torch.Tensor  # (C, d) head weight
    bias: torch.Tensor  # (C,)
    neutral: torch.Tensor  # (K, C) = −β̂ Wᵀ
    ref: torch.Tensor  # (K,) clean mean projections
    tau_t: torch.Tensor  # (C, K) thresholds
    tau_min: torch.Tensor  # (K,) lowest threshold over classes
    mu_t: torch.Tensor  # (C, K) clean class means
    src_unit: torch.Tensor | None = None  # (K, C, d) unit per-source directions û_{a→p} (per_source)
    src_tau: torch.Tensor | None = None  # (K, C) their clean thresholds
    flag_tau: torch.Tensor | None = None  # (K,) flag thresholds on β̂


def _gate_shift(zf: torch.Tensor, unit: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Remove ``amount_k · β̂_k`` from the rows with an open gate; the other rows stay bit-identical."""
    rows = (amount > 0).any(dim=1, keepdim=True)
    shifted = zf - (amount @ unit).to(zf.dtype)
    return torch.where(rows, shifted, zf)


# ----------------------------------------------------------------------------------------------------------
# building a repair
# ----------------------------------------------------------------------------------------------------------


def _augmented(x: torch.Tensor, views: int, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """``views`` random crops (zero padding of 1/8 of the size) and optional flips of every image, stacked."""
    from latentguard.train import augment_batch

    pad = max(1, round(x.shape[-1] / 8))
    return torch.cat([augment_batch(x, padding=pad, hflip=hflip, generator=gen) for _ in range(views)])


def _check_images(x: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(x, Images):
        x = x.tensors()[0]
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise SpecError(f"{what} must be an image tensor (N, C, H, W) or an Images container, got {type(x).__name__}")
    x = to_float_images(x)
    if x.dim() != 4 or x.shape[1:] != like.shape[1:] or x.shape[0] < 1:
        raise SpecError(f"{what} must be images of shape (N, {', '.join(map(str, like.shape[1:]))}), got {tuple(x.shape)}")
    return x


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, dev: torch.device,
             hooks: Sequence[tuple[_Site, Callable]] = ()) -> torch.Tensor:
    out = []
    with eval_mode(model), _hooks(hooks):
        for s in range(0, x.shape[0], batch_size):
            out.append(model(x[s : s + batch_size].to(dev)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


#: Evaluate the choice's candidates from cached head inputs when the only site is the penultimate one (the
#: same predictions as full passes); False forces full passes.
_FAST_CHOICE = True


@torch.no_grad()
def _head_inputs(wrapper: RepairedModel, x: torch.Tensor, batch_size: int,
                 dev: torch.device) -> list[torch.Tensor] | None:
    """The head's input of each batch of an unrepaired full pass over ``x``, or None when the model's output is
    not the head's own output of its only call (then only full passes give the wrapper's predictions)."""
    site = wrapper._sites[0]
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    taps = [(site, lambda _m, args: ins.append(args[0])),
            (_Site(site.name, site.module, "output"), lambda _m, _a, out: outs.append(out))]
    batches = []
    with eval_mode(wrapper.model), _hooks(taps):
        for s in range(0, x.shape[0], batch_size):
            ins.clear()
            outs.clear()
            logits = wrapper.model(x[s : s + batch_size].to(dev))
            if len(ins) != 1 or len(outs) != 1 or logits is not outs[0]:
                return None
            batches.append(ins[0])
    return batches


class _Inputs:
    """Images a candidate repair is scored on: full passes of the network, or — single penultimate site —
    the head alone on the latents a full pass gives it, captured once (pre-hooks fire on direct calls)."""

    def __init__(self, wrapper: RepairedModel, x: torch.Tensor, batch_size: int, dev: torch.device) -> None:
        self.wrapper, self.x, self.batch_size, self.dev = wrapper, x, batch_size, dev
        fast = _FAST_CHOICE and wrapper._single_head_site
        self.latents = _head_inputs(wrapper, x, batch_size, dev) if fast else None

    def subset(self, keep: torch.Tensor) -> _Inputs:
        """The images selected by the mask ``keep`` (their latents recaptured batch by batch, as a full pass)."""
        if bool(keep.all()):
            return self
        return _Inputs(self.wrapper, self.x[keep], self.batch_size, self.dev)

    @torch.no_grad()
    def predict(self, hooks: Sequence[tuple[_Site, Callable]] = (), *, repaired: bool = True) -> torch.Tensor:
        """Predictions of the wrapper (``repaired``) or the undefended model, with ``hooks`` registered first."""
        w = self.wrapper
        if self.latents is None:
            return _predict(w if repaired else w.model, self.x, self.batch_size, self.dev, hooks)
        head = w._sites[0].module
        call = w._head_forward if repaired else head
        with eval_mode(w), _hooks(hooks):
            out = [call(z).argmax(dim=1).cpu() for z in self.latents]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _adding(site: _Site, vec: torch.Tensor) -> tuple[_Site, Callable]:
    """A hook adding the fixed vector ``vec`` to every activation at ``site`` (a synthetic trigger)."""
    v = vec.reshape(-1).clone()
    return site, _on(site, lambda t: (_flat(t, site, v.numel()) + v.to(t.dtype)).reshape(t.shape))


class _Restoration:
    """Clean-only proxy of how well a repair undoes a backdoor: add each direction, times each scale, to the
    holdout's activations (a synthetic trigger) and keep the inputs this flips. ``select="left"`` counts how
    many the repair moves off the prediction the synthetic trigger caused (what ASR counts), ``"restored"``
    how many it brings back to their clean prediction (an overshoot past the clean class then counts against)."""

    def __init__(self, wrapper: RepairedModel, held: _Inputs, base: torch.Tensor, select: str = "left") -> None:
        self.select = select
        scales = SYNTHETIC_SCALES if select == "left" else RESTORED_SCALES
        # (hook, flipped inputs, their clean predictions, their predictions under the synthetic trigger)
        self.cases: list[tuple[tuple[_Site, Callable], _Inputs, torch.Tensor, torch.Tensor]] = []
        for i, site in enumerate(wrapper._sites):
            for k, scale in itertools.product(range(wrapper._buf("beta", i).shape[0]), scales):
                hook = _adding(site, scale * wrapper._buf("beta", i)[k])
                triggered = held.predict([hook], repaired=False)
                flipped = triggered != base
                if bool(flipped.any()):
                    self.cases.append((hook, held.subset(flipped), base[flipped], triggered[flipped]))
        if wrapper.per_source:  # each input of class a also gets its own source's s_{a→p}
            site, src = wrapper._sites[0], wrapper._buf("srcbeta", 0)
            for k, a in itertools.product(range(src.shape[0]), range(src.shape[1])):
                mine = base == a
                if not bool(src[k, a].any()) or not bool(mine.any()):
                    continue
                hook = _adding(site, src[k, a])
                sub, ys = held.subset(mine), base[mine]
                triggered = sub.predict([hook], repaired=False)
                flipped = triggered != ys
                if bool(flipped.any()):
                    self.cases.append((hook, sub.subset(flipped), ys[flipped], triggered[flipped]))

    @property
    def flipped(self) -> int:
        return sum(len(c[2]) for c in self.cases)

    def count(self) -> int:
        """How many of the flipped inputs the wrapper's current repair undoes (see the class docstring)."""
        if self.select == "left":
            return sum(int((xs.predict([hook]) != bad).sum()) for hook, xs, _, bad in self.cases)
        return sum(int((xs.predict([hook]) == ys).sum()) for hook, xs, ys, _ in self.cases)


class _Observed:
    """Real suspicious inputs the defender holds; counts how many a repair moves off the backdoor's prediction
    and how many it restores to the clean prediction, where that is known.

    ``paired``: each triggered copy that the backdoor flips away from its clean partner's prediction (the
    clean prediction is known). ``unpaired``: each suspicious image predicted as the set's most frequent class
    (the backdoor's, as far as the defender can tell; no clean prediction is known, so none counts as restored).
    """

    def __init__(self, wrapper: RepairedModel, x_triggered: torch.Tensor, got: torch.Tensor, want: torch.Tensor | None,
                 batch_size: int, dev: torch.device) -> None:
        """``got``: the unrepaired predictions of ``x_triggered``; ``want``: those of their clean partners (paired)."""
        if want is not None:
            keep = got != want
        else:
            keep = got == torch.mode(got).values if got.numel() else got.bool()
            want = torch.full_like(got, -1)
        self.inputs = _Inputs(wrapper, x_triggered[keep], batch_size, dev)
        self.expected, self.backdoored = want[keep], got[keep]

    @property
    def flipped(self) -> int:
        return int(self.expected.numel())

    def counts(self) -> tuple[int, int]:
        """(restored to the clean partner's prediction, no longer the backdoor's prediction)."""
        if not self.flipped:
            return 0, 0
        pred = self.inputs.predict()
        return int((pred == self.expected).sum()), int((pred != self.backdoored).sum())


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold id per sample: each class's samples shuffled and dealt round-robin over the ``k`` folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def _choose(wrapper: RepairedModel, x: torch.Tensor, y: torch.Tensor, info: dict[str, Any], *,
            alpha: float | Mapping[str, float] | None, quantile: float | None, tolerance: float, folds: int,
            seed: int, batch_size: int, dev: torch.device, observed: _Observed | None = None,
            select: str = "left") -> float:
    """Choose α and the quantile by ``folds``-fold cross-fitting on the clean reserve; returns the quantile.

    For each fold the statistics are fitted on the other folds and every candidate is scored on the fold:
    correct predictions, and synthetic backdoor inputs undone (see :class:`_Restoration`; ``select``). Summed
    over the folds, a candidate is feasible when its accuracy is within ``tolerance`` of the undefended model's;
    the feasible candidate undoing most wins, ties to the smaller α and then the higher quantile. When the
    defender holds real suspicious inputs (``observed``: the paired or unpaired source), the share of them moved
    off the backdoor's prediction ranks first, then the share restored to the clean prediction (paired only),
    and the synthetic share breaks the remaining ties: a synthetic trigger x + β only mimics the mean change of
    a real one. With the penultimate site alone the candidates run only the head, on latents captured once per
    fold (:class:`_Inputs`).
    """
    rule, source = wrapper.rule, wrapper.source
    grid_q = [wrapper.quantile] if rule == "constant" or quantile is not None else list(QUANTILES)
    if alpha is not None:
        grid_a: list[Any] = [dict(alpha) if isinstance(alpha, Mapping) else float(alpha)]
    else:
        grid_a = list(ALPHAS_GATED if rule == "gated" else ALPHAS_QP if source == "qp" else ALPHAS_MEASURED)
    base = _predict(wrapper.model, x, batch_size, dev)
    n = int(y.numel())
    base_correct = int((base == y).sum())
    fold = torch.from_numpy(_stratified_folds(y.numpy(), folds, seed))
    correct = np.zeros((len(grid_q), len(grid_a)), dtype=np.int64)
    restored = np.zeros_like(correct)
    seen = np.zeros_like(correct)
    left = np.zeros_like(correct)
    flipped = 0
    for f in range(folds):
        test = fold == f
        if not bool(test.any()) or bool(test.all()):
            continue
        wrapper.calibrate(x[~test], batch_size=batch_size, seed=seed)
        held = _Inputs(wrapper, x[test], batch_size, dev)
        restoration = _Restoration(wrapper, held, base[test], select)
        flipped += restoration.flipped
        for iq, q in enumerate(grid_q):
            wrapper.set_quantile(q)
            for ia, a in enumerate(grid_a):
                wrapper.set_alpha(a)
                correct[iq, ia] += int((held.predict() == y[test]).sum())
                restored[iq, ia] += restoration.count()
                if observed is not None:
                    back, off = observed.counts()
                    seen[iq, ia] += back
                    left[iq, ia] += off
    tried, best = [], None
    n_seen = observed.flipped * folds if observed is not None else 0
    for iq, q in enumerate(grid_q):
        for ia, a in enumerate(grid_a):
            a_val = a if isinstance(a, float) else max(a.values())
            ok = correct[iq, ia] >= base_correct - tolerance * n - 1e-6
            rest = restored[iq, ia] / flipped if flipped else 1.0
            real = seen[iq, ia] / n_seen if n_seen else 1.0
            off = left[iq, ia] / n_seen if n_seen else 1.0
            row = {"quantile": float(q), "alpha": float(a_val), "acc": float(correct[iq, ia] / n),
                   "synthetic": float(rest), "ok": bool(ok)}
            if n_seen:
                row.update(observed_restored=float(real), observed_left=float(off))
            tried.append(row)
            key = (round(off, 9), round(real, 9), round(rest, 9), -a_val, q)
            if ok and (best is None or key > best[0]):
                best = (key, a, q, float(correct[iq, ia] / n), float(rest))
    if best is None:  # nothing within tolerance: the weakest candidate
        best = (None, grid_a[0], grid_q[-1], float("nan"), float("nan"))
        info["note"] = "no candidate kept the clean accuracy within tolerance: the weakest one is used"
    _, chosen_a, chosen_q, acc, rest = best
    wrapper.set_alpha(chosen_a)
    info.update(folds=folds, cv_acc_before=base_correct / n, cv_acc_after=acc, select=select,
                synthetic_flipped=flipped, synthetic_undone=rest, tolerance=float(tolerance), candidates=tried)
    if observed is not None:  # the chosen candidate's key starts with its (left, restored) shares
        key = best[0] or (float("nan"), float("nan"))
        info.update(observed_flipped=observed.flipped, observed_left=key[0], observed_restored=key[1])
    return float(chosen_q)


def repair(
    model: nn.Module,
    clean: Images,
    *,
    target: int | Sequence[int] | None = None,
    layer: str | Sequence[str] | None = None,
    rule: str = "gated",
    gate: str = "neutral",
    floor: bool = False,
    source: str = "qp",
    alpha: float | Mapping[str, float] | None = None,
    quantile: float | None = None,
    poisoned: Any = None,
    tolerance: float = 0.02,
    folds: int = 4,
    augment: int = 4,
    paired_method: str = "mean",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    batch_size: int = 256,
    head: str | None = None,
    per_source: bool | None = None,
    select: str = "left",
) -> RepairedModel:
    """Estimate backdoor directions and clean statistics and wrap ``model`` in a :class:`RepairedModel`.

    Args:
        model: the (possibly backdoored) classifier, images in [0, 1] → logits; wrapped, not copied (it is
            moved to ``device`` and put in eval mode).
        clean: the defender's clean reserve (labels are only used for the holdout accuracy).
        target: backdoor target class(es) for ``source="qp"`` / ``"centroid"``; None detects them.
        layer: None / ``"penultimate"`` (the head's input), a module name (its output is shifted) or a list.
        rule: ``"gated"`` (default) or ``"constant"`` (the paper's ``x − αβ``).
        gate: the class whose clean statistics an input is compared with: ``"neutral"`` (default) or
            ``"predicted"`` (see the module docstring).
        floor: stop the gated shift at the clean mean of the input's class (default False, see the module docstring).
        source: ``"qp"`` or ``"centroid"`` (clean data only), ``"paired"`` or ``"unpaired"``.
        alpha: repair strength (one number or layer → number); None chooses it on the clean holdout.
        quantile: clean quantile of the gated thresholds; None chooses it on the holdout (gated rule) or
            uses 0.99.
        poisoned: ``"paired"``: triggered copies of the clean reserve's images, in its order, or a pair
            ``(clean_images, triggered_images)``; ``"unpaired"``: suspicious images, any number. Besides the
            direction they also rank the α / quantile candidates (see :func:`_choose`).
        tolerance: clean accuracy drop (cross-fitted on the reserve) allowed when choosing α / quantile.
        folds: number of cross-fitting folds for those choices.
        augment: augmented views per suspicious image (``"unpaired"``).
        paired_method: ``"mean"`` or ``"pca"`` (``"paired"``).
        per_source: add the per-source stage (see :meth:`RepairedModel._source_stage`): the TAC perturbations
            ``s_{a→p}`` of every source class (the pairwise QP on the reserve's labelled latents) repair
            inputs whose projection on ``β̂`` exceeds the clean ``quantile``. True needs ``source="qp"``, the
            gated rule and the penultimate layer alone; None (default) turns it on exactly then, for heads
            of up to :data:`~latentguard.defenses.tac.PAIRWISE_MAX_CLASSES` classes.
        select: how synthetic triggers rank the α / quantile candidates: ``"left"`` (default) counts the
            inputs of ``x + β`` and ``x + 2β`` moved off the prediction the trigger caused, ``"restored"`` (the
            earlier rule) those of ``x + β`` brought back to their clean prediction (see :func:`_choose`).
    """
    if not isinstance(clean, Images):
        raise SpecError("clean data must be an Images container: use latentguard.data.as_images(x, y)")
    for value, allowed, what in ((rule, RULES, "rule"), (gate, GATES, "gate"), (source, SOURCES, "source"),
                                 (select, SELECTIONS, "select")):
        if value not in allowed:
            raise SpecError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    if source in ("paired", "unpaired") and poisoned is None:
        raise SpecError(f"source {source!r} needs suspicious samples: pass poisoned=IMAGES (or use source='qp')")
    if quantile is not None and not (isinstance(quantile, int | float) and 0 < quantile <= 1):
        raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
    if not (isinstance(tolerance, int | float) and 0 <= tolerance < 1):
        raise SpecError(f"tolerance must be in [0, 1), got {tolerance!r}")
    if isinstance(folds, bool) or not (isinstance(folds, int) and folds >= 2):
        raise SpecError(f"folds must be an integer >= 2, got {folds!r}")
    if isinstance(augment, bool) or not (isinstance(augment, int) and augment >= 0):
        raise SpecError(f"augment must be a non-negative integer, got {augment!r}")
    names = _layer_names(layer)
    if per_source is not None and not isinstance(per_source, bool):
        raise SpecError(f"per_source must be True, False or None (automatic), got {per_source!r}")
    applicable = source == "qp" and rule == "gated" and names == [PENULTIMATE]
    if per_source and not applicable:
        raise SpecError("per_source needs source='qp', rule='gated' and the penultimate layer alone")
    if alpha is not None:
        values = list(alpha.values()) if isinstance(alpha, Mapping) else [alpha]
        if isinstance(alpha, Mapping) and set(alpha) != set(names):
            raise SpecError(f"alpha must give one value per repaired layer {names}, got {sorted(alpha)}")
        if any(isinstance(a, bool) or not (isinstance(a, int | float) and math.isfinite(a) and a >= 0) for a in values):
            raise SpecError(f"alpha must be a non-negative number, got {alpha!r}")

    dev = resolve_device(device)
    model.to(dev).eval()
    x_probe, _ = clean.subset(np.arange(min(2, len(clean)))).tensors()
    fm = split_model(model, head=head, example_input=x_probe.to(dev))
    num_classes = fm.num_classes
    if clean.num_classes != num_classes:
        raise SpecError(f"the clean reserve has {clean.num_classes} classes but the model outputs {num_classes}")
    sites = _resolve_sites(model, names, fm.head_name)

    choose = alpha is None or (rule == "gated" and quantile is None)
    x_fit, y_fit = clean.tensors()
    shapes = {s.name: _site_shape(model, s, x_fit[:1]) for s in sites}
    gen = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- directions
    targets: list[int] = []
    detection: DetectionReport | None = None
    directions: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"source": source, "rule": rule, "gate": gate, "layers": names}
    source_dirs: torch.Tensor | None = None
    # the defender's real suspicious images with their unrepaired predictions and, paired, their clean partners'
    suspicious: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    if source in ("qp", "centroid"):
        head = fm.head
        pen = _resolve_sites(model, [PENULTIMATE], fm.head_name)
        acts_pen, logits_fit = _collect(model, pen, x_fit, batch_size, dev)
        if target is None:
            t0 = time.perf_counter()  # TAC's verdict on the latents just collected (no second pass)
            detection = latent_report(acts_pen[PENULTIMATE], head, labels=y_fit)
            detection.seconds = time.perf_counter() - t0
            targets = [int(t) for t in detection.target_classes]
        else:
            targets = [int(target)] if isinstance(target, int | np.integer) else [int(t) for t in target]
            if not targets or any(not 0 <= t < num_classes for t in targets) or len(set(targets)) != len(targets):
                raise SpecError(f"target must be distinct class(es) in [0, {num_classes}), got {target!r}")
        bias = head.bias.detach() if head.bias is not None else torch.zeros(num_classes, device=head.weight.device)
        acts_all = acts_pen
        if source == "centroid" and any(s.kind == "output" for s in sites):
            acts_all = {**acts_pen, **_collect(model, [s for s in sites if s.kind == "output"], x_fit, batch_size, dev)[0]}
        predicted = logits_fit.argmax(dim=1)
        # a clean-label backdoor can own its class: the CIFAR-10 SIG model predicts class 0 for none of the clean
        # airplanes, so the centroid of such a class falls back to the clean images labelled p
        unpredicted = [p for p in targets if not bool((predicted == p).any())]
        if source == "centroid" and unpredicted:
            info["centroid_from_labels"] = unpredicted
        for site in sites:
            if not targets:
                betas = [torch.zeros(shapes[site.name])]
            elif source == "centroid":
                betas = [class_mean_direction(acts_all[site.name], y_fit if p in unpredicted else predicted, p)
                         for p in targets]
            elif site.kind == "input":
                betas = [qp_direction(acts_pen[PENULTIMATE], head.weight.detach(), bias, p) for p in targets]
            else:
                betas = [layer_flip_delta(model, site.module, x_fit, p, device=dev, seed=seed) for p in targets]
            directions[site.name] = torch.stack([b.reshape(shapes[site.name]) for b in betas]).float()
        if not targets:
            info["note"] = "no backdoor target detected: the wrapper leaves every output unchanged"
        elif per_source or (per_source is None and applicable and num_classes <= PAIRWISE_MAX_CLASSES):
            from latentguard.latent.qp import pairwise_flip_perturbations

            pairs = pairwise_flip_perturbations(acts_pen[PENULTIMATE].double().cpu().numpy(), y_fit.numpy(),
                                                head.weight.detach().double().cpu().numpy(),
                                                bias.detach().double().cpu().numpy())
            # (K, C, d): s_{a→p} for every source a of each target p; no clean image of a (or a = p) → zero
            source_dirs = torch.from_numpy(np.nan_to_num(pairs.perturbations[:, targets, :].transpose(1, 0, 2), nan=0.0))
    elif source == "paired":
        if isinstance(poisoned, tuple | list) and len(poisoned) == 2:
            xc = _check_images(poisoned[0], x_fit, "paired clean images")
            xt = _check_images(poisoned[1], x_fit, "paired triggered images")
        else:
            xc, xt = clean.tensors()[0], _check_images(poisoned, x_fit, "poisoned")
        if xc.shape[0] != xt.shape[0]:
            raise SpecError(
                f"paired source needs one triggered image per clean image: got {xc.shape[0]} clean and "
                f"{xt.shape[0]} triggered (pass poisoned=(clean_images, triggered_images))"
            )
        ac, logits_c = _collect(model, sites, xc, batch_size, dev)
        at, logits_t = _collect(model, sites, xt, batch_size, dev)
        for site in sites:
            beta = paired_direction(ac[site.name], at[site.name], method=paired_method)
            directions[site.name] = beta.reshape(1, *shapes[site.name]).float()
        info["pairs"] = int(xc.shape[0])
        suspicious = (xt, logits_t.argmax(dim=1), logits_c.argmax(dim=1))
    else:
        xs = _check_images(poisoned, x_fit, "poisoned")
        views = torch.cat([xs, _augmented(xs, augment, gen, clean.hflip)]) if augment else xs
        a_sus, logits_sus = _collect(model, sites, views, batch_size, dev)
        a_clean, _ = _collect(model, sites, x_fit, batch_size, dev)
        a_aug = _collect(model, sites, _augmented(x_fit, 1, gen, clean.hflip), batch_size, dev)[0] if augment else None
        for site in sites:
            ref = a_clean[site.name].double().mean(dim=0)
            if a_aug is not None:  # the clean mean under the same mix of original and augmented views
                ref = (ref + augment * a_aug[site.name].double().mean(dim=0)) / (1 + augment)
            beta = unpaired_direction(ref[None], a_sus[site.name])
            directions[site.name] = beta.reshape(1, *shapes[site.name]).float()
        info.update(suspicious=int(xs.shape[0]), augmented_views=int(augment))
        suspicious = (xs, logits_sus[: xs.shape[0]].argmax(dim=1), None)  # the views start with xs itself

    # ---------------------------------------------------------------- statistics, α and quantile
    q0 = float(quantile) if quantile is not None else DEFAULT_QUANTILE
    wrapper = RepairedModel(model, layers=names, directions=directions, alphas=dict.fromkeys(names, 1.0), rule=rule,
                            gate=gate, floor=floor, quantile=q0, head=fm.head_name, num_classes=num_classes,
                            targets=targets, source=source, per_source=source_dirs is not None,
                            source_directions=source_dirs).to(dev)
    info["per_source"] = source_dirs is not None
    if isinstance(alpha, Mapping):
        wrapper.set_alpha(alpha)
    elif alpha is not None:
        wrapper.set_alpha(float(alpha))
    if choose and wrapper.active:
        observed = _Observed(wrapper, *suspicious, batch_size, dev) if suspicious is not None else None
        q0 = _choose(wrapper, x_fit, y_fit, info, alpha=alpha, quantile=quantile, tolerance=tolerance, folds=folds,
                     seed=seed, batch_size=batch_size, dev=dev, observed=observed, select=select)
    wrapper.calibrate(clean, quantile=q0, batch_size=batch_size, seed=seed)
    wrapper.detection = detection
    info.update(targets=targets, alphas=wrapper.alphas, quantile=wrapper.quantile)
    wrapper.info = info
    return wrapper


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------


def save_repair(wrapper: RepairedModel, path: str | os.PathLike[str]) -> Path:
    """Write the repair (directions, α, statistics, metadata) — no model weights, no pickled objects.

    The file is a ``torch.save`` of a flat dict of tensors, strings, numbers and lists, readable with
    ``torch.load(path, weights_only=True)``; a path ending in ``.safetensors`` gets a safetensors file instead
    (the tensors, with the rest as JSON in its metadata). Written atomically.
    """
    if not isinstance(wrapper, RepairedModel):
        raise SpecError(f"save_repair needs a RepairedModel, got {type(wrapper).__name__}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fire-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    state = wrapper.state()
    try:
        if out.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
            meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
            save_file(tensors, tmp, metadata={_SAFETENSORS_KEY: json.dumps(meta)})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_SAFETENSORS_KEY = "latentguard.fire"


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get(_SAFETENSORS_KEY)
        state: dict[str, Any] = json.loads(meta) if meta else {}
        if not isinstance(state, dict):
            raise ValueError("its metadata is not a JSON object")
        for key in f.keys():
            state[key] = f.get_tensor(key)
    return state


def _field(state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in state or not isinstance(state[key], kind) or isinstance(state[key], bool) and kind is not bool:
        raise ModelError(f"{path} is not a valid FIRE repair file (field {key!r} missing or malformed)")
    return state[key]


def load_repair(model: nn.Module, path: str | os.PathLike[str], *, head: str | None = None) -> RepairedModel:
    """Rebuild a :class:`RepairedModel` around ``model`` from a :func:`save_repair` file.

    ``head`` overrides the stored name of the model's output nn.Linear. A file that needs unpickling of Python
    objects is refused (:class:`~latentguard.errors.UnsafeFileError`); directions or statistics that do not fit
    the model raise :class:`~latentguard.errors.ModelError` (intermediate layers are checked with a probe when
    the model declares its input shape in ``arch_config``, else at the first forward pass). Online refinement
    of a loaded repair needs :meth:`RepairedModel.calibrate` first.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"repair file {p} not found: pass the file written by save_repair")
    try:
        state = _read_safetensors(p) if p.suffix.lower() == ".safetensors" else torch.load(
            p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{p} needs unpickling of Python objects, which is refused: write repair files with save_repair"
        ) from exc
    except Exception as exc:  # any other reader failure (truncated, corrupt, not a torch file) is the file's fault
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{p} is not a readable repair file ({msg}): write it with save_repair") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{p} is not a FIRE repair file (format {FORMAT!r} expected): write it with save_repair")
    layers = _field(state, "layers", list, p)
    alphas = _field(state, "alphas", list, p)
    if len(alphas) != len(layers) or not all(isinstance(n, str) for n in layers) or not layers:
        raise ModelError(f"{p} is not a valid FIRE repair file (layers and alphas disagree)")
    tensors: dict[str, dict[str, torch.Tensor]] = {key: {} for key, _ in _STATE_TENSORS}
    for i, name in enumerate(layers):
        for key in tensors:
            tensors[key][name] = _field(state, f"{key}.{i}", torch.Tensor, p)
    calibrated = _field(state, "calibrated", bool, p)
    per_source = bool(state.get("per_source", False))
    extra = {key: _field(state, key, torch.Tensor, p) for key, _ in _SOURCE_TENSORS} if per_source else {}
    wrapper = RepairedModel(
        model,
        layers=layers,
        directions=tensors["beta"],
        alphas={n: float(a) for n, a in zip(layers, alphas, strict=True)},
        rule=_field(state, "rule", str, p),
        gate=_field(state, "gate", str, p),
        floor=_field(state, "floor", bool, p),
        quantile=float(_field(state, "quantile", float | int, p)),
        head=head or _field(state, "head", str, p) or None,
        num_classes=int(_field(state, "num_classes", int, p)),
        targets=[int(t) for t in _field(state, "targets", list, p)],
        source=_field(state, "source", str, p),
        thresholds=tensors["thresholds"] if calibrated else None,
        proj_mean=tensors["proj_mean"] if calibrated else None,
        proj_std=tensors["proj_std"] if calibrated else None,
        proj_ref=tensors["proj_ref"],
        per_source=per_source,
        source_directions=extra.get("source_beta"),
        source_thresholds=extra.get("source_thresholds") if calibrated else None,
        flag_thresholds=extra.get("flag_thresholds") if calibrated else None,
        info={"loaded_from": p.name},
    )
    _check_layer_shapes(wrapper, model)
    return wrapper.to(_module_device(model))


def _check_layer_shapes(wrapper: RepairedModel, model: nn.Module) -> None:
    """Check intermediate directions against the layer outputs when the model declares its input shape."""
    cfg = getattr(model, "arch_config", None)
    outputs = [(i, s) for i, s in enumerate(wrapper._sites) if s.kind == "output"]
    if not outputs or not isinstance(cfg, dict) or "in_channels" not in cfg or "image_size" not in cfg:
        return
    x1 = torch.zeros(1, int(cfg["in_channels"]), int(cfg["image_size"]), int(cfg["image_size"]))
    for i, site in outputs:
        shape = _site_shape(model, site, x1)
        beta = wrapper._buf("beta", i)
        if math.prod(shape) != beta[0].numel():
            raise ModelError(
                f"the repair's direction for layer {site.name!r} has shape {tuple(beta.shape[1:])} but the layer "
                f"outputs {shape}: the repair was made for another model"
            )


# ----------------------------------------------------------------------------------------------------------
# the registered defense
# ----------------------------------------------------------------------------------------------------------


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
            if isinstance(self.folds, bool) or not (isinstance(self.folds, int) and self.folds >= 2):
                raise SpecError(f"fire: folds must be an integer >= 2, got {self.folds!r}")

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        wrapper = repair(model, clean, target=p.target, layer=p.layer, rule=p.rule, gate=p.gate, floor=p.floor,
                         source=p.source, alpha=p.alpha, quantile=p.quantile, tolerance=p.tolerance, folds=p.folds,
                         device=device, seed=seed, head=p.head, per_source=p.per_source, select=p.select)
        return self._result(wrapper, detection=wrapper.detection, input_score=wrapper.score, extra=dict(wrapper.info))
