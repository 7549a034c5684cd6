"""Same command, same seed, same answer: ``detect``, ``remove`` and ``repair`` on CPU.

Each command runs twice on the same tiny BadNets model (digits, ``small_cnn``, 3 epochs, trained once for
the module) with the same ``--seed``, and the JSON files they write must be identical once wall-clock fields
are dropped: every key named ``seconds`` (run time of the command, of the detection, of the defense, and of
each epoch in a training ``history``) and ``created`` (the timestamp). Everything else (norms, scores,
flagged classes, accuracies, parameters, input hashes, library versions) must match exactly, and so must the
weights ``remove`` writes and the tensors of the repair ``repair`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from latentguard.cli import main

WALL_CLOCK_KEYS = frozenset({"seconds", "created"})
SEED = ["--seed", "7", "--device", "cpu"]


def without_wall_clock(obj: Any) -> Any:
    """``obj`` with every key in WALL_CLOCK_KEYS removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(obj, list):
        return [without_wall_clock(v) for v in obj]
    return obj


def _json(path: Path) -> Any:
    return without_wall_clock(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "badnets"
    assert main(["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--epochs", "3",
                 "--out", str(out), "--quiet", "--seed", "0", "--device", "cpu"]) == 0
    return out


def _twice(verb: str, attacked: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    outs = (tmp_path / "first", tmp_path / "second")
    for out in outs:
        assert main([verb, "--model", str(attacked), "--clean", "digits", "--clean-fraction", "0.1",
                     "--out", str(out), *SEED, *extra]) == 0
    return outs


def _same_json(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        first, second = _json(a / name), _json(b / name)
        assert first == second, f"{name} differs between two runs with the same seed"


def test_detect_is_reproducible(attacked: Path, tmp_path: Path):
    a, b = _twice("detect", attacked, tmp_path)
    _same_json(a, b, ["detection.json", "result.json"])
    assert len(_json(a / "detection.json")["norms"]) == 10


def test_remove_is_reproducible(attacked: Path, tmp_path: Path):
    a, b = _twice("remove", attacked, tmp_path, "--param", "epochs=1", "--param", "min_steps=0")
    _same_json(a, b, ["report.json", "detection.json"])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert _json(a / "report.json")["parameters"]["params"]["epochs"] == 1


def test_repair_is_reproducible(attacked: Path, tmp_path: Path):
    a, b = _twice("repair", attacked, tmp_path)
    _same_json(a, b, ["report.json"])
    first = torch.load(a / "repair.pt", weights_only=True)
    second = torch.load(b / "repair.pt", weights_only=True)
    assert first.keys() == second.keys()
    for key, value in first.items():
        same = torch.equal(value, second[key]) if isinstance(value, torch.Tensor) else value == second[key]
        assert same, f"repair.pt field {key} differs between two runs with the same seed"


def test_wall_clock_keys_are_the_only_exclusions():
    record = {"seconds": 1.0, "created": "now", "metrics": {"acc": 0.5, "history": {"seconds": 2, "epochs": [
        {"epoch": 1, "seconds": 0.1, "loss": 0.3}]}}}
    assert without_wall_clock(record) == {"metrics": {"acc": 0.5, "history": {"epochs": [{"epoch": 1, "loss": 0.3}]}}}
