"""Every registered attack on the embedded digits data: ACC / ASR / RA next to a clean model.

Acceptance of the attack suite: each attack reaches ASR ≥ 90 % with ACC within 3 points of the clean model.
Run: ``python benchmarks/attacks_digits.py [--epochs 30] [--params JSON] [--out benchmarks/attacks_digits.md]``.

Attack parameters are each attack's defaults except WaNet's warping strength: on 16×16 images the paper's
s = 0.5 moves pixels by a fraction of a pixel, too little to learn (its docstring), so s = 3 here.
The committed table trains InputAware for the paper's 600 joint epochs (``--epochs-for '{"inputaware": 600}'``):
its cross-trigger samples teach the classifier to reject a trigger on the wrong image, and on 1.3 k images that
takes long; at 30 epochs it reached 63.5 % ASR, at 100 epochs 75.1 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from latentguard.attacks import ATTACKS, AttackContext, make_attack
from latentguard.data import load_data
from latentguard.device import seed_everything
from latentguard.evaluation import evaluate
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--attacks", default=",".join(sorted(ATTACKS)))
    parser.add_argument("--out", default=str(Path(__file__).with_name("attacks_digits.md")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default='{"wanet": {"s": 3.0}}', help="JSON: {attack: {param: value}}")
    parser.add_argument("--epochs-for", default="{}", help='JSON: {attack: epochs} overriding --epochs')
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    epochs_for = json.loads(args.epochs_for)
    splits = load_data("digits")
    h, w, c = splits.train.image_shape
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=64, seed=args.seed)

    def fresh():
        seed_everything(args.seed)
        return build_model("small_cnn", 10, in_channels=c, image_size=h)

    t0 = time.perf_counter()
    clean = fresh()
    fit(clean, splits.train, cfg, device="cpu")
    clean_acc = evaluate(clean, splits.test, device="cpu").acc
    rows = [("clean", clean_acc, None, None, time.perf_counter() - t0, args.epochs)]
    print(f"clean ACC {100 * clean_acc:.1f}", flush=True)
    for name in args.attacks.split(","):
        t0 = time.perf_counter()
        attack = make_attack(name, num_classes=10, image_shape=(c, h, w), target=0, rate=0.1, seed=args.seed,
                             params=params.get(name, {}))
        model = fresh()
        epochs = int(epochs_for.get(name, args.epochs))
        attack.train_model(model, AttackContext(splits.train, fresh, dataclasses.replace(cfg, epochs=epochs),
                                                torch.device("cpu"), clean_model=clean))
        ev = evaluate(model, splits.test, attack, device="cpu")
        rows.append((name, ev.acc, ev.asr, ev.ra, time.perf_counter() - t0, epochs))
        print(f"{name}: ACC {100 * ev.acc:.1f} ASR {100 * ev.asr:.1f} RA {100 * ev.ra:.1f}", flush=True)
    lines = ["# Attacks on digits", "",
             f"`python benchmarks/attacks_digits.py --epochs {args.epochs} --params '{args.params}' "
             f"--epochs-for '{args.epochs_for}'` — small_cnn, 16×16 digits, target 0, "
             "10 % poisoning, seed 0, 2 CPU cores. Pass = ASR ≥ 90 % and ACC within 3 points of the clean model.", "",
             "| attack | epochs | ACC % | ASR % | RA % | seconds | pass |", "|---|---|---|---|---|---|---|"]
    for name, acc, asr, ra, sec, epochs in rows:
        ok = "–" if asr is None else ("yes" if asr >= 0.9 and acc >= clean_acc - 0.03 else "no")
        lines.append(f"| {name} | {epochs} | {_pct(acc)} | {_pct(asr)} | {_pct(ra)} | {sec:.0f} | {ok} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        [dict(zip(("attack", "acc", "asr", "ra", "seconds", "epochs"), r, strict=True)) for r in rows], indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
