"""Inference overhead of the FIRE repair wrapper: repaired forward / undefended forward on the CPU.

A ``preact_resnet18`` (width 16, 32×32×3, 10 classes, random weights) is repaired with the clean-data QP
direction of the class it predicts least (α = 1, quantile 0.99; the statistics from 256 random images) and timed at batch 1 and
256. Both forwards run side by side in one process, in interleaved blocks of calls (``--calls`` at batch 1,
one at batch 256; the order alternates every block) so that load from other processes hits both alike. Each
ratio is the median over blocks of the per-block ratio, of wall time and of the process's CPU time (which
moves less when other processes share the cores); the times are per-call medians.

Rows: the default (gated rule, neutral gate, penultimate layer) on clean-looking inputs — the gate mostly
closed, as for clean traffic — and with every gate forced open (worst case, as for a stream of triggered
inputs); the paper's constant rule; and the gated rule at the output of ``layer4`` (an intermediate layer:
one unrepaired pass, further passes only for rows whose gate may open).

    python benchmarks/fire_latency.py [--reps 100] [--calls 20] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from latentguard.data import Images
from latentguard.defenses.fire import RepairedModel, repair
from latentguard.models import build_model


def timed(fn, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call, over a block of ``calls`` calls."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - w0) / calls, (time.process_time() - c0) / calls


def compare(base, repaired, x: torch.Tensor, reps: int, calls: int, warmup: int = 5) -> dict[str, float]:
    """Median per-call wall/CPU milliseconds of both over ``reps`` interleaved blocks, and the median of the
    per-block ratios (repaired / undefended)."""
    for _ in range(warmup):
        base(x)
        repaired(x)
    rows = []
    for r in range(reps):
        if r % 2:
            b, w = timed(base, x, calls), timed(repaired, x, calls)
        else:
            w, b = timed(repaired, x, calls), timed(base, x, calls)
        rows.append((b[0], w[0], b[1], w[1]))
    med = [statistics.median(v) * 1e3 for v in zip(*rows, strict=True)]
    return {
        "base_wall": med[0], "rep_wall": med[1], "base_cpu": med[2], "rep_cpu": med[3],
        "ratio_wall": statistics.median(r[1] / r[0] for r in rows),
        "ratio_cpu": statistics.median(r[3] / r[2] for r in rows if r[2] > 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100, help="interleaved blocks per row (batch 256: a fifth)")
    ap.add_argument("--calls", type=int, default=20, help="calls per block at batch 1 (batch 256: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, width=16).eval()
    rng = np.random.default_rng(0)
    clean = Images(rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), np.arange(256) % 10,
                   [str(i) for i in range(10)])
    with torch.no_grad():  # a class the random model rarely predicts, so that its flip direction is not zero
        target = int(torch.bincount(model(clean.tensors()[0]).argmax(1), minlength=10).argmin())
    gated = repair(model, clean, target=target, alpha=1.0, quantile=0.99, device="cpu")
    constant = repair(model, clean, target=target, rule="constant", alpha=1.0, device="cpu")
    layer4 = repair(model, clean, target=target, layer="layer4", alpha=1.0, quantile=0.99, device="cpu")
    state = gated.state()  # the same repair with every threshold at -1e9: every gate open, the worst case
    opened = RepairedModel(model, layers=state["layers"], directions={"penultimate": state["beta.0"]},
                           alphas={"penultimate": 1.0}, head=state["head"],
                           thresholds={"penultimate": torch.full_like(state["thresholds.0"], -1e9)},
                           proj_mean={"penultimate": state["proj_mean.0"]},
                           proj_std={"penultimate": state["proj_std.0"]}, proj_ref={"penultimate": state["proj_ref.0"]},
                           targets=state["targets"], per_source=gated.per_source,
                           source_directions=state.get("source_beta"),
                           source_thresholds=(torch.full_like(state["source_thresholds"], -1e9)
                                              if gated.per_source else None),
                           flag_thresholds=(torch.full_like(state["flag_thresholds"], -1e9)
                                            if gated.per_source else None))
    print(f"default repair: per-source stage {'on' if gated.per_source else 'off'}")

    rows = [
        ("gated (default), penultimate, clean inputs", gated),
        ("gated, penultimate, every gate open", opened),
        ("constant (paper), penultimate", constant),
        ("gated, layer4 output, clean inputs", layer4),
    ]
    gen = torch.Generator().manual_seed(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| repair | batch | undefended ms (wall / CPU) | repaired ms (wall / CPU) | ratio wall | ratio CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for batch in (1, 256):
            x = torch.rand(batch, 3, 32, 32, generator=gen)
            reps = args.reps if batch == 1 else max(10, args.reps // 5)
            calls = args.calls if batch == 1 else 1
            for label, wrapper in rows:
                m = compare(model, wrapper, x, reps, calls)
                print(f"| {label} | {batch} | {m['base_wall']:.2f} / {m['base_cpu']:.2f} | "
                      f"{m['rep_wall']:.2f} / {m['rep_cpu']:.2f} | {m['ratio_wall']:.3f} | {m['ratio_cpu']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
