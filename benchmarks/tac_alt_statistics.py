"""Do other clean-data statistics of the latent and the head see the backdoors TAC's flip norm misses?

TAC's default statistic misses the CIFAR-10 Blend and LF targets (``tac_threshold.md``). This script asks whether
that is a weakness of the statistic or of what the head and the clean latents hold. For every zoo model it
extracts the clean reserve's latents once and scores every class with statistics computed from the same data
TAC sees (clean latents z, labels, head W, b), each as a MAD anomaly index oriented so that a backdoor target
should come out *positive*:

- ``flip`` TAC's per-class ‖s_k‖ (reference) and ``flip-pairwise`` the geometric mean of ‖s_{a→k}‖;
- ``whitened`` / ``whitened-pairwise``: the same QPs in the clean latents' whitened coordinates, i.e. the
  smallest change in units of the clean data's own spread (a trigger using a direction clean data do not use
  would look small there);
- ``coherence``: mean cosine between the pairwise s_{a→k} over sources a (one shared trigger direction);
- ``spread along s_k``: clean standard deviation along s_k (small: a dormant direction);
- ``leaving k``: geometric mean of ‖s_{k→a}‖ over a (a grown target region is hard to leave);
- ``margin``, ``latent norm``: the class's median top-2 logit margin and ‖z‖ on its clean samples (large);
- ``‖w_k‖``, ``b_k``: the head row's norm and bias (large).

Only clean reserve data and the known zoo targets are used; no test image.

    python benchmarks/tac_alt_statistics.py --data-root DIR [--zoo ZOO] [--out benchmarks/tac_alt_statistics.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentguard.defenses.tac import clean_latents, feature_model
from latentguard.latent.outliers import anomaly_index
from latentguard.latent.qp import minimal_flip_perturbations, pairwise_flip_perturbations
from latentguard.zoo import default_zoo_root, zoo_models

LEARNED = 0.5  # undefended ASR from which a backdoor counts as learned
RIDGE = 1e-3  # added to the clean covariance before whitening


def _geo_mean(norms: np.ndarray, axis: int) -> np.ndarray:
    return np.exp(np.nanmean(np.log(np.maximum(norms, 1e-300)), axis=axis))


def statistics(z: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class anomaly indices, each oriented so that a backdoor target is expected to be positive."""
    C = W.shape[0]
    flip = minimal_flip_perturbations(z, W, b)
    pair = pairwise_flip_perturbations(z, y, W, b)
    mu = z.mean(0)
    cov = np.cov(z.T) + RIDGE * np.eye(z.shape[1])
    ev, U = np.linalg.eigh(cov)
    ev = np.maximum(ev, RIDGE)
    root, inv_root = (U * np.sqrt(ev)) @ U.T, (U / np.sqrt(ev)) @ U.T
    zw, Ww, bw = (z - mu) @ inv_root, W @ root, b + W @ mu  # same logits, whitened coordinates
    white = minimal_flip_perturbations(zw, Ww, bw)
    white_pair = pairwise_flip_perturbations(zw, y, Ww, bw)
    coherence = np.empty(C)
    for k in range(C):
        s = np.delete(pair.perturbations[:, k], k, axis=0)
        s = s[~np.isnan(s).any(1)]
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        n = len(s)
        coherence[k] = ((s @ s.T).sum() - n) / max(n * (n - 1), 1)
    spread = np.array([np.sqrt(v @ cov @ v / (v @ v)) for v in flip.perturbations])
    logits = z @ W.T + b
    top2 = np.sort(logits, 1)[:, -2:]
    margin = np.array([np.median((top2[:, 1] - top2[:, 0])[y == k]) for k in range(C)])
    znorm = np.array([np.median(np.linalg.norm(z[y == k], axis=1)) for k in range(C)])
    return {
        "flip (TAC ‖s_k‖)": anomaly_index(flip.norms, log=True),
        "flip-pairwise": anomaly_index(_geo_mean(pair.norms, 0), log=True),
        "whitened": anomaly_index(white.norms, log=True),
        "whitened-pairwise": anomaly_index(_geo_mean(white_pair.norms, 0), log=True),
        "coherence": -anomaly_index(coherence),
        "spread along s_k": anomaly_index(spread, log=True),
        "leaving k": -anomaly_index(_geo_mean(pair.norms, 1), log=True),
        "margin": -anomaly_index(margin, log=True),
        "latent norm": -anomaly_index(znorm, log=True),
        "‖w_k‖": -anomaly_index(np.linalg.norm(W, axis=1), log=True),
        "b_k": -anomaly_index(b),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_alt_statistics.md"))
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    rows = []
    for m in zoo_models(zoo, args.data_root):
        dataset, name, reserve, target = m.dataset, m.name, m.reserve, m.target
        fm = feature_model(m.model, reserve, device=torch.device("cpu"))
        z = clean_latents(fm, reserve, device="cpu").double().numpy()
        W = fm.head.weight.detach().double().numpy()
        b = fm.head.bias.detach().double().numpy() if fm.head.bias is not None else np.zeros(W.shape[0])
        for stat, scores in statistics(z, np.asarray(reserve.y), W, b).items():
            others = scores.copy()
            if target is not None:
                others[target] = -np.inf
            rows.append({"dataset": dataset, "cell": name, "asr": m.asr, "statistic": stat,
                         "target": target, "target_score": None if target is None else float(scores[target]),
                         "max_other": float(others.max()), "scores": [float(v) for v in scores]})
        print(f"{dataset}/{name} done", flush=True)
    stats = list(dict.fromkeys(r["statistic"] for r in rows))
    cells = list(dict.fromkeys((r["dataset"], r["cell"]) for r in rows))
    lines = ["# Other clean-data statistics of the latent and the head", "",
             "Produced by `python benchmarks/tac_alt_statistics.py` (see its docstring for each statistic). Each cell: "
             "the target's MAD anomaly index / the largest index of any other class (clean models: – / the largest "
             "index). Every statistic is oriented so that a backdoor target should be positive and large.", "",
             "| statistic | " + " | ".join(f"{d} {c}" for d, c in cells) + " |", "|---" * (len(cells) + 1) + "|"]
    by = {(r["statistic"], r["dataset"], r["cell"]): r for r in rows}
    for stat in stats:
        cols = []
        for d, c in cells:
            r = by[(stat, d, c)]
            t = "–" if r["target_score"] is None else f"{r['target_score']:.1f}"
            cols.append(f"{t} / {r['max_other']:.1f}")
        lines.append(f"| {stat} | " + " | ".join(cols) + " |")
    lines += ["", "A statistic could rescue a missed model only if, on it, the target stands above every other class "
              "of that model and above every clean model's largest index. Per statistic, the learned backdoors "
              f"(undefended ASR ≥ {LEARNED:.0%}) whose target does, with the clean models' largest index as the bar:", "",
              "| statistic | clean models' largest index | learned targets above it and above their own other classes |",
              "|---|---|---|"]
    for stat in stats:
        sub = [r for r in rows if r["statistic"] == stat]
        bar = max(r["max_other"] for r in sub if r["target"] is None)
        hits = [f"{r['dataset']} {r['cell']}" for r in sub if r["target"] is not None and (r["asr"] or 0) >= LEARNED
                and r["target_score"] > max(bar, r["max_other"])]
        lines.append(f"| {stat} | {bar:.1f} | {len(hits)}: {', '.join(hits) or '–'} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines[-len(stats) - 2:]))


if __name__ == "__main__":
    main()
