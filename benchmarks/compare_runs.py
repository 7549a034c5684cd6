"""Side-by-side table of one defense across several result directories of ``latentguard bench``.

Each run is ``LABEL=DIR`` (a directory holding ``results.jsonl``); rows are the (dataset, attack) cells any run
has, columns the runs' ACC / ASR after the defense, with the undefended figures and the goal check
(ASR ≤ ``--max-asr`` and ACC drop ≤ ``--max-drop`` points). With ``--target-class`` a cell also gives the
target class's own ACC (rows that recorded per-class ACC), where a removal's cost tends to fall.

    python benchmarks/compare_runs.py --defense fire --runs "tolerance 0.02=benchmarks/results/main" \\
        --runs "tolerance 0.01=benchmarks/results/fire_tolerance_1pt" --out benchmarks/fire_tolerance.md \\
        --title "FIRE: clean-accuracy tolerance" --max-asr 0.05 --max-drop 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run_dir: Path, defense: str) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("defense") == defense:
                rows[(r["dataset"], r["attack"])] = r
    return rows


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def target_acc(row: dict, key: str) -> str:
    """``; target class X`` with the target class's ACC in %, or nothing when the row lacks per-class ACC."""
    per_class, target = row.get(key), row.get("target")
    if not per_class or target is None:
        return ""
    return f"; target class {pct(per_class[target])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defense", required=True)
    ap.add_argument("--runs", action="append", required=True, help="LABEL=DIR, repeatable")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--note", default="", help="a paragraph under the title")
    ap.add_argument("--max-asr", type=float, default=0.05)
    ap.add_argument("--max-drop", type=float, default=1.0, help="ACC points")
    ap.add_argument("--target-class", action="store_true", help="also show the target class's ACC")
    args = ap.parse_args()
    runs = []
    for item in args.runs:
        label, _, path = item.partition("=")
        runs.append((label, load(Path(path), args.defense)))
    cells = sorted({c for _, rows in runs for c in rows})
    head = "| dataset | attack | undefended ACC / ASR | " + " | ".join(f"{label}: ACC / ASR (goal?)" for label, _ in runs) + " |"
    lines = [f"# {args.title or args.defense}", "", args.note, "",
             f"ACC / ASR % after `{args.defense}`; goal: ASR ≤ {100 * args.max_asr:g} % with at most "
             f"{args.max_drop:g} point(s) of ACC lost. Produced by `python benchmarks/compare_runs.py` from "
             + ", ".join(f"`{item.partition('=')[2]}`" for item in args.runs) + ".", "",
             head, "|---" * (3 + len(runs)) + "|"]
    met = {label: 0 for label, _ in runs}
    for cell in cells:
        base = next(rows[cell] for _, rows in runs if cell in rows)
        row = f"| {cell[0]} | {cell[1]} | {pct(base.get('acc_before'))} / {pct(base.get('asr_before'))}"
        row += (target_acc(base, "class_acc_before") if args.target_class else "") + " |"
        for label, rows in runs:
            r = rows.get(cell)
            if r is None:
                row += " – |"
                continue
            ok = ""
            if r.get("asr") is not None:
                good = r["asr"] <= args.max_asr and 100 * (r["acc_before"] - r["acc"]) <= args.max_drop + 1e-9
                met[label] += good
                ok = " (yes)" if good else " (no)"
            row += f" {pct(r.get('acc'))} / {pct(r.get('asr'))}{ok}"
            row += (target_acc(r, "class_acc") if args.target_class else "") + " |"
        lines.append(row)
    lines += ["", "Cells meeting the goal: " + ", ".join(f"{label} {n}" for label, n in met.items()) + "."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
