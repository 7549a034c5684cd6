"""Fifth development set, for the target class's accuracy under TAC removal: can removal spare it?

On the CIFAR-10 BadNets zoo model TAC's removal costs the target class 7.2 points and the others 1.9 on average
(``tac_deep.md``): the unlearning term teaches the head to refuse s_p, a shift toward p that clean images of p
use too. Three remedies are compared here, on development models never used elsewhere (small_cnn on the embedded
digits, 30 epochs, lr 0.05, target 0, 10 % poisoning; seeds 70–72 of BadNets, Blend and WaNet), with the target
given and a 130-image reserve (10 %, class-balanced):

- ``target_weight`` w: the clean CE of reserve images of the flagged class weighs w instead of 1;
- ``spare_class_mean``: unlearn s_p without its component along μ_p − μ_¬p, the offset of the clean class-p
  latents' mean from the other classes' mean;
- ``target_anchor``: also fit the flagged class's own images with s_p taken out of their latents to p.

Each record keeps ACC, ASR and the per-class ACC, so the table shows the target class's ACC beside the others'
mean. Records are appended to a JSONL cache, so a rerun resumes.

    python benchmarks/tac_protect_digits.py [--cache DIR] [--out benchmarks/tac_protect_digits.md] [--threads 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from digits_dev import PAPER_REMOVAL, removal_study_main, run_removals

ATTACKS = (("badnets", {}), ("blend", {}), ("wanet", {"s": 3.0}))
SEEDS = (70, 71, 72)
RESERVE = 0.1
TARGET = 0
CONFIGS = {  # label: TAC parameters (besides targets=[0])
    "paper's removal": PAPER_REMOVAL,
    "target_weight 2": {**PAPER_REMOVAL, "target_weight": 2.0},
    "target_weight 4": {**PAPER_REMOVAL, "target_weight": 4.0},
    "spare_class_mean": {**PAPER_REMOVAL, "spare_class_mean": True},
    "spare + weight 2": {**PAPER_REMOVAL, "spare_class_mean": True, "target_weight": 2.0},
    "target_anchor": {**PAPER_REMOVAL, "target_anchor": True},
    "head_shift 0.5, target row, β 0 (the default now)": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0.0,
                                                          "distill": 0.0},
}


def run(cache: Path, threads: int) -> list[dict]:
    return run_removals(cache, ATTACKS, SEEDS, CONFIGS, reserve=RESERVE, threads=threads)


def _target_and_rest(class_acc: list[float]) -> tuple[float, float]:
    rest = [a for c, a in enumerate(class_acc) if c != TARGET]
    return class_acc[TARGET], float(np.mean(rest))


def table(records: list[dict]) -> str:
    head = "| attack | config | ACC | ASR | target-class ACC | other classes' ACC | per seed ACC/ASR/target |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for attack, _ in ATTACKS:
        rows = [r for r in records if r["attack"] == attack]
        first = sorted((r for r in rows if r["config"] == "paper's removal"), key=lambda r: r["seed"])
        own, rest = zip(*(_target_and_rest(r["class_acc_before"]) for r in first), strict=True)
        lines.append(f"| {attack} | undefended | {100 * np.mean([r['acc_before'] for r in first]):.1f} | "
                     f"{100 * np.mean([r['asr_before'] for r in first]):.1f} | {100 * np.mean(own):.1f} | "
                     f"{100 * np.mean(rest):.1f} | |")
        for label in CONFIGS:
            sub = sorted((r for r in rows if r["config"] == label), key=lambda r: r["seed"])
            own, rest = zip(*(_target_and_rest(r["class_acc"]) for r in sub), strict=True)
            per_seed = ", ".join(f"{100 * r['acc']:.0f}/{100 * r['asr']:.0f}/{100 * r['class_acc'][TARGET]:.0f}"
                                 for r in sub)
            lines.append(f"| | {label} | {100 * np.mean([r['acc'] for r in sub]):.1f} | "
                         f"{100 * np.mean([r['asr'] for r in sub]):.1f} | {100 * np.mean(own):.1f} | "
                         f"{100 * np.mean(rest):.1f} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    removal_study_main(
        __doc__, "tac_protect_digits", "Sparing the target class in TAC removal: digits development models",
        "Produced by `python benchmarks/tac_protect_digits.py` (see its docstring: small_cnn, 30 epochs, seeds 70–72, "
        "target 0 given, 130-image reserve, 1 CPU thread). Means over the three seeds, in %; the last column gives "
        "each seed's ACC / ASR / target-class ACC.",
        CONFIGS, run, table)


if __name__ == "__main__":
    main()
