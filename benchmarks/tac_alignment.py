"""TAC's alignment verdict: does a class's minimal flip lean on its own mean clean latent? (digits and zoo)

For every model, on its clean reserve: TAC's verdict without the alignment (the previous defaults), the alignment
a_k = ‖s_k‖ / ‖s⊥_k‖ (s⊥_k: the minimal flip kept orthogonal to the class's mean clean latent μ_k;
``latentguard.latent.alignment``) with its MAD anomaly index (log scale, the library's MAD floor), and the
verdict with it. The statistic was found on the first digits development set below and checked, unchanged, on
the second; the zoo was judged once after that.

``--set digits`` uses the digits development models of ``tac_smooth_probe_digits.py`` (seeds 10–15: 6 clean,
6 LF, 6 SIG, 6 SIG Δ40, 3 each of BadNets, Blend, WaNet; found on these) and ``tac_mad_floor.py`` (seeds 40–59:
20 clean, 3 each of BadNets, Blend, WaNet, LF; the check), trained (or read from ``--cache``) by ``digits_dev``.
``--set zoo`` judges every finished cell of ``--zoo`` (default: the latentguard cache), e.g.

    python benchmarks/tac_alignment.py --set digits [--cache DIR] --out benchmarks/results/tac_alignment/digits.jsonl
    python benchmarks/tac_alignment.py --set zoo --data-root DATA [--zoo DIR] --out benchmarks/results/tac_alignment/zoo.jsonl
    python benchmarks/tac_alignment.py --render benchmarks/results/tac_alignment/*.jsonl --md benchmarks/tac_alignment.md

Records are appended as models finish (a re-run skips the models already in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from digits_dev import dev_model
from markdown_out import write_keeping_reading

from latentguard.data import clean_reserve, load_data
from latentguard.defenses.tac import DEFAULT_THRESHOLD, detect
from latentguard.evaluation import evaluate

LEARNED = 0.5  # a backdoored model counts as having learned its backdoor at this test ASR
# (set, label, attack, seeds, attack parameters)
DIGITS = (("found", "clean", "clean", range(10, 16), {}), ("found", "lf", "lf", range(10, 16), {}),
          ("found", "sig Δ40", "sig", range(10, 16), {"delta": 40.0}), ("found", "sig", "sig", range(10, 16), {}),
          ("found", "badnets", "badnets", range(10, 13), {}), ("found", "blend", "blend", range(10, 13), {}),
          ("found", "wanet", "wanet", range(10, 13), {"s": 3.0}),
          ("check", "clean", "clean", range(40, 60), {}), ("check", "badnets", "badnets", range(40, 43), {}),
          ("check", "blend", "blend", range(40, 43), {}), ("check", "wanet", "wanet", range(40, 43), {"s": 3.0}),
          ("check", "lf", "lf", range(40, 43), {}))


def record(model, reserve, **info) -> dict:
    """Both verdicts on one model: without the alignment (previous defaults) and with it."""
    t0 = time.perf_counter()
    before = detect(model, reserve, device="cpu", alignment=False)
    t1 = time.perf_counter()
    after = detect(model, reserve, device="cpu", alignment=True)
    t2 = time.perf_counter()
    return {**info, "previous_flagged": before.target_classes, "previous_scores": before.scores,
            "flagged": after.target_classes, "scores": after.scores, "alignment": after.extra["alignment"],
            "alignment_index": after.extra["alignment_index"], "alignment_scores": after.extra["alignment_scores"],
            "seconds_previous": t1 - t0, "seconds": t2 - t1}


def done(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    return {(r["set"], r["label"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}


def run_digits(cache: Path, out: Path) -> None:
    splits = load_data("digits")
    reserve = splits.train.subset(clean_reserve(splits.train, 0.2, seed=0))
    seen, clean_models = done(out), {}
    for set_name, label, attack_name, seeds, params in DIGITS:
        for seed in seeds:
            stem = label.replace(" ", "_").replace("Δ", "delta")
            model, attack = dev_model(splits, attack_name, seed, params, cache, stem=stem,
                                      clean_model=clean_models.get(seed))
            if attack_name == "clean":
                clean_models[seed] = model
            if (set_name, label, seed) in seen:
                continue
            ev = evaluate(model, splits.test, attack, device="cpu")
            rec = record(model, reserve, set=set_name, label=label, seed=seed, target=None if attack is None else 0,
                         acc=ev.acc, asr=ev.asr)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(set_name, label, seed, rec["previous_flagged"], "->", rec["flagged"], flush=True)


def run_zoo(zoo: Path | None, data_root: str, out: Path) -> None:
    from latentguard.zoo import default_zoo_root, zoo_models

    seen = done(out)
    for m in zoo_models(zoo or default_zoo_root(), data_root):
        label = f"{m.dataset} {m.name}"
        if ("zoo", label, 0) in seen:
            continue
        rec = record(m.model, m.reserve, set="zoo", label=label, seed=0, target=m.target,
                     acc=m.record["metrics"]["acc"], asr=m.asr)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(label, rec["previous_flagged"], "->", rec["flagged"], flush=True)


def _named(flagged: list[int], target: int | None) -> bool:
    return target is not None and target in flagged


def summary(rows: list[dict]) -> list[str]:
    lines = ["| set | clean models flagged (previous → with alignment) | learned targets named | models with a "
             "non-target flag | largest alignment index of a clean model / of a non-target class |",
             "|---|---|---|---|---|"]
    for set_name in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == set_name]
        clean = [r for r in rs if r["target"] is None]
        learned = [r for r in rs if r["target"] is not None and (r["asr"] or 0) >= LEARNED]
        backdoored = [r for r in rs if r["target"] is not None]
        prev_clean = sum(bool(r["previous_flagged"]) for r in clean)
        new_clean = sum(bool(r["flagged"]) for r in clean)
        prev_named = sum(_named(r["previous_flagged"], r["target"]) for r in learned)
        new_named = sum(_named(r["flagged"], r["target"]) for r in learned)
        prev_other = sum(bool(set(r["previous_flagged"]) - {r["target"]}) for r in backdoored)
        new_other = sum(bool(set(r["flagged"]) - {r["target"]}) for r in backdoored)
        max_clean = max((max(r["alignment_scores"]) for r in clean), default=float("nan"))
        max_other = max((max(np.delete(r["alignment_scores"], r["target"])) for r in backdoored), default=float("nan"))
        lines.append(f"| {set_name} | {prev_clean} → {new_clean} of {len(clean)} | {prev_named} → {new_named} of "
                     f"{len(learned)} | {prev_other} → {new_other} of {len(backdoored)} | {max_clean:.2f} / "
                     f"{max_other:.2f} |")
    return lines


def per_model(rows: list[dict]) -> list[str]:
    lines = ["| set | model | seed | ACC / ASR % | target's alignment a_p | its signed index (largest other in "
             "size) | flagged before → with alignment | detection s before → with |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        signed = np.asarray(r["alignment_index"])
        idx = np.abs(signed)
        t = r["target"]
        asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        if t is None:
            tgt, ind = "–", f"– ({idx.max():.2f})"
        else:
            tgt, ind = f"{r['alignment'][t]:.3f}", f"{signed[t]:.2f} ({np.delete(idx, t).max():.2f})"
        lines.append(f"| {r['set']} | {r['label']} | {r['seed']} | {100 * r['acc']:.1f} / {asr} | {tgt} | {ind} | "
                     f"{r['previous_flagged'] or '–'} → {r['flagged'] or '–'} | {r['seconds_previous']:.2f} → "
                     f"{r['seconds']:.2f} |")
    return lines


def render(paths: list[Path], md: Path) -> None:
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    text = [f"# TAC's alignment verdict (α = {DEFAULT_THRESHOLD:g})", "",
            "Produced by `python benchmarks/tac_alignment.py` (its docstring has the commands). `previous` is TAC's "
            "verdict without the alignment (the defaults before it), `with alignment` the new default. A backdoor "
            f"counts as learned at ASR ≥ {100 * LEARNED:.0f} %.", "", *summary(rows), "", *per_model(rows), ""]
    write_keeping_reading(md, "\n".join(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("digits", "zoo"))
    ap.add_argument("--cache", type=Path, default=Path("runs/tac_alignment_digits"))
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--render", type=Path, nargs="*", default=None)
    ap.add_argument("--md", type=Path, default=Path("benchmarks/tac_alignment.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.render:
        render(args.render, args.md)
        return
    if args.set is None or args.out is None:
        ap.error("give --set and --out (or --render FILES)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.set == "digits":
        run_digits(args.cache, args.out)
    else:
        if args.data_root is None:
            ap.error("--set zoo needs --data-root")
        run_zoo(args.zoo, args.data_root, args.out)


if __name__ == "__main__":
    main()
