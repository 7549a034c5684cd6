"""Third development set for TAC's verdict: a floor on the MAD of the log flip norms (digits, 20 clean seeds).

A rebuilt CIFAR-10 clean zoo model put class 1 at a per-class anomaly index of 8.3: its ‖s_1‖ is 16.2 against
18.1–20.5 for the other nine classes, which agree so closely (MAD of the log-norms 0.017, against 0.030–0.087 on
the zoo models of ``tac_threshold.json``) that a 19 % gap reads as an outlier. The MAD of ten values rests on the fifth and sixth
smallest deviations, so a tight cluster by chance makes any modest gap extreme. A floor on the MAD (on the log
scale: a relative spread) bounds that: a class must sit at least α · 1.4826 · floor below the median (log) to be
flagged, however closely the others agree.

This script measures, on development models never used elsewhere, how often TAC's default verdict flags a clean
model and what floors cost in detection: small_cnn on the embedded digits data (30 epochs, width 32, lr 0.05,
target 0, 10 % poisoning), 20 clean models (seeds 40–59) and 3 each of BadNets, Blend, WaNet and LF (seeds
40–42). For every model it stores the raw statistics of all three verdicts (clean reserve, white probe σ 0.1,
smooth probe σ 0.3 on a 4×4 lattice): the per-class norms ‖s_k‖ and the pairwise statistic. Any rule is then
evaluated on those numbers without retraining; ``--zoo`` adds the stored zoo statistics
(``benchmarks/tac_threshold.json``) and ``--extra`` further records written by ``--record`` on zoo cells.

    python benchmarks/tac_mad_floor.py [--cache DIR] [--out benchmarks/tac_mad_floor.md]
    python benchmarks/tac_mad_floor.py --record ZOO/cifar10/clean --data cifar10:ARCHIVE --extra-out F.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from digits_dev import dev_model

from latentguard.data import clean_reserve, load_data
from latentguard.data.split import stratified_split
from latentguard.defenses.base import low_outlier_report
from latentguard.defenses.tac import (
    CLASS_MARGIN,
    DEFAULT_NOISE_PROBE,
    DEFAULT_THRESHOLD,
    PROBE_FRACTION,
    SMOOTH_PROBE_GRID,
    SMOOTH_PROBE_SIGMA,
    clean_latents,
    feature_model,
    noisy_copy,
    pairwise_statistic,
)
from latentguard.evaluation import evaluate
from latentguard.latent.qp import minimal_flip_perturbations

# (label, attack, seeds, attack parameters)
MODELS = (("clean", "clean", range(40, 60), {}), ("badnets", "badnets", range(40, 43), {}),
          ("blend", "blend", range(40, 43), {}), ("wanet", "wanet", range(40, 43), {"s": 3.0}),
          ("lf", "lf", range(40, 43), {}))
VERDICTS = ("clean", "white", "smooth")
DEFAULT_VERDICTS = ("clean", "white")  # the library's default: the smooth probe is opt-in
FLOORS = (0.0, 0.01, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05)
LEARNED = 0.5  # a backdoored model counts as having learned its backdoor at this test ASR


def raw_statistics(model: torch.nn.Module, reserve) -> dict[str, dict[str, list[float]]]:
    """Per verdict (clean reserve, white probe, smooth probe at the library's σ and share): ‖s_k‖ and the pairwise
    statistic (geometric mean over sources of ‖s_{a→k}‖), before any outlier score."""
    dev = torch.device("cpu")
    fm = feature_model(model, reserve, dev)
    head = fm.head
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)
    probed = reserve.subset(stratified_split(reserve.y, PROBE_FRACTION)[1])
    images = {"clean": reserve, "white": noisy_copy(probed, DEFAULT_NOISE_PROBE),
              "smooth": noisy_copy(probed, SMOOTH_PROBE_SIGMA, grid=SMOOTH_PROBE_GRID)}
    out = {}
    for name, imgs in images.items():
        z = clean_latents(fm, imgs, device=dev)
        class_norms = minimal_flip_perturbations(z, weight, bias).norms
        pairwise, _ = pairwise_statistic(z, imgs.y, weight, bias)
        out[name] = {"class": [float(v) for v in class_norms], "pairwise": [float(v) for v in pairwise]}
    return out


def index(values: list[float], floor: float) -> np.ndarray:
    """The library's signed MAD anomaly index of the log-statistic with the MAD floored at ``floor`` (log scale)."""
    return np.asarray(low_outlier_report("tac", np.asarray(values), DEFAULT_THRESHOLD, log=True, min_mad=floor).scores)


def verdict_scores(stats: dict[str, list[float]], class_floor: float, pairwise_floor: float) -> np.ndarray:
    """TAC's "both" score: max(pairwise index, per-class index − margin), each MAD floored at its own value."""
    return np.maximum(index(stats["class"], class_floor) - CLASS_MARGIN, index(stats["pairwise"], pairwise_floor))


def flags(record: dict, class_floor: float, pairwise_floor: float, verdicts=VERDICTS) -> list[int]:
    scores = np.max([verdict_scores(record["stats"][v], class_floor, pairwise_floor)
                     for v in verdicts if v in record["stats"]], axis=0)
    return [int(k) for k in np.flatnonzero(scores > DEFAULT_THRESHOLD)]


def clean_mad(record: dict, statistic: str = "class") -> float:
    v = np.log(np.asarray(record["stats"]["clean"][statistic]))
    return float(np.median(np.abs(v - np.median(v))))


def zoo_records(path: Path) -> list[dict]:
    """The zoo's clean-reserve statistics from ``tac_threshold.json`` (the probes' norms were not stored there)."""
    rows = json.loads(path.read_text())
    by: dict[tuple, dict] = {}
    for r in rows:
        if r["quantile"] != 1.0 or r["statistic"] == "both":
            continue
        rec = by.setdefault((r["dataset"], r["cell"]), {"label": f"{r['dataset']} {r['cell']}", "seed": 0,
                                                         "target": r["target"], "asr": r["asr"],
                                                         "stats": {"clean": {}}})
        rec["stats"]["clean"][r["statistic"]] = r["norms"]
    return list(by.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/tac_mad_floor"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/tac_mad_floor.md"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zoo", type=Path, default=Path("benchmarks/tac_threshold.json"))
    ap.add_argument("--extra", type=Path, action="append", default=[],
                    help="zoo records written by --record (all three verdicts), added to the zoo table")
    ap.add_argument("--record", type=Path, default=None, help="a zoo cell directory: write its raw statistics")
    ap.add_argument("--data", default=None, help="the data spec of --record's dataset")
    ap.add_argument("--label", default=None, help="--record's row label")
    ap.add_argument("--extra-out", type=Path, default=None)
    ap.add_argument("--same-as", default=None,
                    help="the zoo row (e.g. 'gtsrb badnets') of tac_threshold.json that --record's model rebuilds to "
                         "the same weights: the recorded row replaces it instead of counting twice")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.record is not None:
        record_zoo_cell(args)
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    splits = load_data("digits")
    reserve = splits.train.subset(clean_reserve(splits.train, 0.2, seed=0))
    json_path = args.out.with_suffix(".json")
    done = {(r["label"], r["seed"]): r for r in json.loads(json_path.read_text())["models"]} if json_path.exists() else {}
    records = []
    for label, attack_name, seeds, params in MODELS:
        for seed in seeds:
            if (label, seed) in done:
                records.append(done[(label, seed)])
                continue
            t0 = time.perf_counter()
            model, attack = dev_model(splits, attack_name, seed, params, args.cache)
            ev = evaluate(model, splits.test, attack, device="cpu")
            records.append({"label": label, "seed": seed, "target": None if attack is None else 0,
                            "acc": ev.acc, "asr": ev.asr, "stats": raw_statistics(model, reserve)})
            json_path.write_text(json.dumps({"models": records}, indent=1) + "\n")
            print(label, seed, f"ACC {ev.acc:.3f} ASR {ev.asr}", flags(records[-1], 0.0, 0.0),
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    extra = [r for p in args.extra for r in json.loads(p.read_text())["models"]]
    replaced = {r.get("same_as") for r in extra}
    zoo = [r for r in zoo_records(args.zoo) if r["label"] not in replaced] + extra
    args.out.write_text(render(records, zoo))


def record_zoo_cell(args: argparse.Namespace) -> None:
    """Raw statistics of one zoo cell on its own reserve, for ``--extra``."""
    from latentguard.models import load_model
    from latentguard.zoo import cell_reserve, spec_target

    cell = args.record
    model = load_model(str(cell / "model.json")).eval()
    reserve = cell_reserve(cell, load_data(args.data).train)
    record = json.loads((cell / "metrics.json").read_text())
    spec = record["parameters"].get("attack")
    seed = record["parameters"].get("zoo", {}).get("seed", 0)
    rec = {"label": args.label or f"{cell.parent.name} {cell.name}", "seed": seed, "target": spec_target(spec),
           "asr": record.get("metrics", {}).get("asr"), "stats": raw_statistics(model, reserve)}
    if args.same_as:
        rec["same_as"] = args.same_as
    out = args.extra_out or Path(f"{cell.parent.name}_{cell.name}_stats.json")
    out.write_text(json.dumps({"models": [rec]}, indent=1) + "\n")
    print(rec["label"], flags(rec, 0.0, 0.0), f"class MAD {clean_mad(rec):.4f}")


def _summary(records: list[dict], class_floor: float, pairwise_floor: float,
             verdicts=VERDICTS) -> tuple[str, str, str]:
    clean = [r for r in records if r["target"] is None]
    learned = [r for r in records if r["target"] is not None and r["asr"] is not None and r["asr"] >= LEARNED]
    flagged = {id(r): flags(r, class_floor, pairwise_floor, verdicts) for r in records}
    clean_flagged = sum(bool(flagged[id(r)]) for r in clean)
    hits = sum(r["target"] in flagged[id(r)] for r in learned)
    wrong = sum(any(k != r["target"] for k in flagged[id(r)]) for r in learned)
    return f"{clean_flagged} of {len(clean)}", f"{hits} of {len(learned)}", f"{wrong}"


def _sources(record: dict) -> str:
    """Which verdict and statistic raise each flag without a floor, with that statistic's MAD and gap (log)."""
    out = []
    for verdict, stats in record["stats"].items():
        for name, key, margin in (("class", "class", CLASS_MARGIN), ("pairwise", "pairwise", 0.0)):
            raw = np.asarray(stats[key], dtype=np.float64)
            v = np.log(np.maximum(raw, 1e-12 * raw.max()))  # zero norms clamped as the library does
            med = float(np.median(v))
            mad = float(np.median(np.abs(v - med)))
            scores = index(stats[key], 0.0) - margin
            for k in np.flatnonzero(scores > DEFAULT_THRESHOLD):
                mark = "" if k == record["target"] else " (false)"
                out.append(f"{k}{mark}: {verdict}/{name} {scores[k]:.1f}, MAD {mad:.3f}, gap {med - v[k]:.2f}")
    return "; ".join(out) or "–"


def render(records: list[dict], zoo: list[dict]) -> str:
    chosen = 0.03
    lines = ["# TAC: a floor on the MAD of the log flip-norm statistics (third development set)", "",
             "Produced by `python benchmarks/tac_mad_floor.py` (see its docstring). Digits development models: "
             "small_cnn, 30 epochs, 20 clean models (seeds 40–59), 3 each of BadNets, Blend, WaNet, LF (seeds 40–42), "
             f"target 0, 20 % clean reserve. The verdict is TAC's default (α = {DEFAULT_THRESHOLD:g}; per class the "
             f"larger of the pairwise index and the per-class index − {CLASS_MARGIN:g}; a class is flagged when the clean "
             "reserve, the white probe or the smooth probe flags it), with the MAD of each log-statistic floored. "
             "A gap is the class's distance below the median on the log scale (0.16 ≈ 16 % smaller).", "",
             "## Per model", "",
             "MADs of the clean-reserve verdict; flags without a floor (the previous default) and with the floor "
             f"{chosen:g} on both statistics; then which verdict and statistic raised each flag without the floor.", "",
             "| model | seed | ACC / ASR % | MAD class | MAD pairwise | flagged, no floor | flagged, floor "
             f"{chosen:g} | floor {chosen:g}, no smooth probe | flags without the floor: class, verdict/statistic, "
             "index, MAD, gap |", "|---" * 9 + "|"]
    for r in records + zoo:
        asr = "–" if r.get("asr") is None else f"{100 * r['asr']:.1f}"
        acc = f"{100 * r['acc']:.1f}" if "acc" in r else "–"
        lines.append(f"| {r['label']} | {r['seed']} | {acc} / {asr} | {clean_mad(r):.4f} | "
                     f"{clean_mad(r, 'pairwise'):.4f} | {flags(r, 0.0, 0.0)} | {flags(r, chosen, chosen)} | "
                     f"{flags(r, chosen, chosen, DEFAULT_VERDICTS)} | {_sources(r)} |")
    lines += ["", "Zoo rows from `benchmarks/tac_threshold.json` carry the clean-reserve verdict only (the probes' "
              "norms were not stored there); the probes flag CIFAR-10 and GTSRB Blend at indices of 414 and 247 "
              "(`benchmarks/tac_perturbed_reserve.md`), far beyond what any floor here changes. Rows marked "
              "(rebuilt) were recorded with `--record` on models rebuilt by this version's `zoo build` and carry all "
              "three verdicts; a rebuilt model with the same weights as a stored row replaces it (GTSRB BadNets); "
              "the rebuilt clean models differ from the stored ones and count beside them.", "",
              "## Summary by floor", "",
              "Learned backdoors: ASR ≥ 50 %. `non-target` counts backdoored models with a flag on another class.", "",
              "| floor on | floor | digits: clean models flagged | digits: targets named | digits: non-target | "
              "zoo: clean models flagged | zoo: targets named | zoo: non-target |", "|---" * 8 + "|"]
    settings = [("both statistics", f, f) for f in FLOORS]
    settings += [("per-class only", chosen, 0.0), ("pairwise only", 0.0, chosen)]
    for on, cf, pf in settings:
        d, z = _summary(records, cf, pf), _summary(zoo, cf, pf)
        lines.append(f"| {on} | {max(cf, pf):g} | " + " | ".join(d) + " | " + " | ".join(z) + " |")
    lines += ["", f"## Summary by verdicts, floor {chosen:g} on both statistics", "",
              "The floor was chosen with all three verdicts (the default of its time). The smooth probe is off by "
              "default since: it names one more target here (WaNet seed 40) and none on the zoo, and raises the only "
              "clean flags left (digits clean seed 53; the new CIFAR-10 clean model, seed 1).", "",
              "| verdicts | digits: clean models flagged | digits: targets named | digits: non-target | "
              "zoo: clean models flagged | zoo: targets named | zoo: non-target |", "|---" * 7 + "|"]
    for verdicts in (("clean",), DEFAULT_VERDICTS, ("clean", "smooth"), VERDICTS):
        d, z = _summary(records, chosen, chosen, verdicts), _summary(zoo, chosen, chosen, verdicts)
        lines.append(f"| {' + '.join(verdicts)} | " + " | ".join(d) + " | " + " | ".join(z) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
