"""Device selection and seeding, in one place so no module copies device code."""

from __future__ import annotations

import random

import numpy as np
import torch

from latentguard.errors import LatentGuardError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``name`` ("auto" picks CUDA when present, else CPU)."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise LatentGuardError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentGuardError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's intra-op work (the CLI's ``--threads``): on a machine whose cores
    other jobs already use, one thread per core of this process oversubscribes them and slows every job."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LatentGuardError(f"threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module that holds neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
