"""Batched inference helpers: mode handling and input conversion."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from latentguard.inference import eval_mode, predict, predict_logits, to_float_images


class _Wrapper(nn.Module):
    """A module in train mode around an eval-mode model, as a repair wrapper can be."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_predict_restores_each_modules_own_flag():
    w = _Wrapper()
    w.model(torch.rand(4, 1, 6, 6))  # materialise the lazy layer, move the BatchNorm statistics
    w.model.eval()
    assert w.training and not w.model.training
    x = torch.rand(5, 1, 6, 6)
    with torch.no_grad():
        expected = w.model(x)
    logits = predict_logits(w, x, batch_size=2, device="cpu")
    assert torch.allclose(logits, expected)
    assert w.training and not any(m.training for m in w.model.modules())
    assert predict(w, x, device="cpu").tolist() == expected.argmax(1).tolist()


def test_eval_mode_restores_flags_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    net[0].eval()
    try:
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert net.training and not net[0].training and net[1].training


def test_to_float_images_converts_uint8_nhwc():
    x = np.full((2, 5, 5, 3), 255, dtype=np.uint8)
    out = to_float_images(x)
    assert out.shape == (2, 3, 5, 5) and out.dtype == torch.float32 and float(out.max()) == 1.0
