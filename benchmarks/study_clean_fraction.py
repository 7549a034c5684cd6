"""Study: how much clean data do the defenses need? TAC, FIRE and plain fine-tuning on zoo models with a
class-balanced share of 0.5 %, 1 %, 2 % and 5 % of the training set as the defender's clean data.

Each share is drawn (seeded, class-balanced) from the zoo cell's 5 % reserve, so it never holds a poisoned
image; 5 % is the whole reserve, i.e. the main grid (``--main``), whose records are reused rather than re-run unless
``--fractions`` lists 0.05 (needed when the zoo model was rebuilt after the grid ran).
Every other share is one ``latentguard bench --clean-fraction F`` grid in ``OUT/f<F>/`` (resumable). The
table and plot go to ``benchmarks/studies/clean_fraction.{md,json,png}``.

    python benchmarks/study_clean_fraction.py --data-root DIR [--cells cifar10/badnets] [--defenses tac,fire,ft]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from latentguard import bench, zoo

HERE = Path(__file__).parent


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def collect(main: Path, out: Path, fractions: list[float], cells: list[tuple[str, str]],
            defenses: list[str]) -> list[dict]:
    """One row per (cell, defense, fraction) found in the grids."""
    wanted = {(d, a) for d, a in cells}
    rows = []
    sources = [(f, out / f"f{f:g}") for f in fractions]
    if 0.05 not in fractions:  # the whole reserve: the main grid's rows, unless this study re-ran that share itself
        sources.append((0.05, main))
    for fraction, folder in sources:
        if not (folder / bench.RESULTS).is_file():
            continue
        for rec in bench.load_results(folder):
            if (rec["dataset"], rec["attack"]) in wanted and rec["defense"] in defenses and "error" not in rec:
                rows.append({"fraction": fraction, **{k: rec.get(k) for k in (
                    "dataset", "attack", "defense", "acc_before", "asr_before", "acc", "asr", "ra", "der", "detected",
                    "flagged", "target", "reserve_size", "seconds")}})
    return sorted(rows, key=lambda r: (r["dataset"], r["attack"], r["defense"], r["fraction"]))


def markdown(rows: list[dict], command: str, five_from_main: bool = True) -> str:
    five = ("The 5 % rows are the main grid (`benchmarks/results/main`)" if five_from_main else
            "The 5 % rows (the whole reserve) were re-run by this study")
    lines = [
        "# Study: clean data available to the defender", "",
        "Each defense gets a class-balanced share of the training set (drawn from the zoo cell's 5 % reserve, "
        "no poisoned image) and its default parameters; ACC on the whole clean test set, ASR on triggered "
        "non-target test images, RA on the same images against their true labels. "
        f"{five}. Machine: {os.cpu_count()} CPU cores ({platform.machine()}); seconds are wall "
        "time of the defense and grow when other jobs share the cores. One zoo model per cell and one seed.", "",
        f"Command: `{command}`", "",
        "| dataset | attack | defense | clean % | images | ACC % | ASR % | RA % | DER | flagged | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flagged = "–" if r["flagged"] is None else ",".join(map(str, r["flagged"])) or "none"
        der = "–" if r["der"] is None else f"{r['der']:.3f}"
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['defense']} | {100 * r['fraction']:g} | "
                     f"{r['reserve_size']} | {_pct(r['acc'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | {der} | "
                     f"{flagged} | {r['seconds']:.0f} |")
    if rows:
        lines += ["", f"Undefended: ACC {_pct(rows[0]['acc_before'])} %, ASR {_pct(rows[0]['asr_before'])} %."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(9, 3.6))
    for (dataset, attack, defense) in sorted({(r["dataset"], r["attack"], r["defense"]) for r in rows}):
        sel = [r for r in rows if (r["dataset"], r["attack"], r["defense"]) == (dataset, attack, defense)]
        x = [100 * r["fraction"] for r in sel]
        label = f"{defense} ({dataset}/{attack})"
        ax_acc.plot(x, [100 * r["acc"] for r in sel], marker="o", label=label)
        ax_asr.plot(x, [100 * r["asr"] for r in sel], marker="o", label=label)
    for ax, name in ((ax_acc, "clean ACC %"), (ax_asr, "ASR %")):
        ax.set_xscale("log")
        ax.set_xlabel("clean data, % of the training set")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_asr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--zoo", default=None)
    parser.add_argument("--cells", default="cifar10/badnets", help="dataset/attack,...")
    parser.add_argument("--defenses", default="tac,fire,ft")
    parser.add_argument("--fractions", default="0.005,0.01,0.02")
    parser.add_argument("--main", default=str(HERE / "results" / "main"))
    parser.add_argument("--out", default=str(HERE / "results" / "clean_fraction"))
    parser.add_argument("--report", default=str(HERE / "studies"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    root = Path(args.zoo) if args.zoo else zoo.default_zoo_root()
    cells = [tuple(c.split("/")) for c in args.cells.split(",") if c]
    defenses = [d for d in args.defenses.split(",") if d]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    out = Path(args.out)
    for fraction in fractions:
        for dataset in sorted({d for d, _ in cells}):
            attacks = [a for d, a in cells if d == dataset]
            bench.run_grid(root, out / f"f{fraction:g}", {dataset: zoo.data_spec_for(dataset, args.data_root)},
                           attacks, defenses, device=args.device, clean_fraction=fraction,
                           log=lambda m: print(m, flush=True))
    rows = collect(Path(args.main), out, fractions, cells, defenses)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    command = (f"python benchmarks/study_clean_fraction.py --data-root DATA --cells {args.cells} "
               f"--defenses {args.defenses} --fractions {args.fractions}")
    (report / "clean_fraction.md").write_text(markdown(rows, command, five_from_main=0.05 not in fractions))
    (report / "clean_fraction.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, report / "clean_fraction.png")
    print((report / "clean_fraction.md").read_text())


if __name__ == "__main__":
    main()
