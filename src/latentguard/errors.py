"""Typed exceptions for user errors.

Every error a user can fix (a bad path, a wrong shape, weights that do not fit) is raised as a
:class:`LatentGuardError` subclass with a one-line message saying what is wrong and what to do. The CLI turns
these into exit code 2 without a traceback; anything else is a bug.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class LatentGuardError(Exception):
    """Base class of all user-facing errors (the CLI exits 2 on these)."""


class DataError(LatentGuardError):
    """The data spec, files or arrays are unusable."""


class ModelError(LatentGuardError):
    """The model spec, architecture or weights are unusable."""


class SpecError(LatentGuardError):
    """An attack, defense or parameter specification is invalid."""


class UnsafeFileError(ModelError):
    """A file would need arbitrary code execution (pickle) to load and was refused."""


class SolverError(LatentGuardError):
    """A latent-space optimisation problem is infeasible or ill-posed."""


def build_params(params_cls: type, values: dict[str, Any], owner: str) -> Any:
    """``params_cls(**values)`` for an attack's or defense's parameter dataclass; an unknown name or a bad
    value raises a one-line :class:`SpecError` naming ``owner`` (e.g. ``"attack 'blend'"``)."""
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpecError(f"unknown parameter(s) {', '.join(unknown)} for {owner}: allowed are {', '.join(sorted(known))}")
    try:
        return params_cls(**values)
    except TypeError as exc:
        raise SpecError(f"bad parameters for {owner}: {exc}") from exc
