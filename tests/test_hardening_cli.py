"""Bad inputs on the command line: every user mistake and hostile file gives one line and exit code 2.

Each case runs ``latentguard`` in a workspace of prepared inputs (a model bundle, weights, data, specs and
hostile files) and asserts: exit code 2, exactly one line on stderr naming the problem and the fix, no
traceback, and not a single file of the workspace created, changed or removed (hashes before/after). Files
whose loading would run code leave a marker file if that code ever runs; the marker must never appear.

Most cases call ``main([...])`` in-process (fast); a few run ``python -m latentguard`` as a subprocess to see
exactly what a user sees, and two interrupt a training run with SIGINT / SIGTERM.

``docs/bad_inputs.md`` lists every case with the first line of stderr: run
``LATENTGUARD_WRITE_DOCS=1 pytest tests/test_hardening_cli.py tests/test_hardening_api.py`` to regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from latentguard.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "bad_inputs.md"
WRITE_DOCS = os.environ.get("LATENTGUARD_WRITE_DOCS") == "1"
MARKER = "code-was-executed"  # any file with this in its name proves a hostile file ran code


# ----------------------------------------------------------------------------- shared with test_hardening_api
class _RunsCode:
    """Unpickling this calls ``fn(*args)``: a stand-in for a malicious checkpoint."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile_checkpoint(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A torch checkpoint whose unpickling would create ``marker`` (via ``open`` or, legacy format, ``exec``)."""
    payload = (_RunsCode(exec, f"open({str(marker)!r}, 'w').close()") if legacy
               else _RunsCode(open, str(marker), "w"))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


USER_MODELS = '''
import torch
from torch import nn


class ConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def conv_only():
    return ConvOnly()


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 5))


def boom():
    raise RuntimeError("kaboom")


def not_a_module():
    return 42
'''

#: A model file whose import leaves a marker in the working directory.
IMPORT_RUNS_CODE = f"""open({MARKER + '-import'!r}, 'w').close()
from torch import nn


def build():
    return nn.Linear(1, 1)
"""


def build_workspace(ws: Path) -> Path:
    """Write every input the bad-input cases use into ``ws`` (digits-shaped: 10 classes, 1×16×16)."""
    from PIL import Image
    from safetensors.torch import save_file

    from latentguard.attacks import make_attack, save_attack
    from latentguard.models import build_model, save_model

    ws.mkdir(parents=True, exist_ok=True)
    arch = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 16, "width": 8}
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, in_channels=1, image_size=16, width=8)
    save_model(net, ws / "model", arch)
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(ws / "nan.safetensors"))
    full = (ws / "model" / "model.safetensors").read_bytes()
    (ws / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    vit = build_model("vit_tiny", 10, in_channels=1, image_size=16, width=32)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(ws / "vit.safetensors"))
    (ws / "weights.h5").write_bytes(b"\x89HDF\r\n")
    (ws / "adir.safetensors").mkdir()
    (ws / "adir.safetensors" / "keep").write_text("x")
    hostile_checkpoint(ws / "hostile.pt", ws / f"{MARKER}-pt")
    hostile_checkpoint(ws / "hostile_legacy.pth", ws / f"{MARKER}-pth", legacy=True)

    (ws / "user_models.py").write_text(USER_MODELS)
    (ws / "imports_run_code.py").write_text(IMPORT_RUNS_CODE)
    (ws / "names_code").mkdir()
    (ws / "names_code" / "model.json").write_text(json.dumps({"arch": "imports_run_code.py:build", "num_classes": 10}))
    (ws / "broken_json").mkdir()
    (ws / "broken_json" / "model.json").write_text('{"arch": "small_cnn", ')

    atk = make_attack("badnets", num_classes=10, image_shape=(1, 16, 16))
    save_attack(atk, ws / "attack")
    spec = atk.spec.to_json()
    (ws / "unknown_field.json").write_text(json.dumps({**spec, "payload": "rm -rf ~"}))
    (ws / "bad_rate.json").write_text(json.dumps({**spec, "rate": 5}))
    (ws / "other_dataset.json").write_text(json.dumps({**spec, "image_shape": [3, 32, 32]}))

    np.savez(ws / "float.npz", x_train=np.zeros((4, 16, 16, 1), np.float32), y_train=np.arange(4),
             x_test=np.zeros((2, 16, 16, 1), np.float32), y_test=np.arange(2))
    np.savez(ws / "no_keys.npz", images=np.zeros((4, 16, 16, 1), np.uint8))
    (ws / "not_json.json").write_text("{indices: [1, 2")
    (ws / "three.json").write_text(json.dumps({"indices": [0, 1, 2]}))
    (ws / "out_of_range.json").write_text(json.dumps({"indices": [5, 99999]}))

    (ws / "not_a_dataset").mkdir()
    (ws / "not_a_dataset" / "notes.txt").write_text("holiday photos go here")
    rng = np.random.default_rng(0)
    for root, broken in (("corrupt", True), ("empty_class", False)):
        for split in ("train", "test"):
            for cls in ("a", "b"):
                folder = ws / root / split / cls
                folder.mkdir(parents=True)
                if root == "empty_class" and split == "train" and cls == "b":
                    continue
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(folder / "0.png")
        if broken:
            (ws / root / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)

    (ws / "results.txt").write_text("a file the user keeps\n")
    (ws / "previous_run").mkdir()
    (ws / "previous_run" / "metrics.json").write_text("{}\n")
    (ws / "thesis").mkdir()
    (ws / "thesis" / "chapter1.tex").write_text("\\chapter{Introduction}\n")
    return ws


def snapshot(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file and "dir" for every directory under ``root`` (bytecode caches
    written by Python when it imports a user's model file are not the user's files and are skipped)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def executed_markers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"*{MARKER}*")]


def sanitize(text: str, *roots: Path) -> str:
    """Make a message machine-independent for the docs: workspace paths become relative, timings vanish."""
    for root in roots:
        text = text.replace(str(root) + os.sep, "").replace(str(root), ".")
    return re.sub(r"after \d+s", "after Ns", text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_docs_section(name: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Replace the table between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in docs/bad_inputs.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOCS.read_text(encoding="utf-8")
    assert begin in text and end in text, f"{DOCS.name} lost its {begin} / {end} markers"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    for line in lines:
        assert not re.search(r"(^|[\s'\"(])/(tmp|root|work|home)/", line), f"machine path in docs row: {line}"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    DOCS.write_text(f"{head}{begin}\n" + "\n".join(lines) + f"\n{end}{tail}", encoding="utf-8")


def documented_cases(name: str) -> list[str]:
    """Case ids listed in a section of docs/bad_inputs.md."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    return re.findall(r"^\| `([\w-]+)` \|", section, flags=re.M)


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    what: str
    args: list[str]
    expect: list[str]
    known_issue: str | None = None  # an xfail: what is wrong and which fix is needed
    subprocess: bool = False  # also run through `python -m latentguard`
    marks: list = field(default_factory=list)


D = ["--device", "cpu"]
CLEAN = ["--clean", "digits"]
CASES = [
    # --- paths that are missing or of the wrong kind
    Case("missing-data-file", "data file that does not exist",
         ["evaluate", "--data", "npz:missing.npz", "--model", "model", *D], ["missing.npz", "not found"]),
    Case("missing-weights", "weights file that does not exist",
         ["evaluate", "--data", "digits", "--model", "small_cnn", "--weights", "missing.safetensors", *D],
         ["missing.safetensors", "not found"]),
    Case("weights-is-directory", "a directory where a weights file is expected (unreadable as a file)",
         ["evaluate", "--data", "digits", "--model", "small_cnn", "--weights", "adir.safetensors", *D],
         ["adir.safetensors", "directory"]),
    Case("indices-is-directory", "a directory where the indices JSON file is expected",
         ["detect", "--model", "model", *CLEAN, "--clean-indices", "not_a_dataset", "--out", "det", *D],
         ["not_a_dataset", "Is a directory"]),
    Case("npz-is-directory", "npz:PATH naming a directory",
         ["evaluate", "--data", "npz:not_a_dataset", "--model", "model", *D], ["not_a_dataset", "not a file"]),
    Case("model-dir-without-json", "a directory that holds no model.json as --model",
         ["evaluate", "--data", "digits", "--model", "not_a_dataset", *D], ["has no model.json"]),
    # --- data
    Case("not-a-dataset", "a directory that is not a dataset",
         ["evaluate", "--data", "not_a_dataset", "--model", "model", *D], ["no ImageFolder layout", "expected train/"],
         subprocess=True),
    Case("corrupt-image", "a corrupt PNG inside an ImageFolder",
         ["evaluate", "--data", "corrupt", "--model", "model", *D], ["cannot read image", "1.png", "replace or delete"]),
    Case("empty-class-folder", "an ImageFolder class folder without images",
         ["evaluate", "--data", "empty_class", "--model", "model", *D], ["contains no images"]),
    Case("npz-float-images", "npz with float32 images instead of uint8",
         ["evaluate", "--data", "npz:float.npz", "--model", "model", *D], ["dtype float32", "uint8"]),
    Case("npz-missing-keys", "npz without x_train/y_train/x_test/y_test (or x, y)",
         ["evaluate", "--data", "npz:no_keys.npz", "--model", "model", *D], ["expected x_train"]),
    Case("unknown-data-kind", "a data spec of an unknown kind",
         ["train", "--data", "mnist:somewhere", "--model", "small_cnn", "--out", "run", *D], ["unknown data spec"]),
    Case("clean-reserve-too-small", "a clean reserve of 3 images for 10 classes",
         ["detect", "--model", "model", *CLEAN, "--clean-indices", "three.json", "--out", "det", *D],
         ["3 images for 10 classes", "at least one image per class"]),
    Case("clean-fraction-zero", "--clean-fraction 0",
         ["remove", "--model", "model", *CLEAN, "--clean-fraction", "0", "--out", "rem", *D],
         ["--clean-fraction", "(0, 1]"]),
    Case("indices-not-json", "an indices file that is not JSON",
         ["detect", "--model", "model", *CLEAN, "--clean-indices", "not_json.json", "--out", "det", *D],
         ["not_json.json", "not an indices JSON file", '{"indices"']),
    Case("indices-out-of-range", "indices beyond the training split",
         ["remove", "--model", "model", *CLEAN, "--clean-indices", "out_of_range.json", "--out", "rem", *D],
         ["99999", "1347 images"]),
    # --- weights and model files
    Case("nan-weights", "a .safetensors with a NaN weight",
         ["evaluate", "--data", "digits", "--model", "model", "--weights", "nan.safetensors", *D], ["NaN/Inf", "fc.weight"]),
    Case("truncated-safetensors", "a truncated .safetensors file",
         ["evaluate", "--data", "digits", "--model", "model", "--weights", "truncated.safetensors", *D],
         ["truncated or corrupt", "re-export"]),
    Case("weights-other-architecture", "ViT weights for a small_cnn model",
         ["evaluate", "--data", "digits", "--model", "model", "--weights", "vit.safetensors", *D],
         ["do not fit the model", "check the architecture"]),
    Case("weights-unsupported-format", "weights in an unsupported format (.h5)",
         ["evaluate", "--data", "digits", "--model", "small_cnn", "--weights", "weights.h5", *D],
         ["unsupported weights file", ".safetensors"]),
    Case("pickle-runs-code", ".pt checkpoint whose pickle would run code (zip format)",
         ["evaluate", "--data", "digits", "--model", "small_cnn", "--weights", "hostile.pt", *D],
         ["refused hostile.pt", "could run code"], subprocess=True),
    Case("pickle-runs-code-legacy", ".pth checkpoint whose pickle would run code (legacy format)",
         ["detect", "--model", "small_cnn", "--weights", "hostile_legacy.pth", *CLEAN, "--out", "det", *D],
         ["refused hostile_legacy.pth", "could run code"]),
    Case("model-json-names-code", "model.json naming a .py file (importing it would run code)",
         ["detect", "--model", "names_code", *CLEAN, "--out", "det", *D],
         ["may only name a built-in architecture", "FILE.py:CALLABLE"], subprocess=True),
    Case("model-json-corrupt", "a model.json that is not valid JSON",
         ["evaluate", "--data", "digits", "--model", "broken_json", *D], ["cannot read model.json", "regenerate"]),
    Case("weights-as-model", "a weights file given as --model",
         ["evaluate", "--data", "digits", "--model", "model/model.safetensors", *D], ["is a weights file, not a model"]),
    Case("unknown-architecture", "an unknown architecture name",
         ["train", "--data", "digits", "--model", "resnet9000", "--out", "run", *D], ["resnet9000", "use one of"]),
    # --- the user's own model code
    Case("model-without-linear-head", "FILE.py:callable returning a conv-only network",
         ["detect", "--model", "user_models.py:conv_only", *CLEAN, "--out", "det", *D],
         ["no nn.Linear", "output layer an nn.Linear"]),
    Case("head-size-mismatch", "a model with 5 outputs for 10-class data",
         ["detect", "--model", "user_models.py:five_classes", *CLEAN, "--out", "det", *D],
         ["outputs (5,) logits", "10 classes"]),
    Case("callable-raises", "FILE.py:callable that raises",
         ["detect", "--model", "user_models.py:boom", *CLEAN, "--out", "det", *D], ["boom() failed", "kaboom"]),
    Case("callable-not-a-module", "FILE.py:callable returning an int",
         ["detect", "--model", "user_models.py:not_a_module", *CLEAN, "--out", "det", *D],
         ["returned a int", "not a torch.nn.Module"]),
    Case("callable-missing", "FILE.py:callable naming a function the file lacks",
         ["evaluate", "--data", "digits", "--model", "user_models.py:build", *D], ["has no callable 'build'", "conv_only"]),
    Case("unknown-head", "--head naming no layer of the model",
         ["detect", "--model", "model", *CLEAN, "--head", "classifier", "--out", "det", *D],
         ["no layer 'classifier'", "use one of"]),
    # --- attack specs
    Case("attack-spec-unknown-field", "attack.json with an unknown field",
         ["evaluate", "--data", "digits", "--model", "model", "--attack", "unknown_field.json", *D],
         ["unknown attack spec field(s) payload", "allowed are"]),
    Case("attack-spec-out-of-range", "attack.json with rate 5",
         ["evaluate", "--data", "digits", "--model", "model", "--attack", "bad_rate.json", *D],
         ["poison rate must be in (0, 1]"]),
    Case("attack-spec-other-dataset", "attack.json built for 3×32×32 images, used on digits",
         ["evaluate", "--data", "digits", "--model", "model", "--attack", "other_dataset.json", *D],
         ["built for images (3, 32, 32)", "rebuild the attack"]),
    Case("unknown-attack-param", "--param the attack does not have",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--param", "colour=red",
          "--out", "run", *D], ["unknown parameter(s) colour", "allowed are"]),
    Case("attack-target-out-of-range", "--target 99 on a 10-class dataset",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--target", "99",
          "--out", "run", *D], ["target 99", "10-class"]),
    # --- outputs that would destroy files
    Case("out-is-input-file", "--out pointing at an input file",
         ["evaluate", "--data", "digits", "--model", "model", "--weights", "model/model.safetensors",
          "--out", "model/model.safetensors", *D], ["would overwrite the input", "choose a new output directory"]),
    Case("out-is-model-dir-with-overwrite", "--out --overwrite pointing at the model being evaluated",
         ["evaluate", "--data", "digits", "--model", "model", "--out", "model", "--overwrite", *D],
         ["would overwrite the input model"]),
    Case("out-is-existing-file", "--out naming an existing file",
         ["train", "--data", "digits", "--model", "small_cnn", "--epochs", "0", "--out", "results.txt", *D],
         ["results.txt is a file", "choose a directory path"]),
    Case("out-not-empty", "--out naming a non-empty directory (no --overwrite)",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--epochs", "1",
          "--out", "previous_run", *D], ["already exists and is not empty", "--overwrite"]),
    Case("out-is-current-dir", "--out . --overwrite (would replace the working directory)",
         ["train", "--data", "digits", "--model", "small_cnn", "--epochs", "0", "--out", ".", "--overwrite", *D],
         ["current directory", "new subdirectory"]),
    Case("demo-over-user-dir", "demo --out naming a directory that is not a demo output",
         ["demo", "--out", "thesis", *D], ["not a previous demo output", "choose a new directory"]),
    # --- defenses and their parameters
    Case("unknown-defense", "an unknown defense",
         ["defend", "--method", "magic", "--model", "model", *CLEAN, "--out", "def", *D],
         ["unknown defense 'magic'", "choose one of"]),
    Case("unknown-defense-param", "--param the defense does not have",
         ["remove", "--model", "model", *CLEAN, "--param", "strength=3", "--out", "rem", *D],
         ["unknown parameter(s) strength", "allowed are"]),
    Case("defense-param-wrong-type", "--param epochs=many",
         ["remove", "--model", "model", *CLEAN, "--param", "epochs=many", "--out", "rem", *D], ["epochs", "many"]),
    Case("malformed-param", "--param without '='",
         ["remove", "--model", "model", *CLEAN, "--param", "epochs", "--out", "rem", *D], ["must look like name=value"]),
    Case("param-without-name", "--param '=3'",
         ["remove", "--model", "model", *CLEAN, "--param", "=3", "--out", "rem", *D], ["has no name"]),
    Case("bench-params-not-json", "bench --params that is not JSON",
         ["bench", "--datasets", "digits", "--defenses", "tac", "--params", "{tac: 1}", "--out", "bench"],
         ["--params is not valid JSON"]),
    Case("repair-file-truncated", "a truncated .safetensors given as --repair",
         ["evaluate", "--data", "digits", "--model", "model", "--repair", "truncated.safetensors", *D],
         ["truncated.safetensors", "repair"]),
    # --- numbers and options
    Case("negative-epochs", "--epochs -1",
         ["train", "--data", "digits", "--model", "small_cnn", "--epochs", "-1", "--out", "run"],
         ["--epochs", ">= 0", "--help"], subprocess=True),
    Case("rate-out-of-range", "--rate 1.5",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--rate", "1.5", "--out", "run"],
         ["--rate", "(0, 1]"]),
    Case("threshold-nan", "--threshold nan",
         ["detect", "--model", "model", *CLEAN, "--threshold", "nan", "--out", "det"], ["--threshold", "finite"]),
    Case("mad-floor-negative", "--mad-floor -0.1",
         ["detect", "--model", "model", *CLEAN, "--mad-floor", "-0.1", "--out", "det"], ["--mad-floor", "[0, 1]"]),
    Case("threads-zero", "--threads 0",
         ["evaluate", "--data", "digits", "--model", "model", "--threads", "0"], ["--threads", ">= 1"]),
    Case("learning-rate-nan", "--lr nan",
         ["train", "--data", "digits", "--model", "small_cnn", "--lr", "nan", "--epochs", "1", "--out", "run", *D],
         ["lr must be a positive number"]),
    Case("batch-size-zero", "--batch-size 0",
         ["train", "--data", "digits", "--model", "small_cnn", "--batch-size", "0", "--epochs", "1", "--out", "run", *D],
         ["batch_size must be >= 1"]),
    Case("width-zero", "--width 0",
         ["train", "--data", "digits", "--model", "small_cnn", "--width", "0", "--epochs", "0", "--out", "run", *D],
         ["width 0 is too small"]),
    Case("unknown-device", "--device tpu",
         ["evaluate", "--data", "digits", "--model", "model", "--device", "tpu"], ["unknown device 'tpu'", "use auto, cpu"]),
    Case("cuda-unavailable", "--device cuda on a machine without CUDA",
         ["evaluate", "--data", "digits", "--model", "model", "--device", "cuda"], ["CUDA is not available", "--device cpu"],
         marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")]),
    Case("unknown-command", "a verb latentguard does not have", ["scan", "--model", "model"], ["invalid choice: 'scan'"]),
    Case("missing-required-option", "detect without --model/--clean/--out", ["detect"],
         ["required: --model, --clean, --out"]),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"

_ROWS: dict[str, tuple[str, ...]] = {}


def _params(cases):
    out = []
    for c in cases:
        marks = list(c.marks)
        if c.known_issue:
            marks.append(pytest.mark.xfail(strict=True, reason=c.known_issue))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace of inputs, and an isolated data cache (loaders write decoded arrays there)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("LATENTGUARD_CACHE", str(cache))
    root = build_workspace(tmp_path_factory.mktemp("hardening") / "ws")
    yield root
    mp.undo()
    if WRITE_DOCS and _ROWS:
        rows = [_ROWS[c.id] for c in [*CASES, *INTERRUPTS] if c.id in _ROWS]
        write_docs_section("cli", ("case", "input", "command", "first line of stderr"), rows)


def _record(case, err: str, ws: Path) -> None:
    first = sanitize((err.strip().splitlines() or [""])[0], ws)
    if case.known_issue:
        first = f"**known issue** ({case.known_issue.split(':')[0]}): {first}"
    _ROWS[case.id] = (f"`{case.id}`", case.what, f"`latentguard {shlex.join(case.args)}`", first)


def _check(case: Case, code, err: str, ws: Path, before: dict[str, str]) -> None:
    assert "Traceback" not in err, err
    assert not executed_markers(ws), "a hostile file ran code"
    assert snapshot(ws) == before, "the workspace changed: a file was created, modified or removed"
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert ": error: " in lines[0]
    for piece in case.expect:
        assert piece in lines[0], f"{piece!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_cli(case: Case, ws: Path, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    try:
        code = main(case.args)
        err = capsys.readouterr().err
    except Exception as exc:  # an uncaught exception is what a user would see as a traceback
        code, err = None, f"Traceback: uncaught {type(exc).__name__}: {exc}"
    _record(case, err, ws)
    _check(case, code, err, ws, before)


@pytest.mark.parametrize("case", _params([c for c in CASES if c.subprocess]))
def test_bad_input_cli_subprocess(case: Case, ws: Path):
    """What the user sees: `python -m latentguard ...` prints one line, no traceback, exit code 2."""
    before = snapshot(ws)
    proc = subprocess.run([sys.executable, "-m", "latentguard", *case.args], cwd=ws, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _check(case, proc.returncode, proc.stderr, ws, before)


# ----------------------------------------------------------------------------- interrupted runs
INTERRUPTS = [
    Case("interrupted-sigint", "Ctrl-C (SIGINT) during training",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--epochs", "50",
          "--out", "run", "--quiet", "--device", "cpu"], ["interrupted", "no output was written"]),
    Case("interrupted-sigterm", "SIGTERM (kill) during training",
         ["attack", "--data", "digits", "--attack", "badnets", "--model", "small_cnn", "--epochs", "50",
          "--out", "run", "--quiet", "--device", "cpu"], ["interrupted", "no output was written"]),
]


@pytest.mark.parametrize(("case", "sig"), [(INTERRUPTS[0], signal.SIGINT), (INTERRUPTS[1], signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_nothing(case: Case, sig, ws: Path, tmp_path: Path):
    """Signal a training run once its temporary output exists: exit 130, no --out, no temporary sibling."""
    (tmp_path / "keep.txt").write_text("the user's file\n")
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "latentguard", *case.args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".run.tmp-*")):
            assert proc.poll() is None, f"the run ended before it was interrupted: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run never started writing its output"
            time.sleep(0.2)
        time.sleep(1.5)  # inside training by now
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _record(case, err, tmp_path)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in case.expect), err
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.*"))
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(getattr(os, "geteuid", lambda: -1)() == 0,
                    reason="root reads any file whatever its mode; the directory-instead-of-file cases stand in")
def test_unreadable_indices_file(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unreadable = tmp_path / "reserve.json"
    unreadable.write_text('{"indices": [0, 1]}')
    unreadable.chmod(0)
    try:
        code = main(["detect", "--model", "small_cnn", *CLEAN, "--clean-indices", "reserve.json", "--out", "det", *D])
    finally:
        unreadable.chmod(0o600)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Permission denied" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reserve.json"]


# ----------------------------------------------------------------------------- the hostile files are real
def test_hostile_files_would_run_code_if_loaded_unsafely(tmp_path: Path, monkeypatch):
    """The refusals above matter: loaded the unsafe way, these files do run code."""
    from latentguard.models import load_model

    monkeypatch.chdir(tmp_path)
    for legacy in (False, True):
        marker = tmp_path / f"{MARKER}-{legacy}"
        torch.load(hostile_checkpoint(tmp_path / f"h{int(legacy)}.pt", marker, legacy=legacy), weights_only=False)
        assert marker.exists()
    (tmp_path / "imports_run_code.py").write_text(IMPORT_RUNS_CODE)
    load_model("imports_run_code.py:build")
    assert (tmp_path / f"{MARKER}-import").exists()


# ----------------------------------------------------------------------------- docs
@pytest.mark.skipif(WRITE_DOCS, reason="the table is being regenerated")
def test_docs_table_lists_every_case():
    """docs/bad_inputs.md lists every case of this module (regenerate it when adding one), and no other."""
    documented = documented_cases("cli")
    ids = [c.id for c in [*CASES, *INTERRUPTS]]
    assert [i for i in ids if i not in documented and i != "cuda-unavailable"] == []
    assert [i for i in documented if i not in ids] == []
