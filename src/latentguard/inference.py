"""Batched, gradient-free inference shared by evaluation, defenses and attacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from latentguard.device import resolve_device


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every sub-module's training flag is restored afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def to_float_images(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return float32 N×C×H×W images in [0, 1] from uint8 N×C×H×W / N×H×W×C arrays or float tensors."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        x = torch.from_numpy(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = "auto",
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (float in [0, 1] or uint8 NCHW), batched, returned on the CPU."""
    dev = resolve_device(device)
    outs = []
    # each sub-module's own flag comes back (a wrapper in train mode must not switch its eval-mode model to train)
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        for start in range(0, x.shape[0], batch_size):
            xb = to_float_images(x[start : start + batch_size]).to(dev, non_blocking=True)
            outs.append(model(xb).float().cpu())
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)


def predict(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Predicted class indices (CPU int64)."""
    return predict_logits(model, x, **kwargs).argmax(dim=1)
