"""Evidence for TAC's detection defaults on the zoo: anomaly indices of every class of every finished model.

For each zoo cell the clean reserve's latents are extracted once; TAC's detection statistic is then computed in
several settings: the paper's per-class flip norm ‖s_k‖ for several ``quantile`` values (1.0 = every clean
sample must flip, the paper's formulation) and the pairwise statistic (geometric mean over source classes of
‖s_{a→k}‖). The MAD anomaly index of the log-statistic is reported for the true target (backdoored cells) and for
the most outlying other class. A threshold α separates the two populations when it lies above every clean model's maximum and
every backdoored model's non-target maximum, and below every backdoored target. Only clean reserve data and the
known zoo targets are used: no test image.

    python benchmarks/tac_threshold.py --data-root DIR [--zoo ZOO] [--out benchmarks/tac_threshold.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentguard.defenses.tac import DEFAULT_THRESHOLD, clean_latents, feature_model, latent_report
from latentguard.zoo import default_zoo_root, zoo_models

LEARNED = 0.5  # undefended ASR from which a backdoor counts as learned
# (statistic, quantile) settings compared; the first is TAC's default
SETTINGS = (("both", 1.0), ("class", 1.0), ("pairwise", 1.0), ("class", 0.99), ("class", 0.95), ("class", 0.9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_threshold.md"))
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    rows = []
    for m in zoo_models(zoo, args.data_root, all_to_all=True):  # all-to-all cells kept, without a target
        dataset, name, reserve, target = m.dataset, m.name, m.reserve, m.target
        fm = feature_model(m.model, reserve, device=torch.device("cpu"))
        z = clean_latents(fm, reserve, device="cpu")  # once per model
        for statistic, q in SETTINGS:
            # the plain MAD, as when α was chosen; the default floor's effect is in tac_mad_floor.md
            report = latent_report(z, fm.head, quantile=q, labels=reserve.y, statistic=statistic, mad_floor=0.0)
            scores = np.asarray(report.scores)
            others = scores.copy()
            if target is not None:
                others[target] = -np.inf
            rows.append({"dataset": dataset, "cell": name, "statistic": statistic, "quantile": q, "target": target,
                         "asr": m.asr,
                         "target_score": None if target is None else float(scores[target]),
                         "max_other": float(others.max()), "argmax_other": int(others.argmax()),
                         "norms": report.norms, "scores": report.scores})
            print(f"{dataset}/{name} {statistic} q={q}: target {rows[-1]['target_score']} "
                  f"max other {rows[-1]['max_other']:.2f}", flush=True)
    lines = ["# TAC detection: anomaly indices on the zoo", "",
             "MAD anomaly index of the log-statistic over the classes (positive = smaller than typical), computed on "
             "each zoo cell's clean reserve. `class` is the paper's ‖s_k‖ with the given quantile of clean "
             "samples required to flip, `pairwise` the geometric mean over source classes a of ‖s_{a→k}‖, `both` "
             "(TAC's default) the larger of the pairwise index and the class index minus 1 (quantile 1.0: every "
             "clean sample must flip). The MAD is the plain one, as when α was chosen; the default floor on it "
             "(0.03, since a later version) and its effect on these models are in `tac_mad_floor.md`. "
             "`target` is the backdoor target's index (– for clean models), `max other` the "
             "largest index of any other class (the false-positive risk), ASR the undefended model's. Produced by "
             "`python benchmarks/tac_threshold.py`.", "",
             "| dataset | cell | ASR % | statistic | quantile | target | max other (class) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "–" if r["target_score"] is None else f"{r['target_score']:.2f}"
        asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        lines.append(f"| {r['dataset']} | {r['cell']} | {asr} | {r['statistic']} | {r['quantile']} | {t} "
                     f"| {r['max_other']:.2f} ({r['argmax_other']}) |")
    summary = ["", f"Detection at α = {DEFAULT_THRESHOLD:g} (backdoors with undefended ASR ≥ {LEARNED:.0%}; an "
               "unlearned backdoor is listed apart) and the range of α that would separate every target from every "
               "other class and clean model:", "",
               "| statistic | quantile | targets flagged | unlearned flagged | other classes flagged | clean models "
               "flagged | lowest target | highest other / clean | separating α |", "|---|---|---|---|---|---|---|---|---|"]
    for statistic, q in SETTINGS:
        sub = [r for r in rows if (r["statistic"], r["quantile"]) == (statistic, q)]
        learned = [r for r in sub if r["target_score"] is not None and (r["asr"] or 0) >= LEARNED]
        weak = [r for r in sub if r["target_score"] is not None and (r["asr"] or 0) < LEARNED]
        tgt = [r["target_score"] for r in learned]
        oth = [r["max_other"] for r in sub]
        lo, hi = (min(tgt) if tgt else float("nan")), max(oth)
        sep = f"({hi:.2f}, {lo:.2f})" if tgt and lo > hi else "none"
        hit = sum(t > DEFAULT_THRESHOLD for t in tgt)
        weak_hit = sum(r["target_score"] > DEFAULT_THRESHOLD for r in weak)
        other_flags = sum(sum(s > DEFAULT_THRESHOLD for k, s in enumerate(r["scores"]) if k != r["target"]) for r in sub)
        clean_flags = sum(r["target"] is None and r["max_other"] > DEFAULT_THRESHOLD for r in sub)
        n_clean = sum(r["target"] is None for r in sub)
        summary.append(f"| {statistic} | {q} | {hit}/{len(tgt)} | {weak_hit}/{len(weak)} | {other_flags} "
                       f"| {clean_flags}/{n_clean} | {lo:.2f} | {hi:.2f} | {sep} |")
    args.out.write_text("\n".join(lines + summary) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
