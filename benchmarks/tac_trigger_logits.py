"""Through which logits does a trigger reach its target, before and after TAC's removal?

For one zoo cell (by default the CIFAR-10 TrojanNN seed-2 development build), the mean logits on 1,000 test images
not of the target, clean and with the trigger: the target's logit, the true class's, the largest and the mean of
the other classes' (target left out), and the share sent to the target. Judged on the given model and after TAC's
removal with each setting (the defaults with ``redraw_others`` off and on; each run is seeded, 1 CPU thread).
Writes a JSON file that ``tac_redraw.py`` turns into a table.

    python benchmarks/tac_trigger_logits.py --zoo DIR [--cell cifar10/trojannn] [--data-root DIR]
        [--out benchmarks/results/tac_redraw/trigger_logits.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentguard.attacks import load_attack
from latentguard.data import load_data
from latentguard.defenses import make_defense
from latentguard.zoo import data_spec_for, zoo_models

SETTINGS = {"given model": None,
            "previous defaults (redraw_others false)": {"redraw_others": False},
            "new defaults (redraw_others true)": {"redraw_others": True}}
IMAGES = 1000


def logit_summary(logits: torch.Tensor, y: torch.Tensor, target: int) -> dict[str, float]:
    """Means over the images of the target's logit, the true class's, the largest and the mean non-target logit,
    and the share predicted as the target."""
    others = torch.cat([logits[:, :target], logits[:, target + 1:]], dim=1)
    return {"to_target": float((logits.argmax(1) == target).float().mean()),
            "target_logit": float(logits[:, target].mean()),
            "true_logit": float(logits[torch.arange(len(y)), y].mean()),
            "max_other_logit": float(others.max(1).values.mean()),
            "mean_other_logit": float(others.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--cell", default="cifar10/trojannn")
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tac_redraw/trigger_logits.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    zm = next(zoo_models(args.zoo, args.data_root, cells=[args.cell]))
    test = load_data(data_spec_for(zm.dataset, args.data_root)).test
    attack = load_attack(zm.path / "attack.json")
    target = attack.spec.target
    subset = test.subset(np.flatnonzero(test.y != target)[:IMAGES])
    x_trigger, _, y = attack.get_backdoor_test_set(subset)
    x_clean, _ = subset.tensors()
    out = {"cell": args.cell, "zoo": str(args.zoo), "target": target, "images": len(y), "settings": {}}
    for name, params in SETTINGS.items():
        model = zm.model if params is None else make_defense("tac", **params).run(
            zm.model, zm.reserve, device="cpu", seed=0).model
        model.eval()
        with torch.no_grad():
            out["settings"][name] = {"clean": logit_summary(model(x_clean), y, target),
                                     "trigger": logit_summary(model(x_trigger.float() / 255), y, target)}
        print(name, json.dumps(out["settings"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
