"""TAC removal, then FIRE on the fine-tuned model: does the run-time shift take what removal leaves?

``benchmarks/tac_residual.md`` found that, where TAC removal misses its goal, the remaining ASR is a uniform
leftover push toward the target p that flips the images already near p. FIRE's gated shift removes exactly an
input's excess along a direction toward p, so the two compose: fine-tune the weights away from the backdoor
(TAC removal, its defaults), then wrap the fine-tuned model in FIRE, with p taken from TAC's detection on the
undefended model (after removal p need no longer be an outlier) and α / quantile chosen on the clean reserve
as always. Rows, per zoo cell where TAC removal misses its goal (by default): undefended, TAC removal, FIRE on the undefended model, and the
two in sequence; ACC / ASR / RA on the whole test set. The clean reserve is all the defender uses; test images
only measure.

The table is regenerated from ``OUT.jsonl`` on every run (cells already there are skipped); the findings
paragraph under it in ``benchmarks/tac_then_fire.md`` is written by hand.

    python benchmarks/tac_then_fire.py --data-root DIR [--cells cifar10/badnets,...] [--out benchmarks/tac_then_fire.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from latentguard.attacks import load_attack
from latentguard.data import load_data
from latentguard.defenses import make_defense
from latentguard.evaluation import evaluate
from latentguard.models import load_model
from latentguard.zoo import cell_dir, cell_reserve, data_spec_for, default_zoo_root

#: the flagged cells where TAC removal misses its goal (ASR ≤ 3 % within 2 points of ACC)
MISSES = "cifar10/badnets,cifar10/trojannn,gtsrb/trojannn,cifar10/inputaware"
STEPS = ("undefended", "tac", "fire", "tac+fire")


def run_cell(zoo: Path, dataset: str, attack: str, data_root: str, device: str) -> list[dict]:
    cell = cell_dir(zoo, dataset, attack)
    splits = load_data(data_spec_for(dataset, data_root))
    reserve = cell_reserve(cell, splits.train)
    model = load_model(str(cell / "model.json")).eval()
    bd = load_attack(cell / "attack.json").get_backdoor_test_set(splits.test)
    rows = []

    def row(step: str, net: torch.nn.Module, seconds: float, **extra) -> None:
        ev = evaluate(net, splits.test, backdoor_set=bd, device=device)
        rows.append({"dataset": dataset, "attack": attack, "step": step, "acc": ev.acc, "asr": ev.asr, "ra": ev.ra,
                     "seconds": seconds, **extra})
        print(json.dumps(rows[-1]), flush=True)

    row("undefended", model, 0.0)
    removed = make_defense("tac").run(model, reserve, device=device)
    targets = list(removed.detection.target_classes) if removed.detection else []
    row("tac", removed.model, removed.seconds, targets=targets)
    if not targets:
        return rows
    fire = make_defense("fire", target=targets).run(model, reserve, device=device)
    row("fire", fire.model, fire.seconds, alpha=fire.extra.get("alphas"), quantile=fire.extra.get("quantile"))
    t0 = time.perf_counter()
    both = make_defense("fire", target=targets).run(removed.model, reserve, device=device)
    row("tac+fire", both.model, removed.seconds + time.perf_counter() - t0, alpha=both.extra.get("alphas"),
        quantile=both.extra.get("quantile"))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| cell | " + " | ".join(f"{s} ACC / ASR / RA %" for s in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]
    cells = dict.fromkeys((r["dataset"], r["attack"]) for r in rows)
    for d, a in cells:
        got = {r["step"]: r for r in rows if (r["dataset"], r["attack"]) == (d, a)}
        fmt = lambda r: "–" if r is None else f"{100 * r['acc']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f}"  # noqa: E731
        lines.append(f"| {d} {a} | " + " | ".join(fmt(got.get(s)) for s in STEPS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--cells", default=MISSES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_then_fire.md"))
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    store = args.out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in store.read_text().splitlines() if line.strip()] if store.is_file() else []
    for spec in args.cells.split(","):
        dataset, attack = spec.split("/")
        if any((r["dataset"], r["attack"]) == (dataset, attack) for r in rows):
            continue  # resumable: a cell is appended once all its steps are measured
        new = run_cell(zoo, dataset, attack, args.data_root, args.device)
        with open(store, "a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in new)
        rows += new
    head = ("# TAC removal, then FIRE\n\nProduced by `python benchmarks/tac_then_fire.py --data-root DATA` (defaults "
            f"throughout; see the script's docstring) on {os.cpu_count()} CPU cores, {platform.machine()}, torch "
            f"{torch.__version__}. FIRE's target is the class TAC flagged on the undefended model.\n\n")
    args.out.write_text(head + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
