"""Does TAC see more when its clean reserve is perturbed? A probe of the two targets TAC misses.

TAC misses the CIFAR-10 Blend and LF targets (``tac_threshold.md``, ``tac_alt_statistics.md``). Both triggers
are global, low-amplitude changes of the whole image, so a generic perturbation of the clean images might move
their latents toward the backdoor and make the target's flip norm ‖s_k‖ stand out. For every zoo model this
script runs TAC's detection (default statistic and α) on the reserve as it is and on three generic perturbations
of it, none of which uses any knowledge of the attack (TAC's own noise probe off, so each column is one verdict):

- ``gauss``: i.i.d. Gaussian pixel noise, σ = 0.06;
- ``lowfreq``: a random smooth field (4×4 uniform noise in [−1, 1], bilinearly upsampled), amplitude 0.1;
- ``mix``: 0.7·x + 0.3·x' with x' another reserve image.

Each row gives the target's anomaly index, the largest other class's index (clean models: the largest index),
the classes flagged, and the share of perturbed reserve images the model assigns to the target. A last table
runs TAC's default detection (the clean verdict plus its noise probe, σ 0.1 on 30 % of the reserve) and gives
both verdicts' indices. Only clean reserve data and the known zoo targets are used; no test image.

    python benchmarks/tac_perturbed_reserve.py --data-root DIR [--zoo ZOO] [--out benchmarks/tac_perturbed_reserve.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentguard.data import Images
from latentguard.defenses.tac import detect
from latentguard.inference import predict
from latentguard.zoo import default_zoo_root, zoo_models

KINDS = ("none", "gauss", "lowfreq", "mix")


def perturb(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The uint8 (N, H, W, C) images ``x`` under perturbation ``kind`` (see the module docstring)."""
    xf = x.astype(np.float32) / 255
    n, h, w, c = xf.shape
    if kind == "gauss":
        xf = xf + rng.normal(0, 0.06, xf.shape).astype(np.float32)
    elif kind == "lowfreq":
        field = torch.from_numpy(rng.uniform(-1, 1, (n, c, 4, 4)).astype(np.float32))
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        xf = xf + 0.1 * field.numpy()
    elif kind == "mix":
        xf = 0.7 * xf + 0.3 * xf[rng.permutation(n)]
    return (np.clip(xf, 0, 1) * 255).round().astype(np.uint8)


def _target_and_rest(scores: list[float], target: int | None) -> dict[str, float | None]:
    """The target's index and the largest other class's (without a target: None and the largest index)."""
    others = np.asarray(scores, dtype=float).copy()
    if target is not None:
        others[target] = -np.inf
    return {"target": None if target is None else float(scores[target]), "rest": float(others.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_perturbed_reserve.md"))
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    rows, defaults = [], []
    for m in zoo_models(zoo, args.data_root):
        dataset, name, reserve, model, target = m.dataset, m.name, m.reserve, m.model, m.target
        rng = np.random.default_rng(0)
        for kind in KINDS:
            x = perturb(np.asarray(reserve.x), kind, rng)
            images = Images(x, np.asarray(reserve.y), reserve.class_names, reserve.hflip)
            report = detect(model, images, device="cpu", noise_probe=0.0, smooth_probe=0.0)  # the perturbation is the probe
            scores = np.asarray(report.scores)
            others = scores.copy()
            if target is not None:
                others[target] = -np.inf
            pred = predict(model, x, device="cpu").numpy()
            share = np.bincount(pred, minlength=len(scores)) / len(pred)
            rows.append({"dataset": dataset, "cell": name, "asr": m.asr, "kind": kind,
                         "target": target, "target_score": None if target is None else float(scores[target]),
                         "max_other": float(others.max()), "flagged": report.target_classes,
                         "target_share": None if target is None else float(share[target])})
            print(json.dumps(rows[-1]), flush=True)
        report = detect(model, reserve, device="cpu")  # TAC's defaults: the clean verdict and its noise probe
        defaults.append({"dataset": dataset, "cell": name, "target": target, "flagged": report.target_classes,
                         **{f"{side}_{k}": v for side in ("clean", "probe")
                            for k, v in _target_and_rest(report.extra[f"{side}_scores"], target).items()}})
    lines = ["# TAC on a perturbed clean reserve", "",
             "Produced by `python benchmarks/tac_perturbed_reserve.py` (see its docstring for the perturbations). "
             "Each cell: the target's anomaly index / the largest index of any other class (clean models: – / the "
             "largest index), then the flagged classes in brackets; last column per perturbation: the share of "
             "perturbed reserve images predicted as the target. TAC's default statistic and α = 4.", "",
             "| dataset | cell | ASR % | " + " | ".join(f"{k}: index | {k}: target share" for k in KINDS) + " |",
             "|---" * (3 + 2 * len(KINDS)) + "|"]
    by = {(r["dataset"], r["cell"], r["kind"]): r for r in rows}
    for dataset, name in dict.fromkeys((r["dataset"], r["cell"]) for r in rows):
        first = by[(dataset, name, KINDS[0])]
        asr = "–" if first["asr"] is None else f"{100 * first['asr']:.1f}"
        cols = []
        for kind in KINDS:
            r = by[(dataset, name, kind)]
            t = "–" if r["target_score"] is None else f"{r['target_score']:.1f}"
            share = "–" if r["target_share"] is None else f"{100 * r['target_share']:.1f} %"
            cols += [f"{t} / {r['max_other']:.1f} {r['flagged']}", share]
        lines.append(f"| {dataset} | {name} | {asr} | " + " | ".join(cols) + " |")
    lines += ["", "TAC's default detection (the clean verdict and its noise probe, σ 0.1 on a class-balanced 30 % of "
              "the reserve): each verdict's index of the target / of the most outlying other class, and the classes "
              "flagged (either verdict above α = 4).", "",
              "| dataset | cell | clean verdict | noise probe | flagged |", "|---|---|---|---|---|"]
    for d in defaults:
        cols = ["– / " if d["target"] is None else f"{d[side + '_target']:.1f} / " for side in ("clean", "probe")]
        cols = [c + f"{d[side + '_rest']:.1f}" for c, side in zip(cols, ("clean", "probe"), strict=True)]
        lines.append(f"| {d['dataset']} | {d['cell']} | {cols[0]} | {cols[1]} | {d['flagged']} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"perturbed": rows, "default": defaults}, indent=1) + "\n")


if __name__ == "__main__":
    main()
