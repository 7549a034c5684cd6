"""How many optimiser steps TAC's removal needs on a small reserve: digits development models.

TAC's removal defaults (head shift, distillation, 10 epochs, batch 128) were chosen on CIFAR-10 with a 2,500-image
reserve: 20 steps an epoch, 200 in all. A 270-image reserve gives 3 steps an epoch, 30 in all, and on the model
``make demo`` trains the removal left 19 % ASR before ``redraw_others``; with every row redrawn, 30 steps leave
the rows unfit. Would more steps help? 34 and 67 epochs give the fine-tune
about 100 and 200 steps, as many as CIFAR-10's removal takes. Compared here on the digits development models of ``tac_deep_digits.md`` (seeds 60–62)
and ``tac_protect_digits.md`` (seeds 70–72): small_cnn, 30 epochs, BadNets, Blend and WaNet into class 0, 10 %
poisoning; the target given, a class-balanced 20 % reserve (270 images, as in the demo), 1 CPU thread. Records are
appended to a JSONL cache, so a rerun resumes; the models are read from (or trained into) the same cache.

    python benchmarks/tac_min_steps_digits.py [--cache DIR] [--out benchmarks/tac_min_steps_digits.md] [--threads 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from digits_dev import PAPER_REMOVAL, removal_study_main, run_removals

ATTACKS = (("badnets", {}), ("blend", {}), ("wanet", {"s": 3.0}))
SEEDS = (60, 61, 62, 70, 71, 72)
RESERVE = 0.2
CONFIGS = {  # label: TAC parameters (besides targets=[0]); the rest are this version's defaults
    "10 epochs (30 steps), min_steps 0": {"min_steps": 0},
    "34 epochs (102 steps): the defaults (min_steps 100)": {},
    "10 epochs, redraw_others false (the previous defaults)": {"redraw_others": False},
    "34 epochs (102 steps), redraw_others false": {"epochs": 34, "redraw_others": False},
    "67 epochs (201 steps), redraw_others false": {"epochs": 67, "redraw_others": False},
    "10 epochs, distill 0, redraw_others false (two versions ago)": {"distill": 0.0, "redraw_others": False},
    "paper's removal": PAPER_REMOVAL,
}


def run(cache: Path, threads: int) -> list[dict]:
    return run_removals(cache, ATTACKS, SEEDS, CONFIGS, reserve=RESERVE, threads=threads)


def table(records: list[dict]) -> str:
    lines = ["| attack | config | ACC | ASR | ASR ≤ 3 % within 2 points | per seed ACC / ASR |", "|---|---|---|---|---|---|"]
    for attack, _ in ATTACKS:
        rows = [r for r in records if r["attack"] == attack]
        first = [r for r in rows if r["config"] == next(iter(CONFIGS))]
        lines.append(f"| {attack} | undefended | {100 * np.mean([r['acc_before'] for r in first]):.1f} | "
                     f"{100 * np.mean([r['asr_before'] for r in first]):.1f} | | |")
        for label in CONFIGS:
            sub = sorted((r for r in rows if r["config"] == label), key=lambda r: r["seed"])
            goal = sum(r["asr"] <= 0.03 and r["acc_before"] - r["acc"] <= 0.02 for r in sub)
            per_seed = ", ".join(f"{100 * r['acc']:.0f}/{100 * r['asr']:.0f}" for r in sub)
            lines.append(f"| | {label} | {100 * np.mean([r['acc'] for r in sub]):.1f} | "
                         f"{100 * np.mean([r['asr'] for r in sub]):.1f} | {goal} of {len(sub)} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    removal_study_main(
        __doc__, "tac_min_steps_digits", "Steps of TAC's removal on a small reserve: digits development models",
        "Produced by `python benchmarks/tac_min_steps_digits.py` (see its docstring: small_cnn, seeds 60–62 and "
        "70–72, target 0 given, 270-image reserve, 1 CPU thread). Means over the six seeds, in %; the last column "
        "gives each seed's ACC / ASR.",
        CONFIGS, run, table)


if __name__ == "__main__":
    main()
