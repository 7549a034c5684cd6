"""What the distillation term costs in time: TAC's removal with ``distill`` 0 and 1 side by side in one run.

On one zoo model (default: CIFAR-10 BadNets), the target given (no detection), a 2-epoch removal, alternating
λ = 0 and λ = 1 ``--repeats`` times on 1 CPU thread; prints each time and the ratio of the medians. The teacher
adds one forward pass of the given model per batch.

    python benchmarks/tac_distill_cost.py [--zoo DIR] [--data-root DIR] [--cell cifar10/badnets] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from latentguard.defenses import make_defense
from latentguard.zoo import zoo_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "latentguard" / "zoo")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--cell", default="cifar10/badnets")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zm = next(zoo_models(args.zoo, args.data_root, cells=[args.cell]))
    target = zm.spec["target"]
    times: dict[float, list[float]] = {0.0: [], 1.0: []}
    for _ in range(args.repeats):
        for distill in times:
            t0 = time.perf_counter()
            make_defense("tac", targets=[target], epochs=2, distill=distill).run(zm.model, zm.reserve, device="cpu")
            times[distill].append(time.perf_counter() - t0)
    medians = {d: statistics.median(v) for d, v in times.items()}
    print(f"{args.cell}, {len(zm.reserve)}-image reserve, 2 epochs, {args.repeats} alternating runs each: "
          f"λ 0 {', '.join(f'{t:.1f}' for t in times[0.0])} s; λ 1 {', '.join(f'{t:.1f}' for t in times[1.0])} s; "
          f"ratio of medians {medians[1.0] / medians[0.0]:.2f}")


if __name__ == "__main__":
    main()
