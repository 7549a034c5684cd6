"""TAC removal with a feature shift of the flagged class's head row, on development builds (CIFAR-10).

Reads ``latentguard bench`` result directories under ``benchmarks/results/tac_head_shift/`` (one per model build
and setting, named ``{model}_{setting}``) and writes the table of ``tac_head_shift.md``: ACC, ASR, the target
class's ACC and the other classes' mean ACC change, per setting and build. The BadNets seed-1 build is where the
settings were judged, the Blend and TrojanNN seed-1 builds widen that choice, BadNets seed 2 is the check. The
defaults' rows of the BadNets and TrojanNN builds are the runs of ``tac_target_class.md`` and ``tac_deep.md``. The hand-written reading below
the table is kept when the table is redrawn.

    python benchmarks/tac_head_shift.py [--results DIR] [--out benchmarks/tac_head_shift.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from markdown_out import write_keeping_reading
from tac_target_class import cells

MODELS = {  # directory prefix: (label, how it was built)
    "badnets_s1": ("BadNets seed 1", "`zoo build --attacks badnets --seed 1`"),
    "blend_s1": ("Blend seed 1", "`zoo build --attacks blend --seed 1`"),
    "trojannn_s1": ("TrojanNN seed 1, target given", "`zoo build --attacks trojannn --seed 1`; TAC's detection misses "
                    "it (`tac_deep.md`), so these runs name the target (`targets: [0]`)"),
    "badnets_s2": ("BadNets seed 2 (check)", "`zoo build --attacks badnets --seed 2`"),
}
SETTINGS = {  # directory suffix: (label, parameters as given to bench)
    "defaults": ("the paper's removal (the previous defaults)", '{"tac": {"beta": 1, "head_shift": 0}}'),
    "fst": ("FST alone (α 0.2, every row, no detection)", '{"fst": {}}'),
    "hs_all_b1": ("head_shift 0.2, every row, with the s_p term", '{"tac": {"head_shift": 0.2}}'),
    "hs_tgt_b1": ("head_shift 0.2, target row, with the s_p term",
                  '{"tac": {"head_shift": 0.2, "head_shift_rows": "targets"}}'),
    "hs_all_b0": ("head_shift 0.2, every row, β 0 (FST behind TAC's detection)",
                  '{"tac": {"head_shift": 0.2, "beta": 0}}'),
    "hs_tgt_b0": ("head_shift 0.2, target row, β 0", '{"tac": {"head_shift": 0.2, "head_shift_rows": "targets", "beta": 0}}'),
    "hs_tgt05_b0": ("head_shift 0.5, target row, β 0",
                    '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0}}'),
    "hs_tgt1_b0": ("head_shift 1.0, target row, β 0",
                   '{"tac": {"head_shift": 1.0, "head_shift_rows": "targets", "beta": 0}}'),
    "hs_tgt05_b0_n1": ("head_shift 0.5, target row, β 0, noise_beta 1, noise_scale 1",
                       '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0, "noise_beta": 1, "noise_scale": 1}}'),
    "hs_tgt05_b0_n03": ("head_shift 0.5, target row, β 0, noise_beta 0.3, noise_scale 1",
                        '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0, "noise_beta": 0.3, "noise_scale": 1}}'),
    "hs_tgt05_b0_n01": ("head_shift 0.5, target row, β 0, noise_beta 0.1, noise_scale 1",
                        '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0, "noise_beta": 0.1, "noise_scale": 1}}'),
    "ns05": ("head_shift 0.5, target row, β 0, noise_beta 1, noise_scale 0.5 (the defaults)",
             '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0, "noise_beta": 1, "noise_scale": 0.5}}'),
    "ns025": ("head_shift 0.5, target row, β 0, noise_beta 1, noise_scale 0.25",
              '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets", "beta": 0, "noise_beta": 1, "noise_scale": 0.25}}'),
    "hs_tgt05_b1": ("head_shift 0.5, target row, with the s_p term",
                    '{"tac": {"head_shift": 0.5, "head_shift_rows": "targets"}}'),
}
# runs measured earlier with the same builds and settings, read where they are rather than copied
EARLIER = {("badnets_s1", "defaults"): "tac_target_class/seed1_tw1", ("badnets_s2", "defaults"): "tac_target_class/seed2_tw1",
           ("trojannn_s1", "defaults"): "tac_new_builds/trojannn_seed1_target_given"}


def row_of(results: Path, model: str, setting: str, earlier: dict | None = None) -> dict | None:
    """The first record of ``results/{model}_{setting}``, or of the run ``earlier`` names for that pair."""
    earlier = EARLIER if earlier is None else earlier
    path = results / f"{model}_{setting}" / "results.jsonl"
    if not path.is_file() and (model, setting) in earlier:
        path = results.parent / earlier[model, setting] / "results.jsonl"
    if not path.is_file():
        return None
    row = next(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    if row.get("target") is None:  # every build here poisons class 0; named targets leave the record's field empty
        row["target"] = 0
    return row


def table(results: Path, models: dict | None = None, settings: dict | None = None, earlier: dict | None = None) -> str:
    """One row per setting, four columns per build (ACC, ASR, target class ACC, others' mean Δ); settings with no
    run on any build are left out."""
    models, settings = models or MODELS, settings or SETTINGS
    names = list(models)
    head = "| setting | " + " | ".join(f"{models[m][0]}: ACC | ASR | target class | others' Δ" for m in names) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(names)]
    firsts = [next((r for s in settings if (r := row_of(results, m, s, earlier)) is not None), None) for m in names]
    base = ["– | – | – | – |" if r is None else
            f"{100 * r['acc_before']:.1f} | {100 * r['asr_before']:.1f} | "
            f"{100 * r['class_acc_before'][r['target']]:.1f} | |" for r in firsts]
    lines.append("| undefended | " + " ".join(base))
    for key, (label, _) in settings.items():
        rows = [row_of(results, m, key, earlier) for m in names]
        if all(r is None for r in rows):
            continue
        lines.append(f"| {label} | " + " ".join(cells(r) for r in rows))
    return "\n".join(lines)


def _goal(r: dict) -> bool:
    return r["asr"] is not None and r["asr"] <= 0.03 and 100 * (r["acc_before"] - r["acc"]) <= 2 + 1e-9


def zoo_cell(r: dict | None) -> str:
    """Two zoo-table cells of one removal record: ACC / ASR (goal marked) and the ACC drop in points."""
    if r is None:
        return "– | –"
    asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}"
    return (f"{100 * r['acc']:.1f} / {asr}{' (goal)' if _goal(r) else ''} | "
            f"{round(100 * (r['acc_before'] - r['acc']), 1) + 0.0:.1f}")


def zoo_table(new: Path, paper: Path, rerun: Path | None = None) -> str:
    """The zoo models, the paper's removal beside this version's defaults (one bench directory each). ``rerun``: the
    cells where the noise term ran, judged again once ``noise_scale`` 0.5 became the default (the other cells do
    not run that term, so it does not enter them)."""
    def rows(path: Path) -> dict:
        if not path.is_file():
            return {}
        return {(r["dataset"], r["attack"]): r for r in map(json.loads, path.read_text().splitlines())}

    ours, theirs = rows(new / "results.jsonl"), rows(paper / "results.jsonl")
    first = dict(ours)
    if rerun is not None:
        for d in sorted(rerun.glob("*/results.jsonl")):
            ours.update(rows(d))
    lines = ["| dataset | attack | undefended | flagged | paper's removal | drop | new defaults | drop | target class "
             "(paper → new) | noise σ × 1 |", "|---|---|---|---|---|---|---|---|---|---|"]

    for key in sorted(ours, key=lambda k: (k[0], k[1] != "clean", k[1])):
        r, q = ours[key], theirs.get(key)
        asr = "–" if r["asr_before"] is None else f"{100 * r['asr_before']:.1f}"
        flagged = (r.get("flagged") or [])
        t = r.get("target")
        target = "–" if t is None or q is None else (f"{100 * q['class_acc'][t]:.1f} → {100 * r['class_acc'][t]:.1f} "
                                                    f"(was {100 * r['class_acc_before'][t]:.1f})")
        lines.append(f"| {key[0]} | {key[1]} | {100 * r['acc_before']:.1f} / {asr} | "
                     f"{', '.join(map(str, flagged)) or 'none'} | {zoo_cell(q)} | {zoo_cell(r)} | {target} | "
                     f"{'same' if first[key] is r else zoo_cell(first[key]).replace(' | ', ', drop ')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/tac_head_shift"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_head_shift.md"))
    ap.add_argument("--zoo", type=Path, default=Path("benchmarks/results/tac_head_shift_zoo"),
                    help="bench directory of the zoo run with the new defaults")
    ap.add_argument("--zoo-rerun", type=Path, default=Path("benchmarks/results/tac_head_shift_zoo_noise_scale"),
                    help="bench directories (one per cell) of the cells judged again with noise_scale 0.5")
    ap.add_argument("--zoo-paper", type=Path, default=Path("benchmarks/results/tac_head_shift_zoo_paper"),
                    help="bench directory of the zoo run with the paper's removal")
    args = ap.parse_args()
    builds = "; ".join(f"{label}: {how}" for label, how in MODELS.values())
    params = "; ".join(f"{label}: `{p}`" for label, p in SETTINGS.values())
    text = [
        "# TAC removal with a feature shift of the head (CIFAR-10 development builds)",
        "",
        "Produced by `python benchmarks/tac_head_shift.py` from `benchmarks/results/tac_head_shift/`. Models (the "
        f"zoo's defaults otherwise; not the zoo's models): {builds}. Each cell is one `latentguard bench` run "
        "(`--defenses tac`, or `fst` for FST's row) with TAC's detection, 1 CPU thread. % after removal; \"others' "
        "Δ\" is the mean change of the other classes' ACC in points; (goal): ASR ≤ 3 % with at most 2 points of "
        f"ACC lost. Settings (parameters as given to `bench --params`): {params}.",
        "",
        table(args.results),
        "",
        "## On the zoo, after the choice",
        "",
        "The zoo models this machine holds (`benchmarks/zoo.md`; rebuilt ones where the grid's original is gone), "
        "each judged once with this version's defaults (`latentguard bench --datasets D --attacks A --defenses tac "
        "--out benchmarks/results/tac_head_shift_zoo`) and once with the paper's removal in the same version "
        "(`--params '{\"tac\": {\"beta\": 1, \"head_shift\": 0, \"noise_beta\": null}}'`, "
        "`benchmarks/results/tac_head_shift_zoo_paper`). Detection is the same in both. The first run drew the noise "
        "terms at the probe's σ; where they ran (the probe flagged the target: CIFAR-10 Blend and TrojanNN, GTSRB "
        "Blend) the cell was judged again once `noise_scale` 0.5 became the default "
        "(`benchmarks/results/tac_head_shift_zoo_noise_scale/`), and the last column keeps the first run's figure; "
        "elsewhere that term does not run. ACC / ASR %; drop in ACC points; (goal) as above.",
        "",
        zoo_table(args.zoo, args.zoo_paper, args.zoo_rerun),
        "",
    ]
    print(write_keeping_reading(args.out, "\n".join(text)))


if __name__ == "__main__":
    main()
