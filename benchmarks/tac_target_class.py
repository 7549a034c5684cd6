"""Where TAC removal's accuracy cost falls, and whether it can be kept off the target class (CIFAR-10 BadNets).

Reads the ``latentguard bench`` result directories under ``benchmarks/results/tac_target_class/`` (one per
model build and TAC setting, named ``seed{N}_{setting}``) and writes the table of ``tac_target_class.md``: ACC,
ASR, the target class's ACC and the other classes' mean ACC change, per setting and build. Seed 1 is the
development build the settings were judged on; seed 2 is the check. The hand-written reading below the table is
kept when the table is redrawn.

    python benchmarks/tac_target_class.py [--results DIR] [--out benchmarks/tac_target_class.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from markdown_out import write_keeping_reading

SETTINGS = {  # directory suffix: (label, TAC parameters as given to bench)
    "tw1": ("defaults", "{}"),
    "tw2": ("target_weight 2", '{"target_weight": 2}'),
    "tw4": ("target_weight 4", '{"target_weight": 4}'),
    "anchor": ("target_anchor", '{"target_anchor": true}'),
    "deep_tw1": ("deep layer4.0", '{"deep_layer": "layer4.0"}'),
    "deep_b03": ("deep, deep_beta 0.3", '{"deep_layer": "layer4.0", "deep_beta": 0.3}'),
    "deep_b01": ("deep, deep_beta 0.1", '{"deep_layer": "layer4.0", "deep_beta": 0.1}'),
    "deep_tw3": ("deep, target_weight 3", '{"deep_layer": "layer4.0", "target_weight": 3}'),
    "tune_l4": ("layer4 + head tuned", '{"tune_layers": ["layer4"]}'),
    "tune_head": ("head alone tuned", '{"tune_layers": []}'),
    "tune_l4_deep": ("layer4 + head tuned, deep", '{"tune_layers": ["layer4"], "deep_layer": "layer4.0"}'),
}
SEEDS = (1, 2)


def row_of(results: Path, seed: int, key: str) -> dict | None:
    path = results / f"seed{seed}_{key}" / "results.jsonl"
    if not path.is_file():
        return None
    return next(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def cells(r: dict | None) -> str:
    if r is None:
        return "– | – | – | – |"
    t = r["target"]
    others = [a - b for c, (a, b) in enumerate(zip(r["class_acc"], r["class_acc_before"], strict=True)) if c != t]
    goal = r["asr"] <= 0.03 and 100 * (r["acc_before"] - r["acc"]) <= 2 + 1e-9
    return (f"{100 * r['acc']:.1f} | {100 * r['asr']:.1f}{' (goal)' if goal else ''} | "
            f"{100 * r['class_acc'][t]:.1f} | {100 * sum(others) / len(others):+.1f} |")


def table(results: Path) -> str:
    head = "| setting | " + " | ".join(f"seed {s}: ACC | ASR | target class ACC | others' Δ" for s in SEEDS) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(SEEDS)]
    first = {s: row_of(results, s, "tw1") for s in SEEDS}
    base = ["– | – | – | – |" if r is None else f"{100 * r['acc_before']:.1f} | {100 * r['asr_before']:.1f} | "
            f"{100 * r['class_acc_before'][r['target']]:.1f} | |" for r in first.values()]
    lines.append("| undefended | " + " ".join(base))
    for key, (label, _) in SETTINGS.items():
        lines.append(f"| {label} | " + " ".join(cells(row_of(results, s, key)) for s in SEEDS))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/tac_target_class"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_target_class.md"))
    args = ap.parse_args()
    params = "; ".join(f"{label}: `{p}`" for label, p in SETTINGS.values())
    text = [
        "# TAC removal and the target class (CIFAR-10 BadNets, two new builds)",
        "",
        "Produced by `python benchmarks/tac_target_class.py` from `benchmarks/results/tac_target_class/`. Models: "
        "CIFAR-10 BadNets built with `latentguard zoo build --seed 1` and `--seed 2` (the zoo's defaults otherwise; "
        "not the zoo's models). Each cell is one `latentguard bench` run of TAC with its detection (class 0 "
        "flagged alone in every run), 1 CPU thread. % after removal; \"others' Δ\" is the mean change of the nine "
        "other classes' ACC in points; (goal): ASR ≤ 3 % with at most 2 points of ACC lost. Measured before the "
        "head shift became TAC's default (`tac_head_shift.md`): every setting ran on the paper's removal (β = 1, "
        "no head shift), which `{}` meant then; to rerun one now, add `\"beta\": 1, \"head_shift\": 0`. Settings "
        f"(TAC parameters): {params}.",
        "",
        table(args.results),
        "",
    ]
    print(write_keeping_reading(args.out, "\n".join(text)))


if __name__ == "__main__":
    main()
