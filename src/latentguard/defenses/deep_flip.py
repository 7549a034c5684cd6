"""Deep TAC: the minimal universal flip toward a flagged class p at a layer below the head, for removal.

TAC's QP is exact at the head's input, where a shift acts linearly on the logits. A trigger's change starts in
earlier layers, and there the network above is nonlinear, so the minimal change that sends the clean images to p
has no closed form and is searched instead: δ_p, one activation-shaped tensor added to layer ℓ's output for every
image, with the smallest L2 norm ε_p at which a share ``flip_rate`` of the clean images (of classes other than p)
is predicted p. For a given radius, projected gradient descent on the targeted cross-entropy inside the ball finds
δ; a bracket and a bisection on the radius (in log scale) find ε_p.

Removal (``TAC(deep_layer=ℓ)``) then fine-tunes the network to keep every clean image's label under δ_p, refined
on each batch by a few projected steps from the running δ_p and always inside the ball of the given model's ε_p,
so the unlearned change follows the network as it moves without growing (re-solving TAC's s_p without such a
bound let ‖s_p‖ grow without end, ``benchmarks/tac_removal.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentguard.errors import ModelError
from latentguard.inference import eval_mode
from latentguard.models import named_layer


class LayerShift:
    """Adds ``delta`` (one activation-shaped tensor, broadcast over the batch) to a module's output while set."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self.module = named_layer(model, layer)
        self.delta: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.delta is None:
            return None
        if not isinstance(out, torch.Tensor) or out.shape[1:] != self.delta.shape:
            raise ModelError(f"layer {self.layer!r} gives {_shape(out)} per sample, not {tuple(self.delta.shape)}: "
                             "pick a layer whose output is one tensor")
        return out + self.delta

    @contextmanager
    def applied(self, delta: torch.Tensor) -> Iterator[None]:
        self.delta = delta
        try:
            yield
        finally:
            self.delta = None

    def remove(self) -> None:
        self._handle.remove()


def _shape(out: object) -> str:
    return str(tuple(out.shape[1:])) if isinstance(out, torch.Tensor) else type(out).__name__


def ball_attack(model: nn.Module, shift: LayerShift, x: torch.Tensor, target: int, radius: float,
                start: torch.Tensor, steps: int, step_frac: float = 0.25) -> torch.Tensor:
    """δ with ‖δ‖ ≤ ``radius`` lowering the mean CE toward ``target`` over ``x``: normalised gradient steps of
    ``step_frac``·radius from ``start`` (projected into the ball first), each followed by projection."""
    delta = _project(start.detach().clone(), radius)
    labels = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        with shift.applied(delta):
            loss = F.cross_entropy(model(x), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(delta - step_frac * radius * grad / grad.norm().clamp_min(1e-12), radius)
    return delta.detach()


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norm = float(delta.norm())
    return delta * (radius / norm) if norm > radius else delta


@torch.no_grad()
def flip_share(model: nn.Module, shift: LayerShift, x: torch.Tensor, target: int, delta: torch.Tensor) -> float:
    """Share of ``x`` predicted ``target`` with ``delta`` added at the shift's layer."""
    with shift.applied(delta):
        return float((model(x).argmax(1) == target).float().mean())


@dataclass
class DeepFlip:
    """δ_p at ``layer`` and its norm ε_p (the smallest radius found that flips ``share`` of the images to p)."""

    layer: str
    target: int
    radius: float
    delta: torch.Tensor
    share: float


def minimal_universal_flip(model: nn.Module, layer: str, x: torch.Tensor, target: int, *, flip_rate: float = 0.9,
                           steps: int = 10, bisections: int = 5, max_radius_doublings: int = 30) -> DeepFlip:
    """The smallest-norm universal shift of ``layer``'s output found that sends ``flip_rate`` of ``x`` to ``target``
    (``x``: float images of classes other than the target, on the model's device). Model in eval mode throughout."""
    with torch.no_grad(), eval_mode(model):
        acts: list[torch.Tensor] = []
        handle = named_layer(model, layer).register_forward_hook(lambda _m, _a, out: acts.append(out))
        try:
            model(x)
        finally:
            handle.remove()
    if not acts or not isinstance(acts[-1], torch.Tensor):
        raise ModelError(f"layer {layer!r} gave no tensor during the forward pass: pick a layer on the model's path")
    scale = float(acts[-1].flatten(1).norm(dim=1).median())  # a typical activation's norm: where the bracket starts
    zero = torch.zeros_like(acts[-1][0])
    shift = LayerShift(model, layer)
    try:
        with eval_mode(model):
            def attempt(radius: float, start: torch.Tensor) -> tuple[bool, torch.Tensor, float]:
                delta = ball_attack(model, shift, x, target, radius, start, steps)
                share = flip_share(model, shift, x, target, delta)
                return share >= flip_rate, delta, share

            lo, hi = 0.0, max(scale, 1e-6) * 0.25
            ok, delta, share = attempt(hi, zero)
            doublings = 0
            while not ok:
                if doublings >= max_radius_doublings:
                    raise ModelError(f"no shift of layer {layer!r} up to norm {hi:.3g} sends {flip_rate:.0%} of the "
                                     f"clean images to class {target}: pick a layer nearer the head")
                lo, hi, doublings = hi, hi * 2.0, doublings + 1
                ok, delta, share = attempt(hi, delta)
            best, best_share = delta, share
            for _ in range(bisections):
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
                ok, delta, share = attempt(mid, best)
                if ok:
                    hi, best, best_share = mid, delta, share
                else:
                    lo = mid
    finally:
        shift.remove()
    return DeepFlip(layer, int(target), float(hi), best, best_share)
