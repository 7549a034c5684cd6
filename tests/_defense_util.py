"""Shared fixtures and helpers for the defense tests: small digits models trained once per test session.

:func:`backdoored_digits` trains a ``small_cnn`` on the 16×16 digits poisoned with BadNets (10 %, target
:data:`TARGET`) through the one training loop; :func:`clean_digits` trains the same model on the unpoisoned
data. Both are cached in memory per distinct set of arguments, so each model is trained once per session
(fixtures that differ only in their clean reserve share one trained model).
Two configurations are in use:

* the defaults — width 16, 12 epochs, random crops with 2-pixel padding (the 16-pixel analogue of CIFAR's 4),
  reserve drawn with seed 0 — for the I-BAU / NC / FT-SAM / SAU / FST / TAC tests;
* :data:`NARROW` — width 8, 8 epochs, 1-pixel crop padding, reserve drawn with seed 1 (130 images) — for the
  FT / FP / NAD / ANP / CLP / STRIP / ShrinkPad tests, whose thresholds were set on that model.

Defenses only get the clean ``reserve`` (drawn from the clean training split); the test split is used by the
tests alone, to measure ACC / ASR / detection quality.

Training runs on one CPU thread (:func:`single_thread`; ``conftest.py`` also runs every test on one thread):
these tiny models gain nothing from more, and a fixed thread count keeps the floating-point results, hence the
trained models and the behavioural assertions, reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from latentguard.attacks import Attack, make_attack
from latentguard.data import Images, clean_reserve, load_data
from latentguard.evaluation import Evaluation, evaluate
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit

TARGET = 0  # the BadNets target class of every backdoored fixture model

# The model the FT / FP / NAD / ANP / CLP / STRIP / ShrinkPad tests are calibrated on: backdoored_digits(**NARROW).
NARROW: dict[str, Any] = dict(width=8, epochs=8, crop_padding=1, reserve_seed=1)


# ----------------------------------------------------------------------------- fixture models
@dataclass
class DigitsModel:
    """A trained fixture model with its data; never modify ``model`` (use :meth:`fresh_model`)."""

    model: nn.Module
    reserve: Images  # the defender's clean reserve (from the training split)
    test: Images
    attack: Attack  # the BadNets attack (the model was trained on its poison when ``backdoored``)
    backdoor_set: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # triggered test set: x, attack labels, true labels
    acc: float  # of ``model`` on the clean test split
    asr: float  # of ``model`` on ``backdoor_set``
    backdoored: bool

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def evaluate(self, model: nn.Module) -> Evaluation:
        return evaluate(model, self.test, backdoor_set=self.backdoor_set, device="cpu")


def backdoored_digits(*, width: int = 16, epochs: int = 12, crop_padding: int = 2, reserve: float = 0.1,
                      reserve_seed: int = 0, seed: int = 0) -> DigitsModel:
    """A BadNets-backdoored small_cnn on digits (cached; pass ``**NARROW`` for the narrow 8-epoch model)."""
    return _digits_model(True, width, epochs, crop_padding, reserve, reserve_seed, seed)


def clean_digits(*, width: int = 16, epochs: int = 12, crop_padding: int = 2, reserve: float = 0.1,
                 reserve_seed: int = 0, seed: int = 0) -> DigitsModel:
    """The same small_cnn trained on the unpoisoned digits (cached): a model without a backdoor."""
    return _digits_model(False, width, epochs, crop_padding, reserve, reserve_seed, seed)


@functools.lru_cache(maxsize=16)
def _digits_model(backdoor: bool, width: int, epochs: int, crop_padding: int, reserve: float, reserve_seed: int,
                  seed: int) -> DigitsModel:
    """Positional arguments only, so that every distinct fixture has exactly one cache entry."""
    model, attack = _trained(backdoor, width, epochs, crop_padding, seed)
    data = load_data("digits")
    held = data.train.subset(clean_reserve(data.train, reserve, seed=reserve_seed))
    backdoor_set = attack.get_backdoor_test_set(data.test)
    with single_thread():
        ev = evaluate(model, data.test, backdoor_set=backdoor_set, device="cpu")
    return DigitsModel(model, held, data.test, attack, backdoor_set, ev.acc, ev.asr, backdoor)


@functools.lru_cache(maxsize=16)
def _trained(backdoor: bool, width: int, epochs: int, crop_padding: int, seed: int) -> tuple[nn.Module, Attack]:
    """The training itself, cached apart from the reserve: fixtures that differ only in their reserve share it."""
    with single_thread():
        data = load_data("digits")
        h, w, c = data.train.image_shape
        attack = make_attack("badnets", num_classes=data.train.num_classes, image_shape=(c, h, w), target=TARGET,
                             rate=0.1, seed=seed)
        train = attack.get_poisoned_dataset(data.train)[0] if backdoor else data.train
        torch.manual_seed(seed)
        model = build_model("small_cnn", data.train.num_classes, in_channels=c, image_size=h, width=width)
        fit(model, train, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, crop_padding=crop_padding, seed=seed),
            device="cpu")
        return model.eval(), attack


def tiny_reserve(b: DigitsModel, per_class: int = 3) -> Images:
    """A few clean images per class of ``b``'s reserve, for tests that only need the defense to run."""
    idx = np.concatenate([np.flatnonzero(b.reserve.y == k)[:per_class] for k in range(b.reserve.num_classes)])
    return b.reserve.subset(np.sort(idx))


def noise_images(n: int = 40, seed: int = 0) -> Images:
    """Random 16×16 grey images, every class present: a reserve for layout-only checks."""
    rng = np.random.default_rng(seed)
    return Images(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), np.arange(n) % 10,
                  [str(i) for i in range(10)])


def tiny_mlp(num_classes: int = 10) -> nn.Module:
    """A model with neither convolution nor BatchNorm (for 'architecture lacks what the defense needs')."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, num_classes))


def tiny_arch(name: str) -> nn.Module:
    """An untrained, narrow built-in architecture for 16×16 grey inputs."""
    torch.manual_seed(0)
    width = {"preact_resnet18": 4, "resnet18": 4, "vgg16_bn": 4, "vit_tiny": 32, "small_cnn": 4}[name]
    return build_model(name, 10, in_channels=1, image_size=16, width=width).eval()


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny models on one thread (faster than two on a busy machine); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _state(m: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return m.state_dict() if isinstance(m, nn.Module) else m


def assert_state_equal(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor],
                       msg: str = "") -> None:
    """Same keys in the same order and bit-identical tensors (models or :func:`state_copy` snapshots)."""
    sa, sb = _state(a), _state(b)
    assert list(sa) == list(sb), msg
    for k, v in sb.items():
        assert torch.equal(sa[k], v), f"{k} changed" + (f": {msg}" if msg else "")


def assert_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Same state keys in the same order, every tensor of the same shape."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)


def max_param_change(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point())


def rows_subset(x: np.ndarray, pool: np.ndarray) -> bool:
    """Every image of ``x`` is one of the images of ``pool`` (uint8 NHWC)."""
    seen = {row.tobytes() for row in pool}
    return all(row.tobytes() in seen for row in x)


class FitSpy:
    """Wraps ``fit`` in a defense module (via monkeypatch) and records the data and configs it is given."""

    def __init__(self, monkeypatch, module) -> None:
        self.calls: list[tuple[Images, TrainConfig]] = []
        real = module.fit

        def spy(model, data, config=None, **kwargs):
            self.calls.append((data, config))
            return real(model, data, config, **kwargs)

        monkeypatch.setattr(module, "fit", spy)


def forbid_test_data(monkeypatch) -> None:
    """Make any attempt to load a dataset fail: a defense only gets the clean reserve it is handed."""

    def refuse(*_a, **_k):
        raise AssertionError("a defense tried to load data: it must only use the clean reserve")

    import latentguard.data as data_pkg
    import latentguard.data.load as load_mod

    monkeypatch.setattr(data_pkg, "load_data", refuse)
    monkeypatch.setattr(load_mod, "load_data", refuse)
