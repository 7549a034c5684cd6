"""Shared builders for the attack tests: random images, a tiny ``small_cnn`` and short-training contexts.

Each attack test file fixes its own sizes with a one-line ``functools.partial`` (e.g.
``_images = partial(random_images, n=64)``), so the defaults below are only the common case: 16×16 grey images,
4 classes. Everything runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from latentguard.attacks import Attack, AttackContext
from latentguard.data import Images
from latentguard.models import build_model
from latentguard.train import TrainConfig, TrainHistory

CPU = torch.device("cpu")


def random_images(n: int, c: int = 1, size: int = 16, classes: int = 4, seed: int = 0) -> Images:
    """``n`` random uint8 ``size``×``size``×``c`` images labelled ``0, 1, …, classes - 1`` in turn."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, c), dtype=np.uint8)
    y = np.arange(n) % classes
    return Images(x, y, [f"c{i}" for i in range(classes)])


def tiny_cnn(classes: int, c: int = 1, size: int = 16, width: int = 4, seed: int = 0) -> nn.Module:
    """An untrained, narrow ``small_cnn``, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model("small_cnn", classes, in_channels=c, image_size=size, width=width)


def attack_context(train: Images, build_model: Callable[[], nn.Module], clean: bool = True) -> AttackContext:
    """A context for attacks that prepare a trigger against a clean model (1 epoch, batch 32, no augmentation);
    with ``clean`` a fresh ``build_model()`` is handed over as the (untrained) clean model, else the attack
    has to train one itself."""
    cfg = TrainConfig(epochs=1, batch_size=32, augment=False)
    return AttackContext(train=train, build_model=build_model, train_config=cfg, device=CPU,
                         clean_model=build_model() if clean else None)


def train_with_attack(
    attack: Attack, train: Images, build_model: Callable[[], nn.Module]
) -> tuple[nn.Module, TrainHistory, np.ndarray]:
    """Train a fresh ``build_model()`` through ``attack.train_model`` for one short epoch (2 steps of 16 images);
    returns the model, the history and the poisoned indices."""
    model = build_model()
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, lr=0.01)
    ctx = AttackContext(train=train, build_model=build_model, train_config=cfg, device=CPU)
    history, idx = attack.train_model(model, ctx)
    return model, history, idx
