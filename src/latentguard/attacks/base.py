"""The attack interface, its serialisable spec, the registry and dataset poisoning.

An attack is rebuilt exactly from ``attack.json`` (an :class:`AttackSpec`) plus, for learned triggers and
generators, the tensors saved next to it in ``attack.safetensors``. Triggers act on float images N×C×H×W in
[0, 1] (the pixel space every latentguard model takes); poisoned training sets are stored as uint8 like any
dataset on disk, so what a model is trained on is what an attacker could actually ship.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from latentguard.data import Images
from latentguard.errors import SpecError, build_params
from latentguard.train import TrainConfig, TrainHistory, fit

SPEC_FIELDS = ("name", "target", "rate", "all_to_all", "seed", "params", "num_classes", "image_shape")


@dataclass
class AttackSpec:
    """Plain-JSON description of an attack; with the saved tensors it reproduces the trigger exactly."""

    name: str
    target: int = 0
    rate: float = 0.1
    all_to_all: bool = False
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("attack name must be a non-empty string")
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise SpecError(f"attack target must be a class index >= 0, got {self.target!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0.0 < self.rate <= 1.0:
            raise SpecError(f"poison rate must be in (0, 1], got {self.rate!r}")
        if not isinstance(self.all_to_all, bool):
            raise SpecError(f"all_to_all must be true or false, got {self.all_to_all!r}")
        if not isinstance(self.params, dict):
            raise SpecError("attack params must be a JSON object")
        if self.num_classes is not None:
            if self.num_classes < 2:
                raise SpecError(f"num_classes must be >= 2, got {self.num_classes}")
            if self.target >= self.num_classes:
                raise SpecError(f"target {self.target} is not a class of a {self.num_classes}-class dataset")
        if self.image_shape is not None:
            self.image_shape = tuple(int(v) for v in self.image_shape)  # type: ignore[assignment]
            if len(self.image_shape) != 3 or min(self.image_shape) < 1:
                raise SpecError(f"image_shape must be (C, H, W), got {self.image_shape}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape) if self.image_shape else None
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttackSpec:
        if not isinstance(data, dict):
            raise SpecError("an attack spec must be a JSON object")
        unknown = sorted(set(data) - set(SPEC_FIELDS))
        if unknown:
            raise SpecError(f"unknown attack spec field(s) {', '.join(unknown)}: allowed are {', '.join(SPEC_FIELDS)}")
        if "name" not in data:
            raise SpecError("attack spec has no 'name': add the attack's registered name")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"malformed attack spec: {exc}") from exc


@dataclass
class AttackContext:
    """What an attack may need besides its spec: the clean training set and a way to get a model.

    ``build_model`` returns a fresh, untrained classifier of the architecture being attacked;
    ``clean_model`` is an already trained clean model when one is available (attacks that optimise a trigger
    against a model, such as TrojanNN or LF, train one with ``train_config`` when it is missing).
    """

    train: Images
    build_model: Callable[[], nn.Module]
    train_config: TrainConfig
    device: torch.device
    clean_model: nn.Module | None = None

    def get_clean_model(self) -> nn.Module:
        """The clean model, trained once with ``train_config`` (and kept in the context) when missing."""
        if self.clean_model is None:
            model = self.build_model()
            fit(model, self.train, self.train_config, device=self.device)
            self.clean_model = model
        return self.clean_model.to(self.device)


class Attack(ABC):
    """A backdoor attack: a trigger function plus how a poisoned model is obtained.

    Subclasses declare ``name``, a parameter dataclass ``Params`` (defaults from the paper, validated in its
    ``__post_init__``), implement :meth:`apply`, and override :meth:`prepare` (learned triggers) or
    :meth:`train_model` (attacks trained jointly with the classifier) when needed.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    clean_label: ClassVar[bool] = False  # poisons only target-class images and never relabels
    supports_all_to_all: ClassVar[bool] = True
    needs_preparation: ClassVar[bool] = False  # a learned trigger must exist before poisoning

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> Any:
        """The validated ``Params`` for ``params`` (unknown names and bad values raise a one-line SpecError)."""
        return build_params(cls.Params, params, f"attack {cls.name!r}")

    def __init__(self, spec: AttackSpec) -> None:
        if spec.name != self.name:
            raise SpecError(f"spec is for attack {spec.name!r}, not {self.name!r}")
        if spec.num_classes is None or spec.image_shape is None:
            raise SpecError("attack spec needs num_classes and image_shape: build it with make_attack(...)")
        if spec.all_to_all and not self.supports_all_to_all:
            raise SpecError(f"attack {self.name!r} is only defined all-to-one: drop --all-to-all")
        if spec.all_to_all and self.clean_label:
            raise SpecError(f"clean-label attack {self.name!r} cannot be all-to-all")
        self.params = self.check_params(spec.params)
        spec.params = dataclasses.asdict(self.params)
        self.spec = spec
        self.num_classes: int = spec.num_classes
        self.image_shape: tuple[int, int, int] = spec.image_shape
        self._rng = np.random.default_rng(spec.seed)

    # ----------------------------------------------------------------- trigger
    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of float images ``x`` (N×C×H×W in [0, 1]), same shape, clamped to [0, 1]."""

    def attack_labels(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Labels a backdoored model should output on triggered images of true label ``y``."""
        if self.spec.all_to_all:
            return (y + 1) % self.num_classes
        if isinstance(y, torch.Tensor):
            return torch.full_like(y, self.spec.target)
        return np.full_like(y, self.spec.target)

    # ----------------------------------------------------------------- learned state
    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned trigger/generator tensors to save next to the spec (none for fixed triggers)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise SpecError(f"attack {self.name!r} has no learned tensors, but {len(tensors)} were given")

    @property
    def is_ready(self) -> bool:
        """True when the trigger is fully defined (learned parts present)."""
        return True

    def prepare(self, context: AttackContext) -> None:
        """Learn the trigger (for attacks that optimise one); fixed triggers need nothing."""
        return None

    # ----------------------------------------------------------------- poisoning
    def candidate_indices(self, labels: np.ndarray) -> np.ndarray:
        """Indices that may be poisoned: target-class images for clean-label attacks, else images whose
        attack label differs from their label."""
        if self.clean_label:
            return np.flatnonzero(labels == self.spec.target)
        return np.flatnonzero(self.attack_labels(labels) != labels)

    def poison_indices(self, labels: np.ndarray) -> np.ndarray:
        """The reproducible set of poisoned training indices: ``rate`` × N drawn from the candidates."""
        labels = np.asarray(labels)
        candidates = self.candidate_indices(labels)
        n_poison = min(len(candidates), int(round(self.spec.rate * len(labels))))
        if n_poison == 0:
            raise SpecError(
                f"poison rate {self.spec.rate} selects no image of {len(labels)}: raise --rate or use more data"
            )
        rng = np.random.default_rng(self.spec.seed)
        return np.sort(rng.choice(candidates, size=n_poison, replace=False))

    def apply_images(self, images: Images, indices: np.ndarray | None = None, *, batch_size: int = 1024) -> np.ndarray:
        """Triggered uint8 NHWC copies of ``images.x[indices]`` (all when None)."""
        idx = np.arange(len(images)) if indices is None else np.asarray(indices)
        out = np.empty((len(idx), *images.x.shape[1:]), dtype=np.uint8)
        with torch.no_grad():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.from_numpy(images.x[chunk]).permute(0, 3, 1, 2).float().div_(255)
                xt = self.apply(x).clamp_(0, 1)
                out[s : s + len(chunk)] = (xt * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return out

    def get_poisoned_dataset(self, train: Images) -> tuple[Images, np.ndarray]:
        """The poisoned training set and the poisoned indices (clean-label attacks keep labels)."""
        self._check_images(train)
        if not self.is_ready:
            raise SpecError(f"attack {self.name!r} must be prepared (its trigger learned) before poisoning")
        idx = self.poison_indices(train.y)
        x = train.x.copy()
        y = train.y.copy()
        x[idx] = self.apply_images(train, idx)
        if not self.clean_label:
            y[idx] = self.attack_labels(y[idx])
        return dataclasses.replace(train, x=x, y=y), idx

    def get_backdoor_test_set(self, test: Images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triggered test images whose true label differs from their attack label, as uint8 NCHW tensors,
        with their attack labels and true labels (the ASR/RA evaluation set)."""
        self._check_images(test)
        keep = np.flatnonzero(self.attack_labels(test.y) != test.y)
        x = torch.from_numpy(self.apply_images(test, keep)).permute(0, 3, 1, 2).contiguous()
        y_true = torch.from_numpy(test.y[keep].astype(np.int64))
        return x, torch.as_tensor(self.attack_labels(y_true)), y_true

    def train_model(
        self,
        model: nn.Module,
        context: AttackContext,
        *,
        eval_data: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[TrainHistory, np.ndarray]:
        """Train ``model`` into a backdoored model; returns the history and the poisoned indices.

        The default poisons the training set once and runs the one training loop; attacks trained jointly
        with the classifier override this with hooks into the same loop.
        """
        if not self.is_ready:
            self.prepare(context)
        poisoned, idx = self.get_poisoned_dataset(context.train)
        history = fit(model, poisoned, context.train_config, device=context.device, eval_data=eval_data)
        return history, idx

    def _check_images(self, images: Images) -> None:
        h, w, c = images.x.shape[1:]
        if (c, h, w) != tuple(self.image_shape):
            raise SpecError(
                f"attack was built for images {tuple(self.image_shape)} (C,H,W) but data is {(c, h, w)}: "
                "rebuild the attack for this dataset"
            )
        if images.num_classes != self.num_classes:
            raise SpecError(f"attack was built for {self.num_classes} classes but data has {images.num_classes}")


# ----------------------------------------------------------------------------- registry
ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the name → class registry."""
    ATTACKS[cls.name] = cls
    return cls


def make_attack(
    name: str,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    target: int = 0,
    rate: float = 0.1,
    all_to_all: bool = False,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> Attack:
    """Build a registered attack for data of ``num_classes`` classes and ``image_shape`` (C, H, W)."""
    spec = AttackSpec(name=name, target=target, rate=rate, all_to_all=all_to_all, seed=seed,
                      params=dict(params or {}), num_classes=num_classes, image_shape=tuple(image_shape))
    return build_attack(spec)


def build_attack(spec: AttackSpec, tensors: dict[str, torch.Tensor] | None = None) -> Attack:
    """Rebuild an attack from its spec (and saved tensors): the trigger is reproduced exactly."""
    if spec.name not in ATTACKS:
        raise SpecError(f"unknown attack {spec.name!r}: choose one of {', '.join(sorted(ATTACKS))}")
    attack = ATTACKS[spec.name](spec)
    if tensors:
        attack.load_tensors(tensors)
    return attack


def save_attack(attack: Attack, out_dir: str | Path) -> Path:
    """Write ``attack.json`` (+ ``attack.safetensors`` for learned tensors) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attack.json"
    path.write_text(json.dumps(attack.spec.to_json(), indent=2, sort_keys=True) + "\n")
    tensors = attack.tensors()
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "attack.safetensors"))
    return path


def load_attack(path: str | Path) -> Attack:
    """Load an attack from ``attack.json`` (or its directory); tensors come from a sibling safetensors file."""
    p = Path(path)
    if p.is_dir():
        p = p / "attack.json"
    if not p.is_file():
        raise SpecError(f"attack spec {p} not found: pass the attack.json written by 'latentguard attack'")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}): fix or regenerate it") from exc
    spec = AttackSpec.from_json(data)
    tensor_file = p.with_name("attack.safetensors")
    tensors = None
    if tensor_file.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as exc:
            raise SpecError(f"{tensor_file} is corrupt ({exc}): regenerate the attack") from exc
    attack = build_attack(spec, tensors)
    if not attack.is_ready:
        raise SpecError(f"{p} describes a learned trigger but {tensor_file.name} is missing beside it")
    return attack


def clamp01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def check_range(name: str, value: float, low: float, high: float, *, attack: str) -> None:
    """Raise SpecError unless low <= value <= high (a one-line message naming the parameter)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise SpecError(f"{attack}: parameter {name} must be in [{low}, {high}], got {value!r}")
