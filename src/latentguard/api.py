"""The Python API: ``detect``, ``remove``, ``repair``, ``load_repair`` and ``defend`` on any classifier.

``clean`` is the defender's clean data: an :class:`~latentguard.data.Images` container or an ``(x, y)`` pair of
tensors (float N×C×H×W in [0, 1], int labels).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from latentguard.data import Images
from latentguard.errors import DataError, SpecError


def as_images(clean: Images | tuple[Any, Any], *, num_classes: int | None = None) -> Images:
    """Accept an Images container or ``(x, y)`` (float NCHW in [0, 1] or uint8 NHWC) and return Images."""
    if isinstance(clean, Images):
        return clean
    if isinstance(clean, (tuple, list)) and len(clean) == 2:
        x, y = clean
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if y_np.size == 0:
            raise DataError("the clean data is empty: give at least one image per class")
        if not np.issubdtype(y_np.dtype, np.integer):
            raise DataError(f"labels must be integer class indices, got dtype {y_np.dtype}: pass y as int64")
        if int(y_np.min()) < 0:
            raise DataError(f"labels must be class indices >= 0, got {int(y_np.min())}: map them to 0..num_classes-1")
        top = int(y_np.max()) + 1
        if num_classes is not None and top > num_classes:
            raise DataError(f"the clean labels go up to {top - 1} but the model outputs {num_classes} classes: "
                            "use labels of the model's classes or the model trained for this data")
        n_classes = max(num_classes or 0, top)
        return Images.from_tensors(x, y_np, [str(k) for k in range(n_classes)])
    raise DataError(f"clean data must be an Images container or an (images, labels) pair, got {type(clean).__name__}")


def _clean_for(model: nn.Module, clean) -> Images:
    """Check ``model`` (an nn.Module without NaN/Inf) and ``clean`` (valid images, labels of the model's classes,
    at least one image per class), and return the clean data as Images with the model's class count."""
    from latentguard.models import split_model
    from latentguard.workflows import check_model_finite

    check_model_finite(model)
    images = as_images(clean)
    x, _ = images.subset(np.arange(min(2, len(images)))).tensors()
    n_model = split_model(model, example_input=x).num_classes
    if isinstance(clean, Images):
        if n_model != images.num_classes:
            raise DataError(f"the clean data has {images.num_classes} classes but the model outputs {n_model}: "
                            "use the model trained for this data")
    elif n_model < images.num_classes:
        raise DataError(f"the clean labels go up to {images.num_classes - 1} but the model outputs {n_model} classes: "
                        "use labels of the model's classes or the model trained for this data")
    elif n_model > images.num_classes:
        images = Images(images.x, images.y, [str(k) for k in range(n_model)], images.hflip)
    if len(images) < images.num_classes:
        raise DataError(f"the clean reserve has {len(images)} images for {images.num_classes} classes: "
                        "give at least one image per class")
    return images


def detect(model: nn.Module, clean, *, threshold: float | None = None, quantile: float = 1.0, log_norms: bool = True,
           statistic: str = "both", noise_probe: float | None = None, smooth_probe: float | None = None,
           mad_floor: float | None = None, device: str | torch.device | None = "auto"):
    """TAC detection: per-class ‖s_k‖, anomaly scores and the flagged (poisoned) classes (``statistic``:
    ``"class"`` scores ‖s_k‖ as in the paper, ``"pairwise"`` the geometric mean of ‖s_{a→k}‖ over source classes
    a, ``"both"`` the larger of the pairwise index and the per-class index minus 1; ``noise_probe`` σ: also
    judge the reserve under Gaussian pixel noise and flag either verdict, ``smooth_probe`` σ: the same under smooth
    (low-frequency) noise; None: TAC's defaults, 0: off; ``mad_floor``: floor on the MAD of the log statistics over
    the classes, None: TAC's default, 0: the plain MAD)."""
    from latentguard.defenses.tac import detect as tac_detect

    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise SpecError(f"threshold must be a finite number, got {threshold!r}: e.g. 2.0")
    images = _clean_for(model, clean)
    return tac_detect(model, images, threshold=threshold, log_norms=log_norms, quantile=quantile, device=device,
                      statistic=statistic, noise_probe=noise_probe, smooth_probe=smooth_probe,
                      mad_floor=mad_floor)


def defend(name: str, model: nn.Module, clean, *, device: str | torch.device | None = "auto", seed: int = 0,
           **params: Any):
    """Run any registered defense by name; returns its DefenseResult (the input model is left untouched)."""
    from latentguard.defenses import make_defense

    defense = make_defense(name, **params)
    images = _clean_for(model, clean)
    return defense.run(model, images, device=device, seed=seed)


def remove(model: nn.Module, clean, *, device: str | torch.device | None = "auto", seed: int = 0,
           **params: Any) -> nn.Module:
    """TAC-guided backdoor removal; returns a new model of the same architecture. By default each flagged class's
    head row is drawn again and fine-tuned away from its original (``head_shift``), the other rows are drawn again
    without that penalty (``redraw_others``) and the other classes' outputs are distilled from the given model
    (``distill``); ``beta=1, head_shift=0, distill=0`` gives the paper's fine-tune that unlearns the reconstructed
    s_p instead."""
    return defend("tac", model, clean, device=device, seed=seed, **params).model


def repair(model: nn.Module, clean, *, device: str | torch.device | None = "auto", seed: int = 0, **params: Any):
    """FIRE inference-time latent repair; returns a wrapper with the model's call signature."""
    from latentguard.defenses.fire import repair as fire_repair

    images = _clean_for(model, clean)
    return fire_repair(model, images, device=device, seed=seed, **params)


def load_repair(model: nn.Module, path, **kwargs: Any):
    """Re-apply a saved FIRE repair (tensors only, loaded with weights_only=True) to ``model``."""
    from latentguard.defenses.fire import load_repair as fire_load
    from latentguard.workflows import check_model_finite

    check_model_finite(model)
    return fire_load(model, path, **kwargs)
