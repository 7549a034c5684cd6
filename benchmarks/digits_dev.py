"""The digits development models the TAC studies choose their settings on (never the zoo's models).

small_cnn on the embedded digits data, 30 epochs, lr 0.05, batch 64, target 0, 10 % poisoning; each model (and its
attack's learned tensors) is kept in a cache directory so a study can be re-rendered or resumed without training.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from markdown_out import write_keeping_reading

from latentguard.api import defend
from latentguard.attacks import AttackContext, make_attack
from latentguard.data import clean_reserve, load_data
from latentguard.evaluation import evaluate
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit


def dev_model(splits, attack_name: str, seed: int, params: dict, cache: Path, *, stem: str | None = None,
              clean_model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, object]:
    """The trained (or cached) model and its attack (None for ``attack_name == "clean"``), in eval mode.

    ``stem`` names the cache files (default: the attack's name); ``clean_model`` is handed to attacks that optimise
    their trigger against a clean model (else they train one of their own).
    """
    h, w, c = splits.train.image_shape
    cfg = TrainConfig(epochs=30, lr=0.05, batch_size=64, seed=seed)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("small_cnn", 10, in_channels=c, image_size=h)

    attack = None
    if attack_name != "clean":
        attack = make_attack(attack_name, num_classes=10, image_shape=(c, h, w), target=0, rate=0.1, seed=seed,
                             params=params)
    model = fresh()
    stem = stem or attack_name
    path, attack_path = cache / f"{stem}_{seed}.pt", cache / f"{stem}_{seed}.attack.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        if attack is not None and attack_path.exists():
            attack.load_tensors(torch.load(attack_path, weights_only=True))
        return model.eval(), attack
    cache.mkdir(parents=True, exist_ok=True)
    if attack is None:
        fit(model, splits.train, cfg, device="cpu")
    else:
        attack.train_model(model, AttackContext(splits.train, fresh, cfg, torch.device("cpu"), clean_model=clean_model))
        torch.save(attack.tensors(), attack_path)
    torch.save(model.state_dict(), path)
    return model.eval(), attack


# the paper's removal (the s_p term, no feature shift of the head, no distillation): TAC's default before the head shift; the studies
# run on top of it name it, so they keep measuring what their documents report
PAPER_REMOVAL = {"beta": 1.0, "head_shift": 0.0, "distill": 0.0}


def run_removals(cache: Path, attacks: tuple[tuple[str, dict], ...], seeds: tuple[int, ...],
                 configs: dict[str, dict], *, reserve: float, target: int = 0, threads: int = 1,
                 extra: Callable[[object], dict] | None = None) -> list[dict]:
    """TAC removal with ``target`` given, for every (attack, seed, config label) on the development models.

    The reserve is a class-balanced ``reserve`` share of the training set (seeded by the model's seed). One record
    per run (ACC / ASR / RA and per-class ACC before and after, removal seconds, plus ``extra(result)``) is appended
    to ``cache/records.jsonl`` as it finishes, so a rerun resumes where the last one stopped.
    """
    torch.set_num_threads(threads)
    splits = load_data("digits")
    path = cache / "records.jsonl"
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["attack"], r["seed"], r["config"])] = r
    for attack, params in attacks:
        for seed in seeds:
            model, atk = dev_model(splits, attack, seed, params, cache)
            bset = atk.get_backdoor_test_set(splits.test)
            held = splits.train.subset(clean_reserve(splits.train, reserve, seed=seed))
            base = evaluate(model, splits.test, backdoor_set=bset, device="cpu")
            for label, cfg in configs.items():
                if (attack, seed, label) in done:
                    continue
                t0 = time.perf_counter()
                res = defend("tac", model, held, device="cpu", seed=seed, targets=[target], **cfg)
                seconds = time.perf_counter() - t0
                ev = evaluate(res.model, splits.test, backdoor_set=bset, device="cpu")
                rec = {"attack": attack, "seed": seed, "config": label, "acc_before": base.acc,
                       "asr_before": base.asr, "class_acc_before": base.class_acc, "acc": ev.acc, "asr": ev.asr,
                       "ra": ev.ra, "class_acc": ev.class_acc, "seconds": seconds, **(extra(res) if extra else {})}
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[(attack, seed, label)] = rec
                print(f"{attack} {seed} {label}: ACC {100 * ev.acc:.1f} ASR {100 * ev.asr:.1f} "
                      f"target-class ACC {100 * ev.class_acc[target]:.1f}", flush=True)
    return list(done.values())


def removal_study_main(doc: str, name: str, title: str, intro: str, configs: dict[str, dict],
                       run: Callable[[Path, int], list[dict]], table: Callable[[list[dict]], str]) -> None:
    """The command line of a digits removal study ``benchmarks/{name}.py``: run (or resume) it into its cache, then
    write ``benchmarks/{name}.md`` (title, intro, table, mean seconds per config), keeping the hand-written reading."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(f"runs/{name}"))
    ap.add_argument("--out", type=Path, default=Path(f"benchmarks/{name}.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    records = run(args.cache, args.threads)
    seconds = {label: np.mean([r["seconds"] for r in records if r["config"] == label]) for label in configs}
    text = [f"# {title}", "", intro, "", table(records), "",
            "Mean seconds per removal: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".", ""]
    print(write_keeping_reading(args.out, "\n".join(text)))
