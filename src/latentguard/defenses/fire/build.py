"""Building a FIRE repair: directions from the clean reserve (or suspicious inputs), then α and quantile."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import DetectionReport
from latentguard.defenses.fire.choice import SELECTIONS, _choose, _Observed
from latentguard.defenses.fire.sites import PENULTIMATE, _collect, _layer_names, _resolve_sites, _site_shape
from latentguard.defenses.fire.wrapper import DEFAULT_QUANTILE, GATES, RULES, RepairedModel
from latentguard.defenses.tac import (
    PAIRWISE_MAX_CLASSES,
    SMOOTH_PROBE_GRID,
    add_noise_probe,
    check_noise_probe,
    check_smooth_probe,
    latent_report,
)
from latentguard.device import resolve_device
from latentguard.errors import SpecError
from latentguard.inference import to_float_images
from latentguard.latent.directions import (
    class_mean_direction,
    layer_flip_delta,
    paired_direction,
    qp_direction,
    unpaired_direction,
)
from latentguard.models import split_model

SOURCES = ("qp", "centroid", "paired", "unpaired")


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
    noise_probe: float | None = None,
    smooth_probe: float | None = None,
) -> RepairedModel:
    """Estimate backdoor directions and clean statistics and wrap ``model`` in a :class:`RepairedModel`.

    Args:
        model: the (possibly backdoored) classifier, images in [0, 1] → logits; wrapped, not copied (it is
            moved to ``device`` and put in eval mode).
        clean: the defender's clean reserve (labels are only used for the holdout accuracy).
        target: backdoor target class(es) for ``source="qp"`` / ``"centroid"``; None detects them (TAC's verdict on
            the reserve's latents, with TAC's noise probe unless ``noise_probe`` is 0).
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
        noise_probe: σ of TAC's noise probe when detecting the target (None: TAC's default, 0: off); see
            :func:`latentguard.defenses.tac.with_noise_probe`.
        smooth_probe: σ of TAC's smooth probe when detecting the target (None: TAC's default, 0: off; both 0: the
            clean latents alone); see :func:`latentguard.defenses.tac.with_smooth_probe`.
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

    sigma = check_noise_probe(noise_probe)
    smooth = check_smooth_probe(smooth_probe)

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
            t0 = time.perf_counter()  # TAC's verdict on these latents; each probe passes over 30 % again
            detection = add_noise_probe(
                latent_report(acts_pen[PENULTIMATE], head, labels=y_fit), clean,
                lambda images: latent_report(_collect(model, pen, images.tensors()[0], batch_size, dev)[0][PENULTIMATE],
                                             head, labels=images.y), sigma, smooth=smooth, grid=SMOOTH_PROBE_GRID)
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
