"""Saving and loading a FIRE repair: tensors and plain metadata only, checked against the model on load."""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentguard.defenses.fire.sites import _site_shape
from latentguard.defenses.fire.wrapper import _SOURCE_TENSORS, _STATE_TENSORS, FORMAT, RepairedModel
from latentguard.device import module_device
from latentguard.errors import ModelError, SpecError, UnsafeFileError


def save_repair(wrapper: RepairedModel, path: str | os.PathLike[str]) -> Path:
    """Write the repair (directions, α, statistics, metadata) — no model weights, no pickled objects.

    The file is a ``torch.save`` of a flat dict of tensors, strings, numbers and lists, readable with
    ``torch.load(path, weights_only=True)``; a path ending in ``.safetensors`` gets a safetensors file instead
    (the tensors, with the rest as JSON in its metadata). Written atomically.
    """
    if not isinstance(wrapper, RepairedModel):
        raise SpecError(f"save_repair needs a RepairedModel, got {type(wrapper).__name__}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fire-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    state = wrapper.state()
    try:
        if out.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
            meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
            save_file(tensors, tmp, metadata={_SAFETENSORS_KEY: json.dumps(meta)})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_SAFETENSORS_KEY = "latentguard.fire"


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get(_SAFETENSORS_KEY)
        state: dict[str, Any] = json.loads(meta) if meta else {}
        if not isinstance(state, dict):
            raise ValueError("its metadata is not a JSON object")
        for key in f.keys():
            state[key] = f.get_tensor(key)
    return state


def _field(state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in state or not isinstance(state[key], kind) or isinstance(state[key], bool) and kind is not bool:
        raise ModelError(f"{path} is not a valid FIRE repair file (field {key!r} missing or malformed)")
    return state[key]


def load_repair(model: nn.Module, path: str | os.PathLike[str], *, head: str | None = None) -> RepairedModel:
    """Rebuild a :class:`RepairedModel` around ``model`` from a :func:`save_repair` file.

    ``head`` overrides the stored name of the model's output nn.Linear. A file that needs unpickling of Python
    objects is refused (:class:`~latentguard.errors.UnsafeFileError`); directions or statistics that do not fit
    the model raise :class:`~latentguard.errors.ModelError` (intermediate layers are checked with a probe when
    the model declares its input shape in ``arch_config``, else at the first forward pass). Online refinement
    of a loaded repair needs :meth:`RepairedModel.calibrate` first.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"repair file {p} not found: pass the file written by save_repair")
    try:
        state = _read_safetensors(p) if p.suffix.lower() == ".safetensors" else torch.load(
            p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{p} needs unpickling of Python objects, which is refused: write repair files with save_repair"
        ) from exc
    except Exception as exc:  # any other reader failure (truncated, corrupt, not a torch file) is the file's fault
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{p} is not a readable repair file ({msg}): write it with save_repair") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{p} is not a FIRE repair file (format {FORMAT!r} expected): write it with save_repair")
    layers = _field(state, "layers", list, p)
    alphas = _field(state, "alphas", list, p)
    if len(alphas) != len(layers) or not all(isinstance(n, str) for n in layers) or not layers:
        raise ModelError(f"{p} is not a valid FIRE repair file (layers and alphas disagree)")
    tensors: dict[str, dict[str, torch.Tensor]] = {key: {} for key, _ in _STATE_TENSORS}
    for i, name in enumerate(layers):
        for key in tensors:
            tensors[key][name] = _field(state, f"{key}.{i}", torch.Tensor, p)
    calibrated = _field(state, "calibrated", bool, p)
    per_source = bool(state.get("per_source", False))
    extra = {key: _field(state, key, torch.Tensor, p) for key, _ in _SOURCE_TENSORS} if per_source else {}
    wrapper = RepairedModel(
        model,
        layers=layers,
        directions=tensors["beta"],
        alphas={n: float(a) for n, a in zip(layers, alphas, strict=True)},
        rule=_field(state, "rule", str, p),
        gate=_field(state, "gate", str, p),
        floor=_field(state, "floor", bool, p),
        quantile=float(_field(state, "quantile", float | int, p)),
        head=head or _field(state, "head", str, p) or None,
        num_classes=int(_field(state, "num_classes", int, p)),
        targets=[int(t) for t in _field(state, "targets", list, p)],
        source=_field(state, "source", str, p),
        thresholds=tensors["thresholds"] if calibrated else None,
        proj_mean=tensors["proj_mean"] if calibrated else None,
        proj_std=tensors["proj_std"] if calibrated else None,
        proj_ref=tensors["proj_ref"],
        per_source=per_source,
        source_directions=extra.get("source_beta"),
        source_thresholds=extra.get("source_thresholds") if calibrated else None,
        flag_thresholds=extra.get("flag_thresholds") if calibrated else None,
        info={"loaded_from": p.name},
    )
    _check_layer_shapes(wrapper, model)
    return wrapper.to(module_device(model))


def _check_layer_shapes(wrapper: RepairedModel, model: nn.Module) -> None:
    """Check intermediate directions against the layer outputs when the model declares its input shape."""
    cfg = getattr(model, "arch_config", None)
    outputs = [(i, s) for i, s in enumerate(wrapper._sites) if s.kind == "output"]
    if not outputs or not isinstance(cfg, dict) or "in_channels" not in cfg or "image_size" not in cfg:
        return
    x1 = torch.zeros(1, int(cfg["in_channels"]), int(cfg["image_size"]), int(cfg["image_size"]))
    for i, site in outputs:
        shape = _site_shape(model, site, x1)
        beta = wrapper._buf("beta", i)
        if math.prod(shape) != beta[0].numel():
            raise ModelError(
                f"the repair's direction for layer {site.name!r} has shape {tuple(beta.shape[1:])} but the layer "
                f"outputs {shape}: the repair was made for another model"
            )
