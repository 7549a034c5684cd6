"""Development set for TAC's noise probe: which pixel-noise σ, and does it raise false alarms? (digits only)

The probe judges the clean reserve a second time under i.i.d. Gaussian pixel noise of σ and flags a class that
either verdict flags (``latentguard.defenses.tac.with_noise_probe``). Its σ is chosen here, on small_cnn models
trained on the embedded digits data (12 epochs, seeds 0–5: clean, BadNets, Blend; seeds 0–2: SIG, WaNet; target
0, 10 % poisoning), never on the zoo. For every model and σ the row gives the flagged classes and the target's
anomaly index against the largest other class's (clean models: class 0 and the others).

A second table runs TAC removal with the default probe on every backdoored model, with and without
``noise_unlearn`` (on a probe-flagged target, also fit noisy copies of the reserve to their true labels), and
reports ACC / ASR / RA on the digits test split.

    python benchmarks/tac_noise_probe_digits.py [--cache DIR] [--out benchmarks/tac_noise_probe_digits.md]

``--cache`` keeps the trained models (state_dicts) between runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentguard.attacks import make_attack
from latentguard.data import clean_reserve, load_data
from latentguard.defenses import make_defense
from latentguard.defenses.tac import detect
from latentguard.evaluation import evaluate
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit

# (σ, share of each class of the reserve the probe judges)
SETTINGS = ((0.0, 1.0), (0.03, 1.0), (0.06, 1.0), (0.1, 1.0), (0.15, 1.0), (0.2, 1.0), (0.1, 0.3), (0.15, 0.3))
MODELS = (("clean", 6), ("badnets", 6), ("blend", 6), ("sig", 3), ("wanet", 3))


def _name(sigma: float, fraction: float) -> str:
    return f"σ = {sigma:g}" + ("" if fraction >= 1 else f", {fraction:.0%} of the reserve")


def trained(data, attack_name: str, seed: int, cache: Path) -> torch.nn.Module:
    h, w, c = data.train.image_shape
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, in_channels=c, image_size=h, width=16)
    path = cache / f"{attack_name}_{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train = data.train
    if attack_name != "clean":
        attack = make_attack(attack_name, num_classes=10, image_shape=(c, h, w), target=0, rate=0.1, seed=seed)
        train = attack.get_poisoned_dataset(data.train)[0]
    fit(model, train, TrainConfig(epochs=12, batch_size=64, lr=0.05, crop_padding=2, seed=seed), device="cpu")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/tac_noise_probe_digits"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_noise_probe_digits.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    reserve = data.train.subset(clean_reserve(data.train, 0.2, seed=0))
    rows = []
    for attack_name, n_seeds in MODELS:
        for seed in range(n_seeds):
            model = trained(data, attack_name, seed, args.cache)
            for sigma, fraction in SETTINGS:
                report = detect(model, reserve, device="cpu", noise_probe=sigma, probe_fraction=fraction)
                scores = np.asarray(report.extra.get("probe_scores", report.scores))
                rows.append({"attack": attack_name, "seed": seed, "sigma": sigma, "fraction": fraction,
                             "flagged": report.target_classes, "probe_target": float(scores[0]),
                             "probe_max_other": float(np.delete(scores, 0).max())})
            print(attack_name, seed, [r["flagged"] for r in rows[-len(SETTINGS):]], flush=True)
    lines = ["# TAC's noise probe on digits development models", "",
             "Produced by `python benchmarks/tac_noise_probe_digits.py` (see its docstring). Each cell: classes "
             "flagged by TAC with the probe at that σ, judging the whole reserve or the given share of each class (σ = 0: the probe off), then the probe's own anomaly index (σ = 0: the clean verdict's) of "
             "class 0 (the target of every backdoored model) / of the most outlying other class. α = 4.", "",
             "| model | seed | " + " | ".join(_name(*s) for s in SETTINGS) + " |", "|---" * (2 + len(SETTINGS)) + "|"]
    for attack_name, n_seeds in MODELS:
        for seed in range(n_seeds):
            cells = []
            for sigma, fraction in SETTINGS:
                r = next(r for r in rows
                         if (r["attack"], r["seed"], r["sigma"], r["fraction"]) == (attack_name, seed, sigma, fraction))
                cells.append(f"{r['flagged']} {r['probe_target']:.1f} / {r['probe_max_other']:.1f}")
            lines.append(f"| {attack_name} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Models flagged correctly (target 0 among the flagged classes) / any false flag:", "",
              "| model | " + " | ".join(_name(*s) for s in SETTINGS) + " |", "|---" * (1 + len(SETTINGS)) + "|"]
    for attack_name, n_seeds in MODELS:
        cells = []
        for sigma, fraction in SETTINGS:
            sub = [r for r in rows if r["attack"] == attack_name and (r["sigma"], r["fraction"]) == (sigma, fraction)]
            right = sum(0 in r["flagged"] for r in sub) if attack_name != "clean" else 0
            wrong = sum(any(k != 0 or attack_name == "clean" for k in r["flagged"]) for r in sub)
            cells.append(f"{right}/{n_seeds} · {wrong} false" if attack_name != "clean" else f"{wrong} false alarms")
        lines.append(f"| {attack_name} | " + " | ".join(cells) + " |")
    lines += ["", "TAC removal with the default probe (σ 0.1 on 30 % of the reserve), ACC / ASR / RA % on the digits "
              "test split; `noise` marks the models whose target the probe flagged (only there does `noise_unlearn` "
              "change anything):", "",
              "| model | seed | flagged | noise | undefended | noise_unlearn=false | noise_unlearn=true |",
              "|---|---|---|---|---|---|---|"]
    removal = []
    h, w, c = data.train.image_shape
    for attack_name, n_seeds in MODELS[1:]:
        for seed in range(n_seeds):
            attack = make_attack(attack_name, num_classes=10, image_shape=(c, h, w), target=0, rate=0.1, seed=seed)
            backdoor = attack.get_backdoor_test_set(data.test)
            before = evaluate(trained(data, attack_name, seed, args.cache), data.test, backdoor_set=backdoor,
                              device="cpu")
            cells, rec = [], {"attack": attack_name, "seed": seed, "undefended": [before.acc, before.asr, before.ra]}
            for unlearn in (False, True):
                result = make_defense("tac", noise_unlearn=unlearn).run(trained(data, attack_name, seed, args.cache),
                                                                        reserve, device="cpu", seed=0)
                after = evaluate(result.model, data.test, backdoor_set=backdoor, device="cpu")
                rec[str(unlearn)] = [after.acc, after.asr, after.ra]
                rec["flagged"] = result.detection.target_classes
                rec["noise"] = "noise_unlearn" in result.extra
                cells.append(f"{100 * after.acc:.1f} / {100 * after.asr:.1f} / {100 * after.ra:.1f}")
            removal.append(rec)
            lines.append(f"| {attack_name} | {seed} | {rec['flagged']} | {'yes' if rec['noise'] else ''} | "
                         f"{100 * before.acc:.1f} / {100 * before.asr:.1f} / {100 * before.ra:.1f} | "
                         + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"detection": rows, "removal": removal}, indent=1) + "\n")


if __name__ == "__main__":
    main()
