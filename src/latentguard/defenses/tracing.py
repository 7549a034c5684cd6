"""Tracing a model's layout with one forward pass: conv/BN order, the last feature map, channel views.

Shared by the pruning and distillation defenses (FP, CLP, NAD, ANP), which must work on any architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from latentguard.data import Images
from latentguard.device import module_device
from latentguard.errors import ModelError


@dataclass
class ModelTrace:
    """What one forward pass reveals about a model's layout.

    ``order``: names of the modules in the order their forward calls *finished* (root excluded);
    ``shapes``: each module's (last) output shape; ``conv_bn``: Conv2d name → name of the BatchNorm whose
    input is exactly that convolution's output (a conv-BN pair); ``convs``: Conv2d names in execution order.
    """

    order: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    conv_bn: dict[str, str] = field(default_factory=dict)
    convs: list[str] = field(default_factory=list)

    @property
    def bn_conv(self) -> dict[str, str]:
        return {bn: conv for conv, bn in self.conv_bn.items()}



@torch.no_grad()
def trace_model(model: nn.Module, example: torch.Tensor) -> ModelTrace:
    """Run ``example`` through ``model`` once (eval mode, no gradients) with hooks on every sub-module."""
    trace = ModelTrace()
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep conv outputs alive so their ids stay unique during the pass
    handles = []

    def post(name: str, module: nn.Module):
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            trace.order.append(name)
            if isinstance(out, torch.Tensor):
                trace.shapes[name] = tuple(out.shape)
                if isinstance(module, nn.Conv2d):
                    trace.convs.append(name)
                    produced[id(out)] = name
                    keep.append(out)
        return hook

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
                trace.conv_bn.setdefault(produced[id(args[0])], name)
        return hook

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_hook(post(name, module)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(pre(name)))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(example.to(module_device(model)))
    except Exception as exc:  # user model code: report it as a fixable error
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the model's forward pass failed on a reserve-shaped input ({msg}): check the model "
                         "matches the data's channels and image size") from exc
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return trace


def example_input(clean: Images, n: int = 2) -> torch.Tensor:
    """A couple of reserve images as float N×C×H×W, enough to trace the model's layout."""
    x, _ = clean.subset(np.arange(min(n, len(clean)))).tensors()
    return x


def last_feature_map(trace: ModelTrace) -> str:
    """The last module (in completion order) whose output is a spatial map N×C×H×W with H·W > 1."""
    for name in reversed(trace.order):
        shape = trace.shapes.get(name)
        if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1:
            return name
    raise ModelError("the model produces no spatial feature map (N×C×H×W): this defense needs a convolutional "
                     "model, or pass the layer to use explicitly")


def channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast over dimension 1 of an ``ndim``-D activation."""
    return v.view(1, -1, *([1] * (ndim - 2)))


# ----------------------------------------------------------------------------- Fine-Pruning
