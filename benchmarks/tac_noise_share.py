"""Which share of noisy clean images goes to the target: can it tell when TAC's noise term helps?

TAC's removal fits noisy copies of the reserve to their labels when the noise probe flags the target. That term
removes Blend (noise-keyed trigger) and works against TrojanNN (``tac_distill.md``). For each model this measures,
on the reserve images not of the target, the share the model sends to the target under Gaussian pixel noise of
σ 0, 0.05 and 0.1 (the probe's σ) — a quantity a defender can compute from clean data. Models: the CIFAR-10 zoo,
the CIFAR-10 development builds (seeds 1 and 2), and the digits models of ``tac_noise_probe_digits.md`` whose
target the probe flagged (the models are trained into ``--digits-cache`` when missing; the reserve is that study's,
a class-balanced 20 % of the training split drawn with seed 0).

    python benchmarks/tac_noise_share.py [--zoo DIR] [--dev DIR ...] [--data-root DIR] [--out benchmarks/tac_noise_share.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from markdown_out import write_keeping_reading
from tac_noise_probe_digits import trained

from latentguard.data import Images, clean_reserve, load_data
from latentguard.defenses.tac import noisy_copy
from latentguard.inference import predict, to_float_images
from latentguard.zoo import zoo_models

SIGMAS = (0.0, 0.05, 0.1)
CIFAR_CELLS = ["cifar10/badnets", "cifar10/blend", "cifar10/inputaware", "cifar10/sig", "cifar10/trojannn",
               "cifar10/wanet"]
DIGITS = (("blend", 1), ("blend", 2), ("blend", 5), ("badnets", 0), ("badnets", 1), ("wanet", 0), ("wanet", 1),
          ("wanet", 2))


def shares(model: torch.nn.Module, reserve: Images, target: int) -> list[float]:
    """Share of the reserve's non-target images predicted as ``target`` under pixel noise of each σ of SIGMAS."""
    others = reserve.subset(np.flatnonzero(reserve.y != target))
    out = []
    for sigma in SIGMAS:
        images = others if sigma == 0 else noisy_copy(others, sigma)
        out.append(float(np.mean(predict(model, to_float_images(images.x), device="cpu").numpy() == target)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "latentguard" / "zoo")
    ap.add_argument("--dev", type=Path, nargs="*", default=[Path("runs/zoo_s1"), Path("runs/zoo_s2")],
                    help="zoo roots of the CIFAR-10 development builds")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--digits-cache", type=Path, default=Path("runs/noise_probe_digits"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_noise_share.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, root in [("zoo", args.zoo)] + [(f"development ({p.name})", p) for p in args.dev]:
        if not root.is_dir():
            continue
        for zm in zoo_models(root, args.data_root, cells=CIFAR_CELLS):
            rows.append((f"CIFAR-10 {zm.name}", label, shares(zm.model, zm.reserve, int(zm.spec["target"]))))
            print(*rows[-1], flush=True)
    data = load_data("digits")
    reserve = data.train.subset(clean_reserve(data.train, 0.2, seed=0))  # tac_noise_probe_digits.py's reserve
    for name, seed in DIGITS:
        model = trained(data, name, seed, args.digits_cache)
        rows.append((f"digits {name}", f"seed {seed}", shares(model, reserve, 0)))
        print(*rows[-1], flush=True)
    head = "| model | build | " + " | ".join(f"σ {s:g}" for s in SIGMAS) + " |"
    lines = [head, "|---|---|" + "---|" * len(SIGMAS)]
    lines += [f"| {m} | {b} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |" for m, b, vals in rows]
    text = ["# Share of noisy clean images sent to the target", "",
            "Produced by `python benchmarks/tac_noise_share.py` (see its docstring). % of the reserve's images not of "
            "the target that the model classifies as the target, under Gaussian pixel noise of σ.", "",
            "\n".join(lines), ""]
    print(write_keeping_reading(args.out, "\n".join(text)))


if __name__ == "__main__":
    main()
