"""FIRE on the zoo: clean-data-only repair beside paired / unpaired directions from 10, 50, 200 poisoned samples,
and the per-input score's AUROC beside STRIP's, on every finished zoo model.

For each zoo cell (dataset, attack) the defender gets only the cell's clean reserve (``reserve_indices.json``);
the variants differ in what else they get:

- ``qp``: nothing else (the default: the TAC flip perturbation ``s_p`` of the detected class, then the
  per-source stage, which also moves each flagged input back along the TAC perturbation ``s_{a→p}`` of its
  likely source class ``a``);
- ``qp-restored``: ``qp`` with the earlier choice of α and quantile (``select="restored"``: synthetic inputs
  ``x + β`` brought back to their clean prediction, against ``"left"``, the default: ``x + β`` and ``x + 2β``
  moved off the prediction the synthetic trigger caused);
- ``qp-shared``: ``qp`` without the per-source stage (``per_source=False``; the default before it);
- ``centroid``: nothing else (the clean class-mean offset of the detected class);
- ``paired-N``: triggered copies of N reserve images drawn at random (seeded; the attack's own trigger). The
  reserve is stored in class order, so its first N images would all be of class 0, the target: triggered
  copies of target images flip nothing, and runs before this was fixed measured that case;
- ``unpaired-N``: N of the attacker's poisoned training images (as planted, triggered), no clean partner.

α and the gate quantile are always chosen on the clean reserve (cross-fitted, tolerance ``--tolerance``);
ACC / ASR / RA are measured on the whole test set, AUROCs on a seeded subsample of ``--auroc-samples`` triggered
and as many clean test images (STRIP costs 100 forwards per input), the same subsample for every score.
Results go to ``OUT/results.jsonl`` (one line per cell × variant, appended as soon as it is measured, skipped
on a rerun) and ``OUT/fire_zoo.md``.

    python benchmarks/fire_zoo.py --data-root DIR [--zoo ZOO] [--datasets cifar10,gtsrb] [--out benchmarks/fire_zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from latentguard import metrics
from latentguard.attacks import load_attack
from latentguard.bench import finished_keys, input_scores, load_results
from latentguard.data import load_data
from latentguard.defenses import make_defense
from latentguard.defenses.fire import repair
from latentguard.evaluation import evaluate
from latentguard.models import load_model
from latentguard.zoo import cell_dir, cell_reserve, data_spec_for, default_zoo_root, is_done

ATTACKS = ("badnets", "blend", "wanet", "sig", "trojannn", "lf", "inputaware", "lira")
SIZES = (10, 50, 200)


def variants() -> list[str]:
    return ["qp", "qp-restored", "qp-shared", "centroid"] + [f"{kind}-{n}" for kind in ("paired", "unpaired") for n in SIZES] + ["strip"]


def append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_cell(zoo: Path, dataset: str, spec: str, attack: str, todo: list[str], args) -> list[dict]:
    cell = cell_dir(zoo, dataset, attack)
    model = load_model(str(cell / "model.json")).eval()
    splits = load_data(spec)
    reserve = cell_reserve(cell, splits.train)
    poisoned_idx = np.asarray(json.loads((cell / "poisoned_indices.json").read_text())["indices"])
    atk = load_attack(cell / "attack.json")
    bd = atk.get_backdoor_test_set(splits.test)
    before = evaluate(model, splits.test, backdoor_set=bd, device=args.device)
    rng = np.random.default_rng(args.seed)
    i_bd = np.sort(rng.permutation(len(bd[0]))[: args.auroc_samples])
    i_clean = np.sort(rng.permutation(len(splits.test))[: args.auroc_samples])
    x_bd = bd[0][i_bd].float() / 255
    x_clean = splits.test.subset(i_clean).tensors()[0]
    labels = np.r_[np.ones(len(x_bd)), np.zeros(len(x_clean))]
    order = rng.permutation(len(poisoned_idx))
    pairs_order = np.random.default_rng(args.seed).permutation(len(reserve))  # the paired variants' images
    out = []
    for variant in todo:
        if variant.startswith("unpaired-") and not len(poisoned_idx):
            print(f"{dataset}/{attack}/{variant}: skipped (the attack keeps no fixed poisoned training set)")
            continue
        t0 = time.perf_counter()
        rec = {"key": f"{dataset}/{attack}/{variant}", "dataset": dataset, "attack": attack, "variant": variant,
               "target": atk.spec.target, "acc_before": before.acc, "asr_before": before.asr,
               "ra_before": before.ra, "reserve": len(reserve)}
        if variant == "strip":
            result = make_defense("strip").run(model, reserve, device=args.device, seed=args.seed)
            score = result.input_score
            rec["seconds"] = result.seconds
        else:
            kind, _, n = variant.partition("-")
            kind = "qp" if variant in ("qp-shared", "qp-restored") else kind
            per_source = False if variant == "qp-shared" else None
            select = "restored" if variant == "qp-restored" else "left"
            poisoned = None
            if kind == "paired":
                drawn = reserve.subset(np.sort(pairs_order[: int(n)]))
                rec["n_poisoned"] = len(drawn)
                poisoned = (drawn.tensors()[0], torch.from_numpy(atk.apply_images(drawn)).permute(0, 3, 1, 2))
            elif kind == "unpaired":
                chosen = poisoned_idx[order[: int(n)]]
                rec["n_poisoned"] = len(chosen)
                poisoned = torch.from_numpy(atk.apply_images(splits.train, chosen)).permute(0, 3, 1, 2)
            wrapper = repair(model, reserve, source=kind, poisoned=poisoned, tolerance=args.tolerance,
                             device=args.device, seed=args.seed, per_source=per_source, select=select)
            rec["seconds"] = time.perf_counter() - t0
            after = evaluate(wrapper, splits.test, backdoor_set=bd, device=args.device)
            rec.update(acc=after.acc, asr=after.asr, ra=after.ra, targets=list(wrapper.targets),
                       alpha=wrapper.alphas, quantile=wrapper.quantile, select=select, der=metrics.defense_effectiveness_rating(
                           before.acc, before.asr, after.acc, after.asr))
            score = wrapper.score if wrapper.active else None
        if score is not None:
            with torch.no_grad():
                s = input_scores(score, torch.cat([x_bd, x_clean]), batch=250)
            rec["auroc"] = metrics.auroc(s, labels)
        append(args.out / "results.jsonl", rec)
        out.append(rec)
        asr = f"ASR {100 * rec['asr']:.1f}" if "asr" in rec else ""
        print(f"{rec['key']}: ACC {100 * rec.get('acc', before.acc):.1f} {asr} AUROC {rec.get('auroc', float('nan')):.3f} "
              f"({rec['seconds']:.0f}s)", flush=True)
        model.eval()
    return out


def table(rows: list[dict]) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| dataset | attack | variant | ACC % | ASR % | RA % | ΔACC pt | AUROC | s |", "|---" * 9 + "|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], ATTACKS.index(r["attack"]) if r["attack"] in ATTACKS else 99,
                                         variants().index(r["variant"]))):
        if r["variant"] == "qp":
            lines.append(f"| {r['dataset']} | {r['attack']} | undefended | {pct(r['acc_before'])} | "
                         f"{pct(r['asr_before'])} | {pct(r['ra_before'])} | – | – | – |")
        d_acc = "–" if "acc" not in r else f"{100 * (r['acc'] - r['acc_before']):+.1f}"
        auroc = "–" if r.get("auroc") is None else f"{r['auroc']:.3f}"
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['variant']} | {pct(r.get('acc'))} | {pct(r.get('asr'))} | "
                     f"{pct(r.get('ra'))} | {d_acc} | {auroc} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--datasets", default="cifar10,gtsrb")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--variants", default=",".join(variants()))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/fire_zoo"))
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--auroc-samples", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    zoo = args.zoo or default_zoo_root()
    args.out.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        spec = data_spec_for(dataset, args.data_root)
        for attack in args.attacks.split(","):
            if not is_done(cell_dir(zoo, dataset, attack)):
                continue
            done = finished_keys(args.out)
            todo = [v for v in args.variants.split(",") if f"{dataset}/{attack}/{v}" not in done]
            if todo:
                run_cell(zoo, dataset, spec, attack, todo, args)
    rows = load_results(args.out)
    head = (f"# FIRE on the zoo\n\nMachine: {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}. "
            f"Command: `python benchmarks/fire_zoo.py --data-root DATA --tolerance {args.tolerance}`. "
            f"AUROC on {args.auroc_samples} triggered + {args.auroc_samples} clean test images (seed {args.seed}); "
            "ΔACC against the undefended model; variants are explained in the script's docstring.\n\n")
    (args.out / "fire_zoo.md").write_text(head + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
