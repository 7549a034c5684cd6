"""How close is TAC's clean-data surrogate s_p to the real Trigger-Activated Change? Measured on the zoo.

For each backdoored zoo cell the clean reserve and its triggered copies (the attack's own trigger on the same
training images, never a test image) go through the model; the real change of image i is
TAC_i = φ(x_i + trigger) − φ(x_i). Reported per cell:

- ``‖s_p‖``: the QP's minimal flip norm of the target (from the clean latents only);
- ``‖TAC‖``: the mean of ‖TAC_i‖, and the ratio ``‖TAC‖ / ‖s_p‖`` (how much further the trigger goes than needed);
- ``cos``: cosine between s_p and the mean TAC, and the median of the per-image cosines; also the median
  cosine between TAC_i and the pairwise perturbation s_{a→p} of the image's own class a (the QP restricted to
  the clean images of class a), the direction ``tac`` unlearns with ``surrogate="source"``;
- ``row space``: the mean share of ‖TAC_i‖ inside the span of the head's row differences w_p − w_j, the only
  part of a latent change the head can see;
- ``flip``: the share of triggered reserve images the head sends to p when only the component of TAC_i along
  s_p is kept (does the surrogate's direction alone carry the backdoor?).

    python benchmarks/tac_direction.py --data-root DIR [--zoo ZOO] [--out benchmarks/tac_direction.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentguard.attacks import load_attack
from latentguard.defenses.tac import feature_model
from latentguard.latent.qp import minimal_flip_perturbations, pairwise_flip_perturbations
from latentguard.models import extract_features
from latentguard.zoo import default_zoo_root, zoo_models


def direction_stats(z: torch.Tensor, z_trig: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    target: int, labels: np.ndarray | None = None, z_all: torch.Tensor | None = None,
                    labels_all: np.ndarray | None = None) -> dict[str, float]:
    """Compare the QP surrogate s_p (from clean latents ``z``) with the real changes ``z_trig − z``; with the
    images' ``labels`` and the whole reserve (``z_all``, ``labels_all``, target class included), also with each
    image's own source-class perturbation s_{a→p} of the pairwise QP."""
    sol = minimal_flip_perturbations(z.double().numpy(), weight.double().numpy(), bias.double().numpy(),
                                     classes=[target])
    s = torch.as_tensor(sol.perturbations[0], dtype=torch.float64)  # the one class solved
    tac = (z_trig - z).double()
    mean = tac.mean(0)
    unit = s / s.norm()
    rows = torch.stack([weight[target] - weight[j] for j in range(weight.shape[0]) if j != target]).double()
    basis, _ = torch.linalg.qr(rows.T)
    along = (tac @ unit)[:, None] * unit  # the part of each change along s_p
    logits = (z.double() + along) @ weight.double().T + bias.double()
    per_image_cos = (tac @ unit) / tac.norm(dim=1).clamp_min(1e-12)
    own = float("nan")
    if labels is not None and z_all is not None and labels_all is not None:
        pair = pairwise_flip_perturbations(z_all.double().numpy(), labels_all, weight.double().numpy(),
                                           bias.double().numpy()).perturbations[:, target]  # row a: s_{a→p}
        own_dir = torch.as_tensor(pair[labels], dtype=torch.float64)
        own = float(((tac * own_dir).sum(1) / (tac.norm(dim=1) * own_dir.norm(dim=1)).clamp_min(1e-12)).median())
    return {"s_norm": float(s.norm()), "tac_norm": float(tac.norm(dim=1).mean()), "cos_own_source_median": own,
            "ratio": float(tac.norm(dim=1).mean() / s.norm()),
            "cos_mean": float(mean @ unit / mean.norm().clamp_min(1e-12)),
            "cos_median": float(per_image_cos.median()),
            "row_space": float(((tac @ basis).norm(dim=1) / tac.norm(dim=1).clamp_min(1e-12)).mean()),
            "flip_along": float((logits.argmax(1) == target).double().mean()),
            "flip_full": float(((z_trig.double() @ weight.double().T + bias.double()).argmax(1) == target)
                               .double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_direction.md"))
    ap.add_argument("--cells", default=None,
                    help="dataset/attack,... (default: every backdoored zoo cell); other cells keep their last rows")
    args = ap.parse_args()
    only = None if args.cells is None else set(args.cells.split(","))
    zoo = args.zoo or default_zoo_root()
    rows = []
    for m in zoo_models(zoo, args.data_root, clean=False, cells=only):  # backdoored, all-to-one cells
        dataset, full = m.dataset, m.reserve
        attack = load_attack(m.path / "attack.json")
        keep = np.flatnonzero(full.y != attack.spec.target)  # images the trigger must move to p
        reserve = full.subset(keep)
        fm = feature_model(m.model, reserve, device=torch.device("cpu"))
        z_all, _ = extract_features(fm, full.tensors()[0], device="cpu")
        z = z_all[torch.from_numpy(keep)]  # the non-target images' clean latents
        x_trig = torch.from_numpy(attack.apply_images(reserve, np.arange(len(reserve)))).permute(0, 3, 1, 2)
        z_trig, _ = extract_features(fm, x_trig.float() / 255, device="cpu")
        stats = direction_stats(z, z_trig, fm.head.weight.detach().cpu(), fm.head.bias.detach().cpu(),
                                attack.spec.target, np.asarray(reserve.y), z_all, np.asarray(full.y))
        rows.append({"dataset": dataset, "attack": m.name, "images": len(reserve), **stats})
        print(rows[-1], flush=True)
    previous = args.out.with_suffix(".json")
    if only is not None and previous.is_file():  # --cells: keep the other cells' rows of the last full run
        done = {(r["dataset"], r["attack"]) for r in rows}
        rows += [r for r in json.loads(previous.read_text()) if (r["dataset"], r["attack"]) not in done]
        rows.sort(key=lambda r: (r["dataset"], r["attack"]))
    lines = ["# TAC's surrogate s_p against the real trigger change, on the zoo", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Produced by `python benchmarks/tac_direction.py --data-root DATA`; reserve images of the target class "
             "are left out (the trigger need not move them).", "",
             "| dataset | attack | images | ‖s_p‖ | ‖TAC‖ | ‖TAC‖/‖s_p‖ | cos(s_p, mean TAC) | median per-image cos | "
             "median cos with own s_{a→p} | row space | flip: TAC along s_p | flip: full TAC |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['images']} | {r['s_norm']:.2f} | {r['tac_norm']:.2f} | "
                     f"{r['ratio']:.2f} | {r['cos_mean']:.3f} | {r['cos_median']:.3f} | "
                     f"{r.get('cos_own_source_median', float('nan')):.3f} | {r['row_space']:.3f} | "
                     f"{100 * r['flip_along']:.1f} % | {100 * r['flip_full']:.1f} % |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
