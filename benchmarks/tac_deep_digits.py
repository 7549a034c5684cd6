"""Fourth development set, for deep TAC removal: does unlearning a universal flip below the head help, and where?

TAC removal unlearns the head-input shift s_p; on the zoo's patch triggers it leaves 8.5–9.5 % ASR because the
trigger's change is not one latent direction (``tac_residual.md``). ``TAC(deep_layer=ℓ)`` also unlearns δ_p, the
smallest universal shift of layer ℓ's output found that sends ``deep_flip_rate`` of the reserve to p
(``latentguard.defenses.deep_flip``). This script compares, on development models never used elsewhere (small_cnn
on the embedded digits, 30 epochs, width 32, lr 0.05, target 0, 10 % poisoning; seeds 60–62 of BadNets, Blend and
WaNet), removal with the target given (detection is not the subject here) and a 130-image reserve (10 %,
class-balanced): without the deep term, and with it at ``block3`` (the last conv stage, two layers below the
latent) or ``block2``, at flip rates 0.9 and 0.5. Records are appended to a JSONL cache, so a rerun resumes.

    python benchmarks/tac_deep_digits.py [--cache DIR] [--out benchmarks/tac_deep_digits.md] [--threads 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from digits_dev import PAPER_REMOVAL, removal_study_main, run_removals

ATTACKS = (("badnets", {}), ("blend", {}), ("wanet", {"s": 3.0}))
SEEDS = (60, 61, 62)
RESERVE = 0.1
CONFIGS = {  # label: TAC parameters (besides targets=[0])
    "s_p only (the paper's removal)": PAPER_REMOVAL,
    "deep block3, flip 0.9": {**PAPER_REMOVAL, "deep_layer": "block3"},
    "deep block3, flip 0.5": {**PAPER_REMOVAL, "deep_layer": "block3", "deep_flip_rate": 0.5},
    "deep block2, flip 0.9": {**PAPER_REMOVAL, "deep_layer": "block2"},
}


def run(cache: Path, threads: int) -> list[dict]:
    return run_removals(cache, ATTACKS, SEEDS, CONFIGS, reserve=RESERVE, threads=threads,
                        extra=lambda res: {"deep": res.extra.get("deep")})


def table(records: list[dict]) -> str:
    lines = ["| attack | undefended ACC / ASR | " + " | ".join(CONFIGS) + " |",
             "|---|---|" + "---|" * len(CONFIGS)]
    for attack, _ in ATTACKS:
        rows = [r for r in records if r["attack"] == attack]
        first = [r for r in rows if r["config"] == next(iter(CONFIGS))]
        cells = [f"{100 * np.mean([r['acc_before'] for r in first]):.1f} / "
                 f"{100 * np.mean([r['asr_before'] for r in first]):.1f}"]
        for label in CONFIGS:
            sub = [r for r in rows if r["config"] == label]
            per_seed = ", ".join(f"{100 * r['acc']:.0f}/{100 * r['asr']:.0f}" for r in sorted(sub, key=lambda r: r["seed"]))
            cells.append(f"{100 * np.mean([r['acc'] for r in sub]):.1f} / {100 * np.mean([r['asr'] for r in sub]):.1f}"
                         f" ({per_seed})")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    removal_study_main(
        __doc__, "tac_deep_digits", "Deep TAC removal on digits development models",
        "Produced by `python benchmarks/tac_deep_digits.py` (see its docstring: small_cnn, 30 epochs, seeds 60–62, "
        "target 0 given, 130-image reserve, 1 CPU thread). Cells: mean ACC / ASR % after removal over the three "
        "seeds, then per seed ACC/ASR.",
        CONFIGS, run, table)


if __name__ == "__main__":
    main()
