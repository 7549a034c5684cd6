"""Evidence for TAC's detection defaults on the zoo: anomaly indices of every class of every finished model.

For each zoo cell the clean reserve's latents are extracted once; the per-class flip norms ‖s_k‖ are then
solved for several ``quantile`` settings (1.0 = every clean sample must flip, the paper's formulation) and the
MAD anomaly index of the log-norms is reported for the true target (backdoored cells) and for the most outlying
other class. A threshold α separates the two populations when it lies above every clean model's maximum and
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

from latentguard.data import load_data
from latentguard.defenses.tac import feature_model, latent_report
from latentguard.models import extract_features, load_model
from latentguard.zoo import data_spec_for, default_zoo_root

QUANTILES = (1.0, 0.99, 0.95, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_threshold.md"))
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    rows = []
    loaded: tuple[str, object] | None = None  # (dataset, splits): cells come sorted by dataset
    for metrics in sorted(zoo.glob("*/*/metrics.json")):
        cell = metrics.parent
        dataset, name = cell.parent.name, cell.name
        rec = json.loads(metrics.read_text())
        if loaded is None or loaded[0] != dataset:
            loaded = (dataset, load_data(data_spec_for(dataset, args.data_root)))
        train = loaded[1].train
        reserve = train.subset(np.asarray(json.loads((cell / "reserve_indices.json").read_text())["indices"]))
        model = load_model(str(cell / "model.json")).eval()
        fm = feature_model(model, reserve, device=torch.device("cpu"))
        z, _ = extract_features(fm, reserve.tensors()[0], batch_size=256, device="cpu")  # once per model
        spec = rec["parameters"].get("attack")
        target = None if spec is None or spec.get("all_to_all") else spec.get("target")
        for q in QUANTILES:
            report = latent_report(z, fm.head, quantile=q)
            scores = np.asarray(report.scores)
            others = scores.copy()
            if target is not None:
                others[target] = -np.inf
            rows.append({"dataset": dataset, "cell": name, "quantile": q, "target": target,
                         "target_score": None if target is None else float(scores[target]),
                         "max_other": float(others.max()), "argmax_other": int(others.argmax()),
                         "norms": report.norms, "scores": report.scores})
            print(f"{dataset}/{name} q={q}: target {rows[-1]['target_score']} max other {rows[-1]['max_other']:.2f}",
                  flush=True)
    lines = ["# TAC detection: anomaly indices on the zoo", "",
             "MAD anomaly index of log ‖s_k‖ over the classes (positive = smaller than typical), computed on each "
             "zoo cell's clean reserve. `target` is the backdoor target's index (– for clean models), `max other` "
             "the largest index of any other class (the false-positive risk). Produced by "
             "`python benchmarks/tac_threshold.py`.", "",
             "| dataset | cell | quantile | target | max other (class) |", "|---|---|---|---|---|"]
    for r in rows:
        t = "–" if r["target_score"] is None else f"{r['target_score']:.2f}"
        lines.append(f"| {r['dataset']} | {r['cell']} | {r['quantile']} | {t} | {r['max_other']:.2f} ({r['argmax_other']}) |")
    summary = ["", "| quantile | lowest backdoored target | highest non-target / clean | separating α |", "|---|---|---|---|"]
    for q in QUANTILES:
        sub = [r for r in rows if r["quantile"] == q]
        tgt = [r["target_score"] for r in sub if r["target_score"] is not None]
        oth = [r["max_other"] for r in sub]
        lo, hi = (min(tgt) if tgt else float("nan")), max(oth)
        sep = f"({hi:.2f}, {lo:.2f})" if tgt and lo > hi else "none"
        summary.append(f"| {q} | {lo:.2f} | {hi:.2f} | {sep} |")
    args.out.write_text("\n".join(lines + summary) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
