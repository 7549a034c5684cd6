"""The defense interface, its result, the registry, and what every defense shares.

A defense takes a (possibly backdoored) model and the defender's clean reserve, never test data, and returns a
:class:`DefenseResult`: the defended model (same architecture) or a run-time wrapper, an optional
:class:`DetectionReport`, the parameters used and wall seconds. Any hyper-parameter choice inside a defense
(pruning ratio, threshold, early stop) may only look at the clean reserve.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from latentguard.data import Images
from latentguard.device import resolve_device, seed_everything
from latentguard.errors import SpecError, build_params

KINDS = ("removal", "runtime", "detection")


@dataclass
class DetectionReport:
    """Per-class statistics of a model-level detector and its verdict.

    ``norms`` is the per-class statistic (e.g. ‖s_k‖ for TAC, the trigger's L1 norm for Neural Cleanse),
    ``scores`` the signed anomaly index (positive = smaller than typical), flagged when above ``threshold``.
    """

    method: str
    norms: list[float]
    scores: list[float]
    threshold: float
    target_classes: list[int]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backdoored(self) -> bool:
        return bool(self.target_classes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backdoored"] = self.backdoored
        return d


@dataclass
class DefenseResult:
    """What a defense returns (see module docstring)."""

    name: str
    kind: str
    model: nn.Module
    params: dict[str, Any]
    seconds: float
    detection: DetectionReport | None = None
    input_score: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-input suspicion, higher = worse
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "defense": self.name,
            "kind": self.kind,
            "params": self.params,
            "seconds": self.seconds,
            "detection": self.detection.to_json() if self.detection else None,
            "extra": self.extra,
        }


class Defense(ABC):
    """Base class: validates parameters, copies the model, times the run, seeds everything.

    Subclasses set ``name``, ``kind`` and ``Params`` (a dataclass with the paper's defaults that validates
    itself in ``__post_init__``) and implement :meth:`_run` on a private copy of the model.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "removal"
    Params: ClassVar[type]

    def __init__(self, **params: Any) -> None:
        self.params = build_params(self.Params, params, f"defense {self.name!r}")

    def run(self, model: nn.Module, clean: Images, *, device: str | torch.device | None = "auto",
            seed: int = 0) -> DefenseResult:
        """Defend a copy of ``model`` with the clean reserve ``clean``; the input model is left untouched."""
        if not isinstance(clean, Images):
            raise SpecError("clean data must be an Images container: use latentguard.data.as_images(x, y)")
        if len(clean) < clean.num_classes:
            raise SpecError(
                f"the clean reserve has {len(clean)} images for {clean.num_classes} classes: give at least one per class"
            )
        dev = resolve_device(device)
        seed_everything(seed)
        work = copy.deepcopy(model).to(dev).eval()
        t0 = time.perf_counter()
        result = self._run(work, clean, dev, seed)
        result.seconds = time.perf_counter() - t0
        result.params = dataclasses.asdict(self.params)
        if result.detection is not None and not result.detection.seconds:
            result.detection.seconds = result.seconds
        return result

    @abstractmethod
    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        """Defend ``model`` (a private copy, already on ``device``)."""

    def _result(self, model: nn.Module, **kwargs: Any) -> DefenseResult:
        return DefenseResult(name=self.name, kind=self.kind, model=model, params={}, seconds=0.0, **kwargs)


def holdout_split(clean: Images, fraction: float = 0.1, *, seed: int = 0) -> tuple[Images, Images]:
    """Split the clean reserve into (fit, holdout), class-balanced, for choices a defense must make.

    The holdout has at least one image per class when the class has two or more images.
    """
    rng = np.random.default_rng(seed)
    hold: list[int] = []
    for c in range(clean.num_classes):
        idx = np.flatnonzero(clean.y == c)
        if len(idx) < 2:
            continue
        k = max(1, int(round(fraction * len(idx))))
        hold.extend(rng.choice(idx, size=min(k, len(idx) - 1), replace=False).tolist())
    hold_arr = np.sort(np.array(hold, dtype=np.int64))
    fit_arr = np.setdiff1d(np.arange(len(clean)), hold_arr)
    return clean.subset(fit_arr), clean.subset(hold_arr)


def low_outlier_report(
    method: str, norms: np.ndarray, threshold: float, *, log: bool, extra: dict[str, Any] | None = None,
    min_mad: float = 0.0,
) -> DetectionReport:
    """The verdict every per-class detector shares (trojanzoo-style): MAD anomaly index of the per-class
    statistic (its MAD floored at ``min_mad``), every class whose below-median index exceeds ``threshold``
    flagged (multi-target aware)."""
    from latentguard.latent.outliers import anomaly_index

    norms = np.asarray(norms, dtype=np.float64)
    # a zero statistic (e.g. every clean input already in class k) is the most extreme small value there is:
    # on the log scale it is floored just above zero instead of refused
    stat = np.maximum(norms, 1e-12 * max(float(norms.max()), 1e-300)) if log and norms.size else norms
    scores = anomaly_index(stat, log=log, min_mad=min_mad)
    flagged = np.flatnonzero(scores > threshold)
    return DetectionReport(
        method=method,
        norms=[float(v) for v in norms],
        scores=[float(v) for v in scores],
        threshold=float(threshold),
        target_classes=[int(k) for k in flagged],
        extra={"log_norms": log, **(extra or {})},
    )


# ----------------------------------------------------------------------------- registry
DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator adding a defense to the name → class registry."""
    if cls.kind not in KINDS:
        raise ValueError(f"defense kind must be one of {KINDS}")
    DEFENSES[cls.name] = cls
    return cls


def make_defense(name: str, **params: Any) -> Defense:
    """Instantiate a registered defense with validated parameters."""
    if name not in DEFENSES:
        raise SpecError(f"unknown defense {name!r}: choose one of {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name](**params)
