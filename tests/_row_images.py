"""Hand-built images and latent units for the TAC verdict tests: class c lights up image row c.

Each image is constant along its rows, so a model whose latent unit c is the mean of row c sees its class as one
bright unit; tests add latent units of their own (roughness, spare units) beside these to build a known backdoor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from latentguard.data import Images


def row_images(num_classes: int, size: int, n_per_class: int = 20, seed: int = 0, background: int = 30) -> Images:
    """Row c bright (150–209, per image), every other row at ``background``: grey ``size``×``size`` images."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = np.full((len(y), size, size, 1), background, dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, c, :, 0] = 150 + rng.integers(0, 60)
    return Images(x, y, [f"c{i}" for i in range(num_classes)])


def row_means(num_classes: int, size: int) -> nn.Linear:
    """The latent units ``num_classes``: unit c is the mean of image row c (flattened input, no bias)."""
    rows = nn.Linear(size * size, num_classes, bias=False)
    with torch.no_grad():
        rows.weight.zero_()
        for c in range(num_classes):
            rows.weight[c, c * size:(c + 1) * size] = 1.0 / size
    return rows
