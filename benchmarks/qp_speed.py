"""Speed of the exact TAC flip QP: active-set LDP (default) against the Cholesky + scipy NNLS reference.

Random heads ``W ~ N(0, 1/d)``, ``b ~ N(0, 0.1²)`` and ReLU-Gaussian latents (``N`` samples); all ``C`` target
classes are solved with ``quantile=1`` (the paper's setting). The reference is run on every class up to
``--reference-limit`` classes and on an evenly spaced subset above that, its total then extrapolated
linearly (marked ``*``); ``--full-reference`` runs it on every class.

    python benchmarks/qp_speed.py [--sizes 10x512,1000x2048] [--n 2000] [--full-reference]

Prints a markdown table (wall and CPU seconds, the active-set's best of ``--repeat`` runs; the max scaled
KKT residual; the max relative difference of the norms of both methods on the classes both solved), then
active-set timings of ``quantile=0.95`` and of the all-to-all pairwise solve (batched and one at a time).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from latentguard.latent import minimal_flip_perturbations, pairwise_flip_perturbations, qp

DEFAULT_SIZES = "10x512,10x2048,43x512,43x2048,200x512,200x2048,1000x512,1000x2048"


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run(
    C: int, d: int, n: int, seed: int, reference_limit: int, reference_classes: int, full: bool, repeat: int
) -> dict:
    Z, W, b = head(C, d, n, seed)
    fast, fw, fc = timed(lambda: minimal_flip_perturbations(Z, W, b, method="active-set"))
    for _ in range(repeat - 1):  # best of `repeat`: the cores may be shared
        _, w, c = timed(lambda: minimal_flip_perturbations(Z, W, b, method="active-set"))
        fw, fc = min(fw, w), min(fc, c)
    if full or C <= reference_limit:
        classes = np.arange(C)
    else:
        classes = np.unique(np.linspace(0, C - 1, reference_classes).round().astype(int))
    ref, rw, rc = timed(lambda: minimal_flip_perturbations(Z, W, b, classes=classes, method="nnls"))
    scale = C / classes.size
    diff = np.max(np.abs(fast.norms[classes] - ref.norms) / np.maximum(ref.norms, 1e-300))
    return {
        "C": C,
        "d": d,
        "fast_wall": fw,
        "fast_cpu": fc,
        "fast_kkt": float(fast.kkt_residual.max()),
        "ref_wall": rw * scale,
        "ref_cpu": rc * scale,
        "ref_kkt": float(ref.kkt_residual.max()),
        "extrapolated": classes.size < C,
        "ref_n": classes.size,
        "diff": float(diff),
        "median_norm": float(np.median(fast.norms)),
    }


def head(C: int, d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((C, d)) / np.sqrt(d)
    b = 0.1 * rng.standard_normal(C)
    Z = np.maximum(rng.standard_normal((n, d)), 0.0)
    return Z, W, b


def options(args: argparse.Namespace) -> None:
    """Active-set timings of the robust quantile and of the all-to-all pairwise solve."""
    if not (args.quantile_sizes or args.pairwise_sizes):
        return
    print()
    print("| option | C | d | wall s | CPU s | QPs |")
    print("|---|---:|---:|---:|---:|---:|")
    for item in filter(None, args.quantile_sizes.split(",")):
        C, d = (int(x) for x in item.lower().split("x"))
        Z, W, b = head(C, d, args.n, args.seed)
        _, w, c = timed(lambda: minimal_flip_perturbations(Z, W, b, quantile=0.95))  # noqa: B023
        print(f"| quantile=0.95 | {C} | {d} | {w:.2f} | {c:.2f} | {C} |", flush=True)
    for item in filter(None, args.pairwise_sizes.split(",")):
        C, d = (int(x) for x in item.lower().split("x"))
        Z, W, b = head(C, d, args.n, args.seed)
        y = np.random.default_rng(args.seed + 1).integers(0, C, size=args.n)
        # the batched driver (default) and the one-at-a-time one, timed back to back on the same problems
        fast, w, c = timed(lambda: pairwise_flip_perturbations(Z, y, W, b))  # noqa: B023
        limit, qp._BATCHED_GRAM_ENTRIES = qp._BATCHED_GRAM_ENTRIES, 0
        try:
            slow, w1, c1 = timed(lambda: pairwise_flip_perturbations(Z, y, W, b))  # noqa: B023
        finally:
            qp._BATCHED_GRAM_ENTRIES = limit
        diff = np.nanmax(np.abs(fast.norms - slow.norms) / slow.norms)
        print(f"| pairwise (labels uniform), batched | {C} | {d} | {w:.2f} | {c:.2f} | {C * (C - 1)} |", flush=True)
        print(f"| pairwise, one at a time (rel. norm diff {diff:.1e}) | {C} | {d} | {w1:.2f} | {c1:.2f} "
              f"| {C * (C - 1)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated CxD pairs")
    parser.add_argument("--n", type=int, default=2000, help="number of latents N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference-limit", type=int, default=200, help="run NNLS on all classes up to this C"
    )
    parser.add_argument("--reference-classes", type=int, default=40, help="NNLS subset size above the limit")
    parser.add_argument("--full-reference", action="store_true", help="run NNLS on every class for every C")
    parser.add_argument("--repeat", type=int, default=3, help="active-set runs per size (best is reported)")
    parser.add_argument("--quantile-sizes", default="200x512,1000x2048", help="CxD pairs timed with q=0.95")
    parser.add_argument("--pairwise-sizes", default="10x512,43x512,100x512", help="CxD pairs timed all-to-all")
    args = parser.parse_args()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load0 = os.getloadavg()
    print(
        f"machine: {cores} CPU cores, {platform.processor() or platform.machine()}, numpy {np.__version__}; "
        f"N = {args.n} latents, seed {args.seed}; load average at start {load0[0]:.1f}"
    )
    print()
    print(
        "| C | d | active-set wall s | active-set CPU s | KKT max | NNLS ref wall s | NNLS ref CPU s "
        "| KKT max | max rel. norm diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for item in args.sizes.split(","):
        C, d = (int(x) for x in item.lower().split("x"))
        r = run(
            C,
            d,
            args.n,
            args.seed,
            args.reference_limit,
            args.reference_classes,
            args.full_reference,
            args.repeat,
        )
        star = f"* ({r['ref_n']} classes)" if r["extrapolated"] else ""
        print(
            f"| {C} | {d} | {r['fast_wall']:.2f} | {r['fast_cpu']:.2f} | {r['fast_kkt']:.1e} "
            f"| {r['ref_wall']:.2f}{star} | {r['ref_cpu']:.2f}{star} | {r['ref_kkt']:.1e} | {r['diff']:.1e} |",
            flush=True,
        )
    options(args)
    print()
    print(
        f"load average at end {os.getloadavg()[0]:.1f}; * = reference timed on a class subset and "
        "extrapolated linearly to all C classes"
    )


if __name__ == "__main__":
    main()
