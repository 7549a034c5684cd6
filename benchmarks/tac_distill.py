"""TAC removal with a distillation term on the classes not flagged, on development builds and then on the zoo.

Reads ``latentguard bench`` result directories under ``benchmarks/results/tac_distill/`` (one per model build and
setting, named ``{model}_{setting}``; the head-shift defaults' runs of ``tac_head_shift.md`` are read where they
are) and writes ``tac_distill.md``: the development table (ACC, ASR, target class ACC, others' mean Δ per setting and
build) and the zoo table, this version's defaults beside the previous ones. The BadNets and Blend seed-1 builds are
where λ was judged, TrojanNN seed 1 (target named) widens it, BadNets and Blend seed 2 are the checks. The
hand-written reading below the tables is kept when they are redrawn.

    python benchmarks/tac_distill.py [--results DIR] [--out benchmarks/tac_distill.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from markdown_out import write_keeping_reading
from tac_head_shift import table, zoo_cell

MODELS = {  # directory prefix: (label, how it was built)
    "badnets_s1": ("BadNets seed 1", "`zoo build --attacks badnets --seed 1`"),
    "blend_s1": ("Blend seed 1", "`zoo build --attacks blend --seed 1`"),
    "trojannn_s1": ("TrojanNN seed 1, target given", "`zoo build --attacks trojannn --seed 1`; detection misses it, "
                    "so these runs name the target (`targets: [0]`) and no noise term runs"),
    "trojannn_s1_t21": ("TrojanNN seed 1, α 2.1", "the same build, judged at α = 2.1 (clean index 3.80, probe "
                        "index 2.17: only class 0 is flagged) so that the noise term can be switched on; not a default"),
    "badnets_s2": ("BadNets seed 2 (check)", "`zoo build --attacks badnets --seed 2`"),
    "blend_s2": ("Blend seed 2 (check)", "`zoo build --attacks blend --seed 2 --skip-clean`"),
    "trojannn_s2": ("TrojanNN seed 2 (check, built after the choice)",
                    "`zoo build --attacks trojannn --seed 2` (with its clean seed-2 model, which TAC does not flag: "
                    "`clean_s2_detect`); detection names its target (clean verdict 4.17), the probe does not"),
}
SETTINGS = {  # directory suffix: (label, parameters as given to bench)
    "kd0": ("λ 0: the previous defaults (head shift, noise term)", '{"tac": {"distill": 0}}'),
    "kd03": ("distill λ 0.3", '{"tac": {"distill": 0.3}}'),
    "kd1": ("distill λ 1", '{"tac": {"distill": 1}}'),
    "kd3": ("distill λ 3", '{"tac": {"distill": 3}}'),
    "refuse": ("noise_loss refuse, λ 0", '{"tac": {"noise_loss": "refuse", "distill": 0}}'),
    "refuse_kd1": ("noise_loss refuse, λ 1", '{"tac": {"noise_loss": "refuse", "distill": 1}}'),
    "paper": ("the paper's removal", '{"tac": {"beta": 1, "head_shift": 0, "distill": 0}}'),
    "hs1": ("λ 1, head_shift 1.0", '{"tac": {"head_shift": 1.0}}'),
    "b1": ("λ 1 with the s_p term (β 1)", '{"tac": {"beta": 1}}'),
    "deep": ("λ 1 with deep TAC at layer4.0", '{"tac": {"deep_layer": "layer4.0"}}'),
    "noise": ("λ 1, noise term on", '{"tac": {"threshold": 2.1, "noise_unlearn": "always"}}'),
    "nonoise": ("λ 1, noise term off", '{"tac": {"threshold": 2.1, "noise_unlearn": "never"}}'),
}
# the previous defaults' runs, measured for tac_head_shift.md with the same builds and code path (λ 0 adds nothing)
EARLIER = {("badnets_s1", "kd0"): "tac_head_shift/badnets_s1_hs_tgt05_b0",
           ("blend_s1", "kd0"): "tac_head_shift/blend_s1_ns05",
           ("trojannn_s1", "kd0"): "tac_head_shift/trojannn_s1_hs_tgt05_b0",
           ("badnets_s2", "kd0"): "tac_head_shift/badnets_s2_hs_tgt05_b0"}


def zoo_table(new: Path, previous: list[Path], new_label: str = "λ = 1 (new defaults)") -> str:
    """The zoo models: the previous defaults (e.g. the head-shift zoo run, its noise-term cells judged again at
    σ × 0.5; later directories override earlier cells) beside this version's defaults (one bench directory, or one
    per cell), whose column is headed ``new_label``."""
    def rows(paths: list[Path]) -> dict:
        out: dict = {}
        for path in paths:
            files = [path / "results.jsonl"] if (path / "results.jsonl").is_file() else sorted(path.glob("*/results.jsonl"))
            for f in files:
                out.update({(r["dataset"], r["attack"]): r for r in map(json.loads, f.read_text().splitlines())})
        return out

    ours, theirs = rows([new]), rows(previous)
    lines = [f"| dataset | attack | undefended | flagged | previous defaults | drop | {new_label} | drop | "
             "target class (previous → new) | removal seconds (previous → new) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    for key in sorted(ours, key=lambda k: (k[0], k[1] != "clean", k[1])):
        r, q = ours[key], theirs.get(key)
        asr = "–" if r["asr_before"] is None else f"{100 * r['asr_before']:.1f}"
        t = r.get("target")
        flagged = ", ".join(map(str, r.get("flagged") or [])) or "none"
        target = "–" if t is None or q is None or not flagged[0].isdigit() else (
            f"{100 * q['class_acc'][t]:.1f} → {100 * r['class_acc'][t]:.1f} (was {100 * r['class_acc_before'][t]:.1f})")
        seconds = "–" if q is None else f"{q['seconds']:.0f} → {r['seconds']:.0f}"
        lines.append(f"| {key[0]} | {key[1]} | {100 * r['acc_before']:.1f} / {asr} | {flagged} | "
                     f"{zoo_cell(q if flagged != 'none' else None)} | {zoo_cell(r)} | {target} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/tac_distill"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_distill.md"))
    ap.add_argument("--zoo", type=Path, default=Path("benchmarks/results/tac_distill_zoo"),
                    help="bench directory (or directories, one per cell) of the zoo run with the new defaults")
    ap.add_argument("--zoo-previous", type=Path, nargs="+",
                    default=[Path("benchmarks/results/tac_head_shift_zoo"),
                             Path("benchmarks/results/tac_head_shift_zoo_noise_scale")],
                    help="bench directories of the previous defaults, later ones overriding earlier cells")
    args = ap.parse_args()
    builds = "; ".join(f"{label}: {how}" for label, how in MODELS.values())
    params = "; ".join(f"{label}: `{p}`" for label, p in SETTINGS.values())
    text = [
        "# TAC removal with distillation on the classes not flagged (CIFAR-10 development builds, then the zoo)",
        "",
        "Produced by `python benchmarks/tac_distill.py` from `benchmarks/results/tac_distill/`. Models (the zoo's "
        f"defaults otherwise; not the zoo's models): {builds}. Each cell is one `latentguard bench --defenses tac` "
        "run with TAC's detection, 1 CPU thread; every setting keeps the head shift and the noise term of the "
        "previous defaults (`tac_head_shift.md`), whose own runs fill the λ 0 row. % after removal; \"others' Δ\" is "
        "the mean change of the other classes' ACC in points; (goal): ASR ≤ 3 % with at most 2 points of ACC lost. "
        f"Settings (parameters as given to `bench --params`): {params}.",
        "",
        table(args.results, MODELS, SETTINGS, EARLIER),
        "",
        "## On the zoo, after the choice",
        "",
        "Every zoo model this machine holds (`benchmarks/zoo.md`), judged once with this version's defaults "
        "(`latentguard bench --datasets D --attacks A --defenses tac`, `benchmarks/results/tac_distill_zoo/`) beside "
        "the previous defaults' run (`tac_head_shift.md`, same detection, same code path: λ 0 adds no term). ACC / "
        "ASR %; drop in ACC points; (goal) as above. Removal seconds come from different runs on a shared machine: "
        "read them as a rough ratio (the teacher's forward pass).",
        "",
        zoo_table(args.zoo, args.zoo_previous),
        "",
    ]
    print(write_keeping_reading(args.out, "\n".join(text)))


if __name__ == "__main__":
    main()
