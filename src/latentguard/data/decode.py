"""Image decoding with Pillow: file listing, parallel decode into uint8 NHWC arrays, resizing."""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from latentguard.errors import DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
# Modes that decode to one channel; everything else (RGB, RGBA, P, CMYK, YCbCr, ...) counts as colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Below this many files a process pool costs more than it saves.
PARALLEL_MIN_FILES = 2048


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(directory: Path) -> list[Path]:
    """Image files anywhere under ``directory`` (hidden entries skipped), sorted by relative path."""
    found: list[str] = []
    for top, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(top, f) for f in files if is_image_file(f))
    return [Path(p) for p in sorted(found)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open(path: str) -> Image.Image:
    with open(path, "rb") as fh:
        data = fh.read()
    return Image.open(io.BytesIO(data))


def _unreadable(path: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image {path} ({_one_line(exc)}): replace or delete the file")


def _decode_one(path: str, size: tuple[int, int], mode: str) -> np.ndarray:
    """Decode ``path`` to an (H, W, C) uint8 array in ``mode`` ("L" or "RGB") at ``size`` (H, W)."""
    try:
        im = _open(path)
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            # 16/32-bit grey: Pillow's direct conversion clips, so rescale to 8 bits first.
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            im = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
        if im.mode != mode:
            im = im.convert(mode)
        h, w = size
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise _unreadable(path, exc) from exc
    return arr.reshape(h, w, 1) if arr.ndim == 2 else arr


def _decode_chunk(args: tuple[Sequence[str], tuple[int, int], str]) -> np.ndarray:
    paths, size, mode = args
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size[0], size[1], channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = _decode_one(p, size, mode)
    return out


def _header_chunk(paths: Sequence[str]) -> list[tuple[int, int, bool]]:
    """(H, W, is_gray) of each file, reading headers only."""
    result = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
                gray = im.mode in _GRAY_MODES
        except Exception as exc:
            raise _unreadable(p, exc) from exc
        result.append((h, w, gray))
    return result


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _chunks(items: Sequence[str], workers: int) -> list[Sequence[str]]:
    size = max(64, min(2048, -(-len(items) // (workers * 8))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _map(fn, tasks: list, workers: int) -> Iterable:
    """``map(fn, tasks)`` in order, through a fork-based process pool when that pays off.

    Decoding small images is dominated by Python overhead, so threads do not help (the GIL); processes do.
    Only ``fork`` is used (Linux); elsewhere decoding runs in this process.
    """
    if workers > 1 and len(tasks) > 1 and sys.platform.startswith("linux"):
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            ctx = None
        if ctx is not None:
            with warnings.catch_warnings():
                # Python >= 3.12 warns about fork in a process with threads; the workers only run Pillow.
                warnings.simplefilter("ignore", DeprecationWarning)
                pool = ctx.Pool(min(workers, len(tasks)), initializer=_default_signals)
            with pool:
                yield from pool.imap(fn, tasks)
            return
    yield from map(fn, tasks)


def _default_signals() -> None:
    """Workers die quietly on the pool's SIGTERM instead of running a handler inherited from the caller."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _resolve_workers(n_files: int, workers: int | None) -> int:
    if workers is None:
        return default_workers() if n_files >= PARALLEL_MIN_FILES else 1
    return max(1, int(workers))


def scan_headers(paths: Sequence[Path], *, workers: int | None = None) -> list[tuple[int, int, bool]]:
    """(H, W, is_gray) for every file, from image headers only."""
    items = [os.fspath(p) for p in paths]
    n = _resolve_workers(len(items), workers)
    out: list[tuple[int, int, bool]] = []
    for part in _map(_header_chunk, _chunks(items, n), n):
        out.extend(part)
    return out


def choose_format(
    headers: Sequence[tuple[int, int, bool]], image_size: int | None
) -> tuple[tuple[int, int], int]:
    """Target (H, W) and channel count: ``image_size`` or the most common size; RGB unless all are grey."""
    if not headers:
        raise DataError("no images to decode")
    channels = 1 if all(g for _, _, g in headers) else 3
    if image_size is not None:
        return (image_size, image_size), channels
    counts = Counter((h, w) for h, w, _ in headers)
    size = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return size, channels


def decode_images(
    paths: Sequence[Path],
    size: tuple[int, int],
    channels: int,
    *,
    workers: int | None = None,
) -> np.ndarray:
    """Decode ``paths`` into one uint8 array (N, H, W, C), converting and resizing (bilinear) as needed.

    A file Pillow cannot read raises :class:`DataError` naming it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    items = [os.fspath(p) for p in paths]
    out = np.empty((len(items), size[0], size[1], channels), dtype=np.uint8)
    if not items:
        return out
    n = _resolve_workers(len(items), workers)
    mode = "L" if channels == 1 else "RGB"
    chunks = _chunks(items, n)
    start = 0
    for part in _map(_decode_chunk, [(c, size, mode) for c in chunks], n):
        out[start : start + len(part)] = part
        start += len(part)
    return out


def resize_array(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 NHWC images to ``size`` (H, W) with bilinear filtering; returns ``x`` when unchanged."""
    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    c = x.shape[3]
    out = np.empty((x.shape[0], h, w, c), dtype=np.uint8)
    for i in range(x.shape[0]):
        im = Image.fromarray(x[i, :, :, 0] if c == 1 else x[i], "L" if c == 1 else "RGB")
        arr = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        out[i] = arr.reshape(h, w, c)
    return out
