"""FIRE's sites: where a direction lives (the head's input or a module's output) and the hooks that reach it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentguard.device import module_device
from latentguard.errors import ModelError, SpecError
from latentguard.inference import eval_mode, to_float_images
from latentguard.models import named_layer

PENULTIMATE = "penultimate"


@dataclass
class _Site:
    name: str  # PENULTIMATE or a module name
    module: nn.Module
    kind: str  # "input" (forward pre-hook on the head) or "output" (forward hook)


def _resolve_sites(model: nn.Module, layers: Sequence[str], head: str | None) -> list[_Site]:
    sites = []
    for name in layers:
        if name == PENULTIMATE:
            if head is None:
                raise ModelError("the penultimate layer needs the head's name: pass head=NAME")
            module = named_layer(model, head)
            if not isinstance(module, nn.Linear):
                raise ModelError(f"layer {head!r} is a {type(module).__name__}, not the nn.Linear head: pass head=NAME")
            sites.append(_Site(name, module, "input"))
        else:
            sites.append(_Site(name, named_layer(model, name), "output"))
    return sites


def _layer_names(layer: str | Sequence[str] | None) -> list[str]:
    if layer is None:
        return [PENULTIMATE]
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"layer must be a layer name, a list of names or None (penultimate), got {layer!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"layer lists {names} with repeats: give each layer once")
    return names


@contextlib.contextmanager
def _hooks(pairs: Sequence[tuple[_Site, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for site, fn in pairs:
            if site.kind == "input":
                handles.append(site.module.register_forward_pre_hook(fn))
            else:
                handles.append(site.module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _on(site: _Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable:
    """A hook applying ``fn`` to the site's tensor (head input or module output); ``None`` = unchanged."""
    if site.kind == "input":

        def pre(_m: nn.Module, args: tuple) -> tuple | None:
            out = fn(args[0])
            return None if out is None else (out, *args[1:])

        return pre
    return lambda _m, _a, out: fn(out)


def _flat(t: Any, site: _Site, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ModelError(f"layer {site.name!r} produces {type(t).__name__}, not a tensor: repair another layer")
    flat = t.reshape(t.shape[0], -1)
    if flat.shape[1] != dim:
        raise ModelError(
            f"the repair's direction for layer {site.name!r} has {dim} elements but the layer gives "
            f"{flat.shape[1]} per sample: the repair was made for another model"
        )
    return flat



@torch.no_grad()
def _collect(
    model: nn.Module, sites: Sequence[_Site], x: torch.Tensor, batch_size: int, dev: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unrepaired activations at ``sites`` (flattened, float32 CPU) and logits, batched, in eval mode."""
    acts: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    logits = []
    current: dict[str, torch.Tensor] = {}

    def grab(site: _Site) -> Callable:
        def keep(t: torch.Tensor) -> None:
            current[site.name] = t.reshape(t.shape[0], -1)

        return _on(site, keep)

    with eval_mode(model), _hooks([(s, grab(s)) for s in sites]):
        for start in range(0, x.shape[0], batch_size):
            current.clear()
            out = model(to_float_images(x[start : start + batch_size]).to(dev))
            for s in sites:
                if s.name not in current:
                    raise ModelError(f"layer {s.name!r} did not run during the forward pass: pick a layer on the model's path")
                acts[s.name].append(current[s.name].float().cpu())
            logits.append(out.float().cpu())
    if not logits:
        raise SpecError("no images given")
    return {n: torch.cat(v) for n, v in acts.items()}, torch.cat(logits)


@torch.no_grad()
def _site_shape(model: nn.Module, site: _Site, x1: torch.Tensor) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []

    def keep(t: torch.Tensor) -> None:
        seen.append(tuple(t.shape[1:]))

    with eval_mode(model), _hooks([(site, _on(site, keep))]):
        model(x1.to(module_device(model)))
    if not seen:
        raise ModelError(f"layer {site.name!r} did not run during the forward pass: pick a layer on the model's path")
    return seen[-1]
