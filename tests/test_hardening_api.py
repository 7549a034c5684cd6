"""Bad inputs through the Python API: every mistake raises a typed, one-line ``LatentGuardError``.

Each case calls the API with one bad input and asserts the exception class, a single-line message naming
the problem and the fix, and that nothing was touched: the workspace files (hashes), the model's weights and
the caller's tensors are unchanged, and no hostile file ran code. The same workspace as the command-line
cases is used (see ``test_hardening_cli.build_workspace``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import latentguard as lg
from latentguard.attacks import load_attack
from latentguard.data import clean_reserve, load_data
from latentguard.errors import DataError, LatentGuardError, ModelError, SpecError, UnsafeFileError
from latentguard.models import build_model, load_model
from test_hardening_cli import (
    WRITE_DOCS,
    build_workspace,
    documented_cases,
    executed_markers,
    sanitize,
    snapshot,
    write_docs_section,
)


@dataclass
class ApiCase:
    id: str
    what: str
    call: str  # how the docs show the call
    run: Callable[[Any], Any]
    error: type[LatentGuardError]
    expect: list[str]
    known_issue: str | None = None


def _nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


def _nan_model() -> nn.Module:
    net = build_model("small_cnn", 10, in_channels=1, image_size=16, width=8)
    with torch.no_grad():
        net.fc.weight[0, 0] = float("inf")
    return net


CPU = {"device": "cpu"}
CASES = [
    # --- the clean data
    ApiCase("reserve-smaller-than-classes", "3 clean images for 10 classes", "detect(model, (x[:3], y[:3]))",
            lambda e: lg.detect(e.model, (e.x[:3], e.y[:3]), **CPU), DataError, ["3 images for 10 classes"]),
    ApiCase("reserve-smaller-than-classes-remove", "3 clean images for 10 classes", "remove(model, (x[:3], y[:3]))",
            lambda e: lg.remove(e.model, (e.x[:3], e.y[:3]), **CPU), DataError, ["3 images for 10 classes"]),
    ApiCase("reserve-smaller-than-classes-repair", "3 clean images for 10 classes", "repair(model, (x[:3], y[:3]))",
            lambda e: lg.repair(e.model, (e.x[:3], e.y[:3]), **CPU), DataError, ["3 images for 10 classes"]),
    ApiCase("nan-images", "float images holding a NaN", "detect(model, (x_with_nan, y))",
            lambda e: lg.detect(e.model, (_nan(e.x), e.y), **CPU), DataError, ["NaN"]),
    ApiCase("images-0-255", "float images in [0, 255]", "detect(model, (x * 255, y))",
            lambda e: lg.detect(e.model, (e.x * 255, e.y), **CPU), DataError, ["[0, 1]", "rescale"]),
    ApiCase("float-images-nhwc", "float images laid out N×H×W×C", "detect(model, (x.permute(0, 2, 3, 1), y))",
            lambda e: lg.detect(e.model, (e.x.permute(0, 2, 3, 1), e.y), **CPU), DataError, ["(N, C, H, W)"]),
    ApiCase("uint8-images-nchw", "uint8 images laid out N×C×H×W", "detect(model, ((x * 255).byte(), y))",
            lambda e: lg.detect(e.model, ((e.x * 255).byte(), e.y), **CPU), DataError, ["(N, H, W, C)"]),
    ApiCase("label-count-mismatch", "200 images but 10 labels", "detect(model, (x, y[:10]))",
            lambda e: lg.detect(e.model, (e.x, e.y[:10]), **CPU), DataError, ["must match one to one"]),
    ApiCase("float-labels", "float labels", "detect(model, (x, y.float()))",
            lambda e: lg.detect(e.model, (e.x, e.y.float()), **CPU), DataError, ["integer", "float32"]),
    ApiCase("negative-labels", "labels below 0", "detect(model, (x, y - 1))",
            lambda e: lg.detect(e.model, (e.x, e.y - 1), **CPU), DataError, [">= 0"]),
    ApiCase("empty-clean-data", "zero images", "detect(model, (x[:0], y[:0]))",
            lambda e: lg.detect(e.model, (e.x[:0], e.y[:0]), **CPU), DataError, ["empty"]),
    ApiCase("clean-not-a-pair", "images without labels", "detect(model, x)",
            lambda e: lg.detect(e.model, e.x, **CPU), DataError, ["(images, labels) pair", "Tensor"]),
    ApiCase("clean-is-dict", "a dict instead of (x, y)", 'detect(model, {"x": x, "y": y})',
            lambda e: lg.detect(e.model, {"x": e.x, "y": e.y}, **CPU), DataError, ["(images, labels) pair", "dict"]),
    ApiCase("labels-beyond-model", "labels 0–9 for a model with 5 outputs", "detect(five_class_model, (x, y))",
            lambda e: lg.detect(e.five, (e.x, e.y), **CPU), DataError, ["go up to 9", "outputs 5"]),
    ApiCase("images-classes-vs-model", "a 10-class Images set for a model with 5 outputs",
            "defend('ft', five_class_model, digits_images)",
            lambda e: lg.defend("ft", e.five, e.images, **CPU), DataError, ["10 classes but the model outputs 5"]),
    # --- the model
    ApiCase("model-is-function", "a function instead of a model", "detect(lambda x: x, (x, y))",
            lambda e: lg.detect(lambda t: t, (e.x, e.y), **CPU), ModelError, ["torch.nn.Module", "function"]),
    ApiCase("model-is-state-dict", "a state_dict instead of a model", "remove(model.state_dict(), (x, y))",
            lambda e: lg.remove(e.model.state_dict(), (e.x, e.y), **CPU), ModelError, ["OrderedDict"]),
    ApiCase("nan-model", "a model with an Inf weight", "detect(model_with_inf, (x, y))",
            lambda e: lg.detect(e.nan_model, (e.x, e.y), **CPU), ModelError, ["NaN/Inf", "fc.weight"]),
    ApiCase("model-without-linear-head", "a conv-only model", "detect(conv_only_model, (x, y))",
            lambda e: lg.detect(e.conv_only, (e.x, e.y), **CPU), ModelError, ["no nn.Linear"]),
    ApiCase("channel-mismatch", "grey images for an RGB model", "detect(rgb_model, (x, y))",
            lambda e: lg.detect(e.rgb, (e.x, e.y), **CPU), ModelError, ["in_channels"]),
    # --- defenses, their parameters and options
    ApiCase("unknown-defense", "an unknown defense", 'defend("magic", model, (x, y))',
            lambda e: lg.defend("magic", e.model, (e.x, e.y), **CPU), SpecError, ["unknown defense 'magic'"]),
    ApiCase("unknown-defense-param", "a parameter the defense does not have", "remove(model, (x, y), strength=3)",
            lambda e: lg.remove(e.model, (e.x, e.y), strength=3, **CPU), SpecError, ["strength", "allowed are"]),
    ApiCase("defense-param-wrong-type", "epochs given as a string", 'remove(model, (x, y), epochs="many")',
            lambda e: lg.remove(e.model, (e.x, e.y), epochs="many", **CPU), SpecError, ["epochs", "many"]),
    ApiCase("unknown-device", "device 'tpu'", 'detect(model, (x, y), device="tpu")',
            lambda e: lg.detect(e.model, (e.x, e.y), device="tpu"), LatentGuardError, ["unknown device 'tpu'"]),
    ApiCase("threshold-nan", "threshold NaN", 'detect(model, (x, y), threshold=float("nan"))',
            lambda e: lg.detect(e.model, (e.x, e.y), threshold=float("nan"), **CPU), SpecError, ["finite"]),
    ApiCase("quantile-zero", "quantile 0", "detect(model, (x, y), quantile=0)",
            lambda e: lg.detect(e.model, (e.x, e.y), quantile=0, **CPU), LatentGuardError, ["quantile", "(0, 1]"]),
    # --- files: repairs, weights, model descriptions, data, attack specs
    ApiCase("repair-file-runs-code", "a repair file whose pickle would run code", 'load_repair(model, "hostile.pt")',
            lambda e: lg.load_repair(e.model, "hostile.pt"), UnsafeFileError, ["refused"]),
    ApiCase("repair-file-missing", "a repair file that does not exist", 'load_repair(model, "missing.pt")',
            lambda e: lg.load_repair(e.model, "missing.pt"), ModelError, ["not found"]),
    ApiCase("repair-file-truncated", "a truncated .safetensors as repair file",
            'load_repair(model, "truncated.safetensors")',
            lambda e: lg.load_repair(e.model, "truncated.safetensors"), ModelError, ["truncated.safetensors"]),
    ApiCase("weights-run-code", "weights whose pickle would run code",
            'load_model("small_cnn", weights="hostile.pt", num_classes=10)',
            lambda e: load_model("small_cnn", weights="hostile.pt", num_classes=10), UnsafeFileError,
            ["refused hostile.pt", "could run code"]),
    ApiCase("weights-run-code-legacy", "legacy-format weights whose pickle would run code",
            'load_model("small_cnn", weights="hostile_legacy.pth", num_classes=10)',
            lambda e: load_model("small_cnn", weights="hostile_legacy.pth", num_classes=10), UnsafeFileError,
            ["refused hostile_legacy.pth"]),
    ApiCase("model-json-names-code", "model.json naming a .py file", 'load_model("names_code")',
            lambda e: load_model("names_code"), UnsafeFileError, ["built-in architecture"]),
    ApiCase("truncated-safetensors", "a truncated .safetensors", 'load_model("model", weights="truncated.safetensors")',
            lambda e: load_model("model", weights="truncated.safetensors"), ModelError, ["truncated or corrupt"]),
    ApiCase("nan-weights", "a .safetensors with a NaN", 'load_model("model", weights="nan.safetensors")',
            lambda e: load_model("model", weights="nan.safetensors"), ModelError, ["NaN/Inf"]),
    ApiCase("weights-other-architecture", "ViT weights for small_cnn", 'load_model("model", weights="vit.safetensors")',
            lambda e: load_model("model", weights="vit.safetensors"), ModelError, ["do not fit the model"]),
    ApiCase("callable-raises", "FILE.py:callable that raises", 'load_model("user_models.py:boom")',
            lambda e: load_model("user_models.py:boom"), ModelError, ["kaboom"]),
    ApiCase("callable-not-a-module", "FILE.py:callable returning an int", 'load_model("user_models.py:not_a_module")',
            lambda e: load_model("user_models.py:not_a_module"), ModelError, ["not a torch.nn.Module"]),
    ApiCase("npz-missing-keys", "npz without the expected arrays", 'load_data("npz:no_keys.npz")',
            lambda e: load_data("npz:no_keys.npz"), DataError, ["expected x_train"]),
    ApiCase("npz-float-images", "npz with float32 images", 'load_data("npz:float.npz")',
            lambda e: load_data("npz:float.npz"), DataError, ["float32", "uint8"]),
    ApiCase("corrupt-image", "a corrupt PNG in an ImageFolder", 'load_data("corrupt")',
            lambda e: load_data("corrupt"), DataError, ["cannot read image", "replace or delete"]),
    ApiCase("empty-class-folder", "an empty class folder", 'load_data("empty_class")',
            lambda e: load_data("empty_class"), DataError, ["contains no images"]),
    ApiCase("not-a-dataset", "a directory that is not a dataset", 'load_data("not_a_dataset")',
            lambda e: load_data("not_a_dataset"), DataError, ["no ImageFolder layout"]),
    ApiCase("reserve-fraction-zero", "a clean-reserve fraction of 0", "clean_reserve(digits_images, 0)",
            lambda e: clean_reserve(e.images, 0), DataError, ["(0, 1]"]),
    ApiCase("attack-spec-unknown-field", "attack.json with an unknown field", 'load_attack("unknown_field.json")',
            lambda e: load_attack("unknown_field.json"), SpecError, ["unknown attack spec field(s) payload"]),
    ApiCase("attack-spec-out-of-range", "attack.json with rate 5", 'load_attack("bad_rate.json")',
            lambda e: load_attack("bad_rate.json"), SpecError, ["(0, 1]"]),
]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

_ROWS: dict[str, tuple[str, ...]] = {}


def _state_hash(*models: Any) -> str:
    h = hashlib.sha256()
    for m in models:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    ws = build_workspace(tmp_path_factory.mktemp("hardening-api") / "ws")
    digits = load_data("digits")
    images = digits.train.subset(np.arange(200))
    x, y = images.tensors()
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    yield SimpleNamespace(
        ws=ws, x=x, y=y, images=images, model=load_model(ws / "model"), nan_model=_nan_model(),
        five=nn.Sequential(nn.Flatten(), nn.Linear(256, 5)), conv_only=conv_only,
        rgb=build_model("small_cnn", 10, in_channels=3, image_size=16, width=8),
    )
    mp.undo()
    if WRITE_DOCS and _ROWS:
        write_docs_section("api", ("case", "input", "call", "exception"), [_ROWS[c.id] for c in CASES if c.id in _ROWS])


def _params():
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_issue)]
                         if c.known_issue else []) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_input_api(case: ApiCase, env, monkeypatch):
    monkeypatch.chdir(env.ws)
    models = (env.model, env.five, env.rgb, env.conv_only)
    before = (snapshot(env.ws), _state_hash(*models), env.x.clone(), env.y.clone())
    try:
        case.run(env)
    except Exception as exc:  # the type is asserted below
        error = exc
    else:
        error = None
    shown = "no error" if error is None else f"{type(error).__name__}: {sanitize(str(error), env.ws)}"
    note = f"**known issue** ({case.known_issue.split(':')[0]}): " if case.known_issue else ""
    _ROWS[case.id] = (f"`{case.id}`", case.what, f"`{case.call}`", note + shown.splitlines()[0])
    assert not executed_markers(env.ws), "a hostile file ran code"
    assert isinstance(error, case.error), f"expected {case.error.__name__}, got {shown}"
    message = str(error)
    assert "\n" not in message.strip(), message
    for piece in case.expect:
        assert piece in message, f"{piece!r} not in {message!r}"
    assert snapshot(env.ws) == before[0], "a workspace file was created, changed or removed"
    assert _state_hash(*models) == before[1], "the model's weights changed"
    assert torch.equal(env.x, before[2]) and torch.equal(env.y, before[3]), "the caller's tensors changed"


@pytest.mark.skipif(WRITE_DOCS, reason="the table is being regenerated")
def test_docs_table_lists_every_case():
    """docs/bad_inputs.md lists every case of this module (regenerate it when adding one), and no other."""
    assert documented_cases("api") == [c.id for c in CASES]


def test_images_container_keeps_working(env):
    """Sanity: the checks leave good input alone (an Images set and an (x, y) pair give the same report)."""
    a = lg.detect(env.model, env.images, device="cpu", log_norms=False)
    b = lg.detect(env.model, (env.x, env.y), device="cpu", log_norms=False)
    assert a.norms == b.norms and len(a.norms) == 10


def test_labels_may_cover_fewer_classes_than_the_model(env):
    """Labels 0..4 for a 10-class model: the data takes the model's 10 classes (no error)."""
    keep = env.y < 5
    report = lg.detect(env.model, (env.x[keep], env.y[keep]), device="cpu", log_norms=False)
    assert len(report.norms) == 10


def test_images_are_checked_before_the_model_runs(env):
    """Bad images are reported as a DataError even when the model would also fail on them."""
    with pytest.raises(DataError):
        lg.detect(env.rgb, (_nan(env.x), env.y), device="cpu")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_set_threads_refuses_what_is_not_a_positive_whole_number(bad):
    from latentguard.device import set_threads

    with pytest.raises(LatentGuardError, match="threads must be a whole number >= 1"):
        set_threads(bad)


def test_set_threads_sets_torchs_thread_count():
    import torch

    from latentguard.device import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
