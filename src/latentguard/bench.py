"""The benchmark grid: every defense on every zoo model, resumable, with tables a review would show.

Each (dataset, attack, defense) cell loads the zoo model, gives the defense ONLY the cell's clean reserve
(``reserve_indices.json``), evaluates ACC/ASR/RA on the test set, DER against the undefended model, the
detection outcome and wall seconds, and appends one JSON line to ``results.jsonl``. Finished cells are
skipped on a rerun, so an interrupted grid never loses or double-counts a cell.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from latentguard.errors import LatentGuardError

RESULTS = "results.jsonl"
AUROC_SAMPLES = 1000  # triggered and clean test inputs each, for a per-input score's AUROC


def cell_key(dataset: str, attack: str, defense: str) -> str:
    return f"{dataset}/{attack}/{defense}"


def finished_keys(out: Path) -> set[str]:
    path = out / RESULTS
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: that cell is simply redone
            keys.add(rec["key"])
    return keys


def run_cell(zoo_root: str, dataset: str, data_spec: str, attack: str, defense: str, params: dict[str, Any],
             device: str = "auto", seed: int = 0, cache: str | None = None,
             clean_fraction: float | None = None) -> dict[str, Any]:
    """Defend one zoo model with one defense and measure it (``cache``: a folder keeping the undefended
    model's evaluation, shared by every defense of the cell; ``clean_fraction``: give the defense a
    class-balanced share of the cell's reserve holding this fraction of the training set, seeded)."""
    import torch

    from latentguard import metrics
    from latentguard.attacks import load_attack
    from latentguard.data import load_data
    from latentguard.defenses import make_defense
    from latentguard.evaluation import evaluate
    from latentguard.models import load_model
    from latentguard.zoo import cell_dir, cell_reserve

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cell = cell_dir(zoo_root, dataset, attack)
    model = load_model(str(cell / "model.json"))
    splits = load_data(data_spec)
    reserve = cell_reserve(cell, splits.train)
    if clean_fraction is not None:
        reserve = reserve.subset(reserve_share(reserve, len(splits.train), clean_fraction, seed))
    atk = load_attack(cell / "attack.json") if (cell / "attack.json").exists() else None
    backdoor_set = atk.get_backdoor_test_set(splits.test) if atk else None
    before = _undefended(cell, model, splits.test, backdoor_set, device,
                         None if cache is None else Path(cache) / f"{dataset}-{attack}.json")
    result = make_defense(defense, **params).run(model, reserve, device=device, seed=seed)
    after = evaluate(result.model, splits.test, backdoor_set=backdoor_set, device=device)
    rec: dict[str, Any] = {
        "key": cell_key(dataset, attack, defense), "dataset": dataset, "attack": attack, "defense": defense,
        "acc_before": before.acc, "asr_before": before.asr, "ra_before": before.ra,
        "acc": after.acc, "asr": after.asr, "ra": after.ra, "seconds": result.seconds, "params": result.params,
        "reserve_size": len(reserve), "class_acc_before": before.class_acc, "class_acc": after.class_acc,
    }
    if clean_fraction is not None:
        rec["clean_fraction"] = clean_fraction
    rec["extra"] = _small(result.extra)
    if atk is not None:
        rec["der"] = metrics.defense_effectiveness_rating(before.acc, before.asr, after.acc, after.asr)
    if result.detection is not None:
        det = result.detection
        rec["detected"] = det.backdoored
        rec["flagged"] = det.target_classes
        rec["target"] = atk.spec.target if atk else None
        rec["detection_correct"] = (atk is None and not det.backdoored) or (
            atk is not None and not atk.spec.all_to_all and atk.spec.target in det.target_classes)
        rec["detection"] = {"method": det.method, "norms": det.norms, "scores": det.scores,
                            "threshold": det.threshold, "seconds": det.seconds}
        # which verdict flagged what: the clean reserve's and each probe's indices, when they ran
        rec["detection"].update({k: det.extra[k] for k in ("clean_scores", "alignment_scores", "probe_scores", "noise_probe",
                                                           "smooth_scores", "smooth_probe", "smooth_grid")
                                 if k in det.extra})
    if result.input_score is not None and backdoor_set is not None:
        # a seeded subsample of each side: STRIP costs ``n_superimpose`` forwards per input
        rng = np.random.default_rng(seed)
        i_clean = np.sort(rng.permutation(len(splits.test))[:AUROC_SAMPLES])
        i_bd = np.sort(rng.permutation(len(backdoor_set[0]))[:AUROC_SAMPLES])
        x_clean, _ = splits.test.subset(i_clean).tensors()
        with torch.no_grad():
            s_clean = input_scores(result.input_score, x_clean)
            s_bd = input_scores(result.input_score, backdoor_set[0][i_bd].float() / 255)
        rec["input_auroc_samples"] = [len(i_bd), len(i_clean)]
        rec["input_auroc"] = metrics.auroc(np.concatenate([s_bd, s_clean]),
                                           np.r_[np.ones(len(s_bd)), np.zeros(len(s_clean))])
    return rec


def reserve_share(reserve, train_size: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices into ``reserve`` of a class-balanced share holding ``fraction`` of a ``train_size`` training set."""
    from latentguard.data import clean_reserve

    share = fraction * train_size / len(reserve)
    if not 0.0 < share <= 1.0 + 1e-9:
        raise LatentGuardError(f"a clean fraction of {fraction:g} asks for {fraction * train_size:.0f} images but the "
                               f"zoo cell's reserve holds {len(reserve)}: choose at most "
                               f"{len(reserve) / train_size:.3g}")
    return clean_reserve(reserve, min(share, 1.0), seed=seed)


def _undefended(cell: Path, model, test, backdoor_set, device: str, path: Path | None):
    """The undefended model's evaluation, computed once per zoo model and kept at ``path`` (keyed by the
    weights' hash, so a rebuilt cell is re-evaluated; so is one saved before per-class ACC was recorded)."""
    from latentguard.evaluation import Evaluation, evaluate
    from latentguard.io import sha256_file

    weights = next((cell / n for n in ("model.safetensors", "model.pt") if (cell / n).exists()), None)
    key = sha256_file(weights) if weights is not None and path is not None else None
    if key is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("weights_sha256") == key and saved["evaluation"].get("class_acc") is not None:
                return Evaluation(**saved["evaluation"])
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # recomputed below
    ev = evaluate(model, test, backdoor_set=backdoor_set, device=device)
    if key is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"weights_sha256": key, "evaluation": ev.to_dict()}))
        os.replace(tmp, path)
    return ev


def _small(extra: dict[str, Any], max_chars: int = 3200) -> dict[str, Any]:
    """The JSON-sized part of a defense's ``extra`` (numbers, strings, short lists): what it chose and traced."""
    out = {}
    for key, value in extra.items():
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            continue
        if len(text) <= max_chars and key != "history":
            out[key] = value
    return out


def input_scores(fn, x, batch: int = 512) -> np.ndarray:
    """A per-input score function applied batch-wise, as float64 numpy."""
    return np.concatenate([np.asarray(fn(x[i:i + batch]).detach().cpu(), dtype=np.float64)
                           for i in range(0, len(x), batch)])


def run_grid(zoo_root: str | Path, out: str | Path, datasets: dict[str, str], attacks: Iterable[str],
             defenses: Iterable[str], *, params: dict[str, dict[str, Any]] | None = None, workers: int = 1,
             device: str = "auto", seed: int = 0, clean_fraction: float | None = None,
             log=print) -> list[dict[str, Any]]:
    """Run every missing cell; append each result to ``out/results.jsonl`` as soon as it finishes."""
    from latentguard.zoo import cell_dir, is_done

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = finished_keys(out)
    jobs = []
    for dataset, spec in datasets.items():
        for attack in attacks:
            if not is_done(cell_dir(zoo_root, dataset, attack)):
                log(f"skip {dataset}/{attack}: no finished zoo model")
                continue
            for defense in defenses:
                if cell_key(dataset, attack, defense) not in done:
                    jobs.append((str(zoo_root), dataset, spec, attack, defense, (params or {}).get(defense, {}),
                                 device, seed, str(out / "undefended"), clean_fraction))
    log(f"{len(jobs)} cells to run ({len(done)} already finished)")
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(_record(out, _safe(job), log))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_safe, job) for job in jobs]
            for fut in as_completed(futures):
                results.append(_record(out, fut.result(), log))
    write_tables(out)
    return results


def _safe(job: tuple) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        return run_cell(*job)
    except LatentGuardError as exc:
        _, dataset, _, attack, defense, *_ = job
        return {"key": cell_key(dataset, attack, defense), "dataset": dataset, "attack": attack,
                "defense": defense, "error": str(exc), "seconds": time.perf_counter() - t0}


def _record(out: Path, rec: dict[str, Any], log) -> dict[str, Any]:
    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if "error" in rec:
        log(f"{rec['key']}: error: {rec['error']}")
    else:
        asr = "–" if rec.get("asr") is None else f"{100 * rec['asr']:.1f}"
        log(f"{rec['key']}: ACC {100 * rec['acc']:.1f} ASR {asr} ({rec['seconds']:.0f}s)")
    return rec


def load_results(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / RESULTS
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[rec["key"]] = rec  # the last record of a key wins
    return list(rows.values())


def write_tables(out: str | Path) -> Path:
    """CSV of every cell and a Markdown table per dataset (rows defenses, columns attacks, mean DER/rank)."""
    import csv

    out = Path(out)
    rows = [r for r in load_results(out) if "error" not in r]
    cols = ["dataset", "attack", "defense", "acc_before", "asr_before", "acc", "asr", "ra", "der", "detected",
            "detection_correct", "input_auroc", "seconds"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["key"]):
            w.writerow(r)
    md = ["# Benchmark results", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        attacks = sorted({r["attack"] for r in sub})
        defenses = sorted({r["defense"] for r in sub})
        ranks = _mean_ranks(sub, attacks, defenses)
        md += [f"## {dataset}", "", "Cells: ACC / ASR after defense (%); mean DER over attacks; mean rank by DER "
               "(1 = best).", "",
               "| defense | " + " | ".join(attacks) + " | mean DER | mean rank | mean s |",
               "|---" * (len(attacks) + 4) + "|"]
        base = {r["attack"]: r for r in sub}
        md.append("| no defense | " + " | ".join(
            f"{100 * base[a]['acc_before']:.1f} / {_pct(base[a].get('asr_before'))}" for a in attacks) + " | – | – | – |")
        for d in defenses:
            cells, ders, secs = [], [], []
            for a in attacks:
                r = next((r for r in sub if r["attack"] == a and r["defense"] == d), None)
                if r is None:
                    cells.append("–")
                    continue
                cells.append(f"{100 * r['acc']:.1f} / {_pct(r.get('asr'))}")
                if r.get("der") is not None:
                    ders.append(r["der"])
                secs.append(r["seconds"])
            md.append(f"| {d} | " + " | ".join(cells) + f" | {np.mean(ders):.3f} | {ranks.get(d, float('nan')):.2f} "
                      f"| {np.mean(secs):.0f} |" if ders else f"| {d} | " + " | ".join(cells) + " | – | – | – |")
        md.append("")
        if dataset == "cifar10":
            md += published_comparison(sub)
    path = out / "results.md"
    path.write_text("\n".join(md) + "\n")
    return path


def published_comparison(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: our CIFAR-10 ACC / ASR beside BackdoorBench's published figures, for the (defense, attack)
    cells both have; nothing when no cell is shared."""
    from latentguard.published import (
        BACKDOORBENCH_CIFAR10,
        BACKDOORBENCH_CIFAR10_DEFENSES,
        BACKDOORBENCH_SOURCE,
    )

    ours = {(r["defense"], r["attack"]): r for r in rows}
    attacks = sorted({a for d, a in ours if a in BACKDOORBENCH_CIFAR10})
    defenses = sorted({d for d, a in ours if (d, a) in _published_cells(BACKDOORBENCH_CIFAR10_DEFENSES)})
    if not defenses:
        return []
    md = ["### Beside BackdoorBench's published figures", "",
          f"Each cell: ours · BackdoorBench (ACC / ASR %). BackdoorBench: {BACKDOORBENCH_SOURCE}, width 64, "
          "100 epochs; ours: the zoo's width-16, 10-epoch CPU models and the CPU budgets each defense's record "
          "lists, so the comparison is of behaviour (does the defense remove this backdoor?), not of accuracy.", "",
          "| defense | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    base = {r["attack"]: r for r in rows}
    md.append("| no defense | " + " | ".join(
        f"{100 * base[a]['acc_before']:.1f} / {_pct(base[a].get('asr_before'))} · "
        f"{BACKDOORBENCH_CIFAR10[a][0]:.1f} / {BACKDOORBENCH_CIFAR10[a][1]:.1f}" for a in attacks) + " |")
    for d in defenses:
        cells = []
        for a in attacks:
            r, bb = ours.get((d, a)), BACKDOORBENCH_CIFAR10_DEFENSES.get(d, {}).get(a)
            mine = "–" if r is None else f"{100 * r['acc']:.1f} / {_pct(r.get('asr'))}"
            cells.append(f"{mine} · {'–' if bb is None else f'{bb[0]:.1f} / {bb[1]:.1f}'}")
        md.append(f"| {d} | " + " | ".join(cells) + " |")
    return md + [""]


def _published_cells(table: dict[str, dict[str, tuple[float, float]]]) -> set[tuple[str, str]]:
    return {(d, a) for d, row in table.items() for a in row}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _mean_ranks(rows: list[dict[str, Any]], attacks: list[str], defenses: list[str]) -> dict[str, float]:
    """Mean over attacks of each defense's rank by DER (ties share the average rank)."""
    from scipy.stats import rankdata

    per: dict[str, list[float]] = {d: [] for d in defenses}
    for a in attacks:
        sub = [(r["defense"], r["der"]) for r in rows if r["attack"] == a and r.get("der") is not None]
        if not sub:
            continue
        ranks = rankdata([-der for _, der in sub])
        for (d, _), rk in zip(sub, ranks, strict=True):
            per[d].append(float(rk))
    return {d: float(np.mean(v)) for d, v in per.items() if v}
