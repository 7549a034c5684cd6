"""``latentguard demo``: the whole story on the embedded digits data in about a minute on 2 CPU cores.

1. train a clean model and a BadNets-backdoored model (the attacker's side);
2. detect the poisoned class from 20 % clean training data alone (TAC latent QP);
3. remove the backdoor by TAC-guided fine-tuning, and, separately, repair the deployed model at inference
   time (FIRE latent shift) without touching its weights;
4. print the before/after table and write the result JSON, detection plot and Markdown report.
"""

from __future__ import annotations

import time
from pathlib import Path

from latentguard.attacks import AttackContext, make_attack, save_attack
from latentguard.data import clean_reserve, load_data
from latentguard.device import resolve_device, seed_everything
from latentguard.evaluation import evaluate
from latentguard.io import atomic_output_dir, result_record, write_json
from latentguard.models import build_model, save_model
from latentguard.train import TrainConfig, fit

EPOCHS = 20


def run(out: str | Path = "demo-out", *, device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    dev = resolve_device(device)
    t_start = time.perf_counter()
    splits = load_data("digits")
    h, w, c = splits.train.image_shape
    n_classes = splits.train.num_classes
    cfg = TrainConfig(epochs=EPOCHS, lr=0.05, batch_size=64, seed=seed, progress=progress)
    console.print(f"[bold]digits[/]: {len(splits.train)} train / {len(splits.test)} test images, {h}×{w}, "
                  f"{n_classes} classes")

    def fresh():
        seed_everything(seed)
        return build_model("small_cnn", n_classes, in_channels=c, image_size=h)

    rows: list[tuple[str, dict, float]] = []
    with atomic_output_dir(out, overwrite=True) as tmp:
        t0 = time.perf_counter()
        clean_model = fresh()
        fit(clean_model, splits.train, cfg, device=dev)
        rows.append(("clean model (reference)", evaluate(clean_model, splits.test, device=dev).to_dict(),
                     time.perf_counter() - t0))
        console.print(f"clean model: test accuracy {100 * rows[-1][1]['acc']:.1f} %")

        attack = make_attack("badnets", num_classes=n_classes, image_shape=(c, h, w), target=0, rate=0.1, seed=seed)
        t0 = time.perf_counter()
        backdoored = fresh()
        _, poisoned = attack.train_model(backdoored, AttackContext(splits.train, fresh, cfg, dev))
        backdoor_set = attack.get_backdoor_test_set(splits.test)
        before = evaluate(backdoored, splits.test, backdoor_set=backdoor_set, device=dev)
        rows.append(("backdoored (BadNets → class 0)", before.to_dict(), time.perf_counter() - t0))
        save_model(backdoored.cpu(), tmp / "backdoored", backdoored.arch_config)
        save_attack(attack, tmp / "backdoored")

        reserve = splits.train.subset(clean_reserve(splits.train, 0.2, seed=seed, exclude=poisoned))
        console.print(f"defender's clean reserve: {len(reserve)} images (no poisoned sample)")

        from latentguard.defenses import make_defense
        from latentguard.report import plot_detection

        tac = make_defense("tac").run(backdoored, reserve, device=dev, seed=seed)
        det = tac.detection.to_json()
        console.print(f"TAC detection ({det['seconds']:.2f}s): anomaly index per class "
                      + " ".join(f"{k}:{s:.1f}" for k, s in enumerate(det["scores"]))
                      + f" → flagged {det['target_classes'] or 'none'}")
        write_json(tmp / "detection.json", det)
        plot_detection(det, tmp / "detection.png", class_names=reserve.class_names)
        removed = evaluate(tac.model, splits.test, backdoor_set=backdoor_set, device=dev)
        rows.append(("TAC removal (fine-tuned)", removed.to_dict(), tac.seconds))
        save_model(tac.model.cpu(), tmp / "removed", backdoored.arch_config)

        fire = make_defense("fire").run(backdoored, reserve, device=dev, seed=seed)
        repaired = evaluate(fire.model, splits.test, backdoor_set=backdoor_set, device=dev)
        rows.append(("FIRE repair (weights untouched)", repaired.to_dict(), fire.seconds))
        if "quantile" in fire.extra:  # flagged: say what the reserve chose
            alphas = ", ".join(f"{v:g}" for v in fire.extra["alphas"].values())
            console.print(f"FIRE chose, on the reserve: strength α {alphas}, gate quantile "
                          f"{fire.extra['quantile']:g} (cross-fitted clean accuracy {fire.extra['cv_acc_after']:.3f})")

        table = Table(title="latentguard demo: digits, small_cnn, BadNets")
        for col in ("model", "ACC %", "ASR %", "RA %", "seconds"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for name, m, sec in rows:
            table.add_row(name, f"{100 * m['acc']:.1f}", "–" if m["asr"] is None else f"{100 * m['asr']:.1f}",
                          "–" if m["ra"] is None else f"{100 * m['ra']:.1f}", f"{sec:.1f}")
        console.print(table)
        record = result_record("demo", parameters={"epochs": EPOCHS, "seed": seed, "model": "small_cnn",
                                                   "attack": attack.spec.to_json()},
                               metrics={name: m for name, m, _ in rows},
                               seconds=time.perf_counter() - t_start)
        write_json(tmp / "demo.json", record)
        from latentguard.report.markdown import demo_report

        demo_report(tmp, rows, det)
    console.print(f"results, plot and report written to {out}/ in {time.perf_counter() - t_start:.0f}s")
    return record
