"""Six studies of TAC / FIRE on the embedded digits data, each written as Markdown + JSON + PNG.

``poison_rate``  BadNets and Blend at 1 / 5 / 10 % poisoning: undefended, TAC detection and removal, FIRE.
``beta_alpha``   TAC removal weight β, TAC detection threshold α (scores reused, no retraining), FIRE strength α.
``two_target``   two BadNets backdoors (targets 0 and 5, disjoint 5 % subsets): detection, removal, FIRE.
``all_to_all``   BadNets y → y+1: per-class TAC detection and the pairwise QP ‖s_{a→k}‖ over all C(C−1) pairs.
``adaptive``     BadNets trained with a penalty that keeps a lower bound of ‖s_t‖ near the class median.
``nc_vs_tac``    Neural Cleanse vs TAC detection: accuracy and wall time on the same models.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/studies_digits.py [--studies a,b] [--seeds 3]
[--out benchmarks/studies] [--threads 1] [--epochs 30]``. Every finished (study, config, seed) record is appended
to ``OUT/<study>.jsonl`` and skipped on a rerun; the tables, JSON and plots are rebuilt from those records.
Models are trained as ``benchmarks/attacks_digits.py`` does (small_cnn, SGD lr 0.05, batch 64, 10 % poisoning,
target 0, WaNet with s = 3) and kept in memory, so studies run together share them. Defenses get only a clean
reserve: 10 % of the clean training split, class-balanced, drawn with the model's seed (as in
``tests/_defense_util.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.api import defend
from latentguard.attacks import Attack, AttackContext, make_attack
from latentguard.data import Images, clean_reserve, load_data
from latentguard.defenses.base import DetectionReport
from latentguard.defenses.tac import DEFAULT_THRESHOLD, feature_model
from latentguard.device import seed_everything
from latentguard.evaluation import evaluate
from latentguard.latent.outliers import anomaly_index
from latentguard.latent.qp import minimal_flip_perturbations, pairwise_flip_perturbations
from latentguard.models import build_model, extract_features, split_model
from latentguard.train import TrainConfig, fit

STUDIES = ("poison_rate", "beta_alpha", "two_target", "all_to_all", "adaptive", "nc_vs_tac")
DEFAULT_OUT = Path("benchmarks/studies")
CPU = torch.device("cpu")
TARGET = 0  # the all-to-one target of every attack except the two-target model's second backdoor
RATE = 0.1  # poisoning rate unless a study varies it
RESERVE = 0.1  # fraction of the clean training split given to the defenses
ATTACK_PARAMS: dict[str, dict[str, Any]] = {"wanet": {"s": 3.0}}  # as attacks_digits.py (s = 0.5 is too weak at 16 px)
RATES = (0.01, 0.05, 0.1)
BETAS = (0.25, 0.5, 1.0, 2.0, 4.0)
THRESHOLDS = (2.0, 3.0, 4.0, 5.0, 6.0)
FIRE_ALPHAS: tuple[float | None, ...] = (None, 0.5, 1.0, 2.0, 4.0, 8.0)  # None: FIRE's default (chosen by CV)
DETECT_ATTACKS = ("badnets", "blend", "sig", "wanet")
EFFECTIVE_ASR = 0.5  # a backdoor counts as learned (for detection rates) when its undefended ASR reaches this
INTACT_ACC = 0.9  # an adaptive model whose clean ACC falls below this has collapsed (the attack failed)
MIN_CLEAN_SEEDS = 5  # clean models for the false-alarm rate (at least this many, more with --seeds)
LAMBDAS = (0.0, 0.1, 1.0, 10.0)
# the two backdoors of ``two_target``: (name, target, BadNets params), each on its own 5 % of the training set
TWO_TARGET = (("t0", 0, {"position": "bottom-right", "pattern": "white"}),
              ("t5", 5, {"position": "top-left", "pattern": "checkerboard"}))
TWO_TARGET_RATE = 0.05

BackdoorSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # triggered images, attack labels, true labels
Record = dict[str, Any]


# ----------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """Which model to train: ``attack`` None = clean; ``two_target`` / ``lam`` > 0 are the special attackers."""

    attack: str | None = None
    rate: float = RATE
    all_to_all: bool = False
    two_target: bool = False
    lam: float = 0.0  # λ of the adaptive attacker's penalty


@dataclass
class Trained:
    """A trained model, its backdoor test set(s) by name ("" = the only one) and its all-to-one target(s)."""

    model: nn.Module
    triggers: dict[str, BackdoorSet]
    targets: list[int]
    seconds: float


class Lab:
    """Data, training recipe, clean reserves and an in-memory cache of trained models (shared by studies)."""

    def __init__(self, epochs: int) -> None:
        self.splits = load_data("digits")
        self.epochs = epochs
        h, w, c = self.splits.train.image_shape
        self.image_shape = (c, h, w)
        self.num_classes = self.splits.train.num_classes
        self._models: dict[tuple[ModelSpec, int], Trained] = {}
        self._reserves: dict[int, Images] = {}

    def config(self, seed: int) -> TrainConfig:
        """The training recipe of attacks_digits.py."""
        return TrainConfig(epochs=self.epochs, lr=0.05, batch_size=64, seed=seed)

    def fresh(self, seed: int) -> nn.Module:
        """An untrained small_cnn (default width 32), initialised from ``seed``."""
        seed_everything(seed)
        c, h, _ = self.image_shape
        return build_model("small_cnn", self.num_classes, in_channels=c, image_size=h)

    def attack(self, name: str, seed: int, *, target: int = TARGET, rate: float = RATE, all_to_all: bool = False,
               params: dict[str, Any] | None = None) -> Attack:
        """A registered attack on digits (WaNet with s = 3 unless ``params`` say otherwise)."""
        return make_attack(name, num_classes=self.num_classes, image_shape=self.image_shape, target=target,
                           rate=rate, all_to_all=all_to_all, seed=seed,
                           params=ATTACK_PARAMS.get(name, {}) if params is None else params)

    def reserve(self, seed: int) -> Images:
        """The defender's clean reserve: 10 % of the clean training split, class-balanced, drawn with ``seed``."""
        if seed not in self._reserves:
            train = self.splits.train
            self._reserves[seed] = train.subset(clean_reserve(train, RESERVE, seed=seed))
        return self._reserves[seed]

    def trained(self, spec: ModelSpec, seed: int) -> Trained:
        """The model of ``spec`` trained with ``seed`` (once per process)."""
        key = (spec, seed)
        if key not in self._models:
            t0 = time.perf_counter()
            model, triggers, targets = self._train(spec, seed)
            self._models[key] = Trained(model.eval(), triggers, targets, time.perf_counter() - t0)
            fields = {k: v for k, v in dataclasses.asdict(spec).items() if v != getattr(ModelSpec(), k)}
            print(f"  trained {fields or 'clean'} seed {seed} in {self._models[key].seconds:.0f}s", flush=True)
        return self._models[key]

    def _train(self, spec: ModelSpec, seed: int) -> tuple[nn.Module, dict[str, BackdoorSet], list[int]]:
        """Train the model of ``spec``: clean, two-target, adaptive or through the attack's own ``train_model``."""
        train, test = self.splits.train, self.splits.test
        model = self.fresh(seed)
        cfg = self.config(seed)
        if spec.two_target:
            attacks = [self.attack("badnets", seed, target=t, rate=TWO_TARGET_RATE, params=p) for _, t, p in TWO_TARGET]
            fit(model, disjoint_poison(train, attacks, seed)[0], cfg, device=CPU)
            sets = {name: a.get_backdoor_test_set(test) for (name, _, _), a in zip(TWO_TARGET, attacks, strict=True)}
            return model, sets, [t for _, t, _ in TWO_TARGET]
        if spec.attack is None:
            fit(model, train, cfg, device=CPU)
            return model, {}, []
        attack = self.attack(spec.attack, seed, rate=spec.rate, all_to_all=spec.all_to_all)
        if spec.lam > 0:
            train_adaptive(model, attack, train, cfg, spec.lam)
        else:
            attack.train_model(model, AttackContext(train, lambda: self.fresh(seed), cfg, CPU))
        return model, {"": attack.get_backdoor_test_set(test)}, [] if spec.all_to_all else [attack.spec.target]


def disjoint_poison(train: Images, attacks: Sequence[Attack], seed: int) -> tuple[Images, list[np.ndarray]]:
    """Poison ``train`` with several all-to-one attacks on disjoint subsets (each ``rate`` × N of the images
    whose label is not its target), stamping each trigger on the clean image and relabelling to its target."""
    rng = np.random.default_rng(seed)
    x, y = train.x.copy(), train.y.copy()
    used = np.zeros(len(train), dtype=bool)
    chosen = []
    for attack in attacks:
        cand = np.setdiff1d(attack.candidate_indices(train.y), np.flatnonzero(used))
        idx = np.sort(rng.choice(cand, size=int(round(attack.spec.rate * len(train))), replace=False))
        x[idx] = attack.apply_images(train, idx)
        y[idx] = attack.spec.target
        used[idx] = True
        chosen.append(idx)
    return dataclasses.replace(train, x=x, y=y), chosen


# ----------------------------------------------------------------------------------------------- adaptive attacker
def flip_lower_bounds(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """r_k = max_i max_{j≠k} max(0, (w_j − w_k)ᵀz_i + b_j − b_k) / ‖w_k − w_j‖ for every class k (C,).

    The distance from the worst latent z_i to the half-space of ONE constraint of TAC's QP; since s_k must
    satisfy all of them, r_k ≤ ‖s_k‖ (quantile 1). Differentiable almost everywhere (a max of linear maps).
    """
    m = z @ weight.T + bias  # N×C logits m_ij
    gap = m[:, None, :] - m[:, :, None]  # [i, k, j] = m_ij − m_ik
    sq = (weight[:, None, :] - weight[None, :, :]).pow(2).sum(-1)  # ‖w_k − w_j‖², zero on the diagonal
    dist = torch.sqrt(sq + torch.eye(sq.shape[0], device=sq.device))  # the diagonal's gap is 0: any divisor
    return (gap / dist).clamp_min(0).amax(dim=(0, 2))


def detector_penalty(r: torch.Tensor, target: int, eps: float = 1e-6) -> torch.Tensor:
    """Hinge max(0, log median_k r_k − log r_t)²: zero once the target's bound is no smaller than the median."""
    return (torch.log(torch.quantile(r, 0.5) + eps) - torch.log(r[target] + eps)).clamp_min(0).pow(2)


def train_adaptive(model: nn.Module, attack: Attack, train: Images, cfg: TrainConfig, lam: float) -> None:
    """BadNets poisoning (the attack's static poisoned set) trained with CE + λ·detector_penalty(r) where r is
    computed on the clean latents of each batch. The poisoned flag travels in the label (y + C), which only
    this loss reads, so the batches, augmentation and optimiser are exactly those of the one training loop."""
    poisoned_set, idx = attack.get_poisoned_dataset(train)
    c = train.num_classes
    y = poisoned_set.y.astype(np.int64).copy()
    y[idx] += c
    x = torch.from_numpy(np.ascontiguousarray(poisoned_set.x.transpose(0, 3, 1, 2)))
    fm = split_model(model, example_input=x[:2].float() / 255)
    target = attack.spec.target

    def loss_fn(_m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        clean = yb < c
        z, logits = fm.features_and_logits(xb)
        loss = F.cross_entropy(logits, yb % c)
        if clean.sum() > 0:
            r = flip_lower_bounds(z[clean], fm.head.weight, fm.head.bias)
            loss = loss + lam * detector_penalty(r, target)
        return loss

    fit(fm, (x, torch.from_numpy(y)), cfg, device=CPU, loss_fn=loss_fn)


# ----------------------------------------------------------------------------------------------- measuring
def measure(model: nn.Module, lab: Lab, trained: Trained) -> Record:
    """ACC on the clean test split; ASR / RA on each backdoor test set (keys asr, ra or asr_<name>, ra_<name>)."""
    out: Record = {"acc": evaluate(model, lab.splits.test, device=CPU).acc}
    for name, bset in trained.triggers.items():
        ev = evaluate(model, lab.splits.test, backdoor_set=bset, device=CPU)
        sfx = f"_{name}" if name else ""
        out[f"asr{sfx}"], out[f"ra{sfx}"] = ev.asr, ev.ra
    return out


def detection_fields(report: DetectionReport, targets: Sequence[int]) -> Record:
    """A detector's verdict against the true all-to-one target(s)."""
    scores = np.asarray(report.scores)
    others = np.delete(scores, list(targets))
    return {"flagged": report.target_classes, "scores": report.scores, "norms": report.norms,
            "threshold": report.threshold, "seconds": report.seconds,
            "target_scores": [float(scores[t]) for t in targets],
            "max_other": float(others.max()) if others.size else None,
            "targets_flagged": sum(t in report.target_classes for t in targets),
            "false_flags": [k for k in report.target_classes if k not in targets]}


def run_defense(lab: Lab, trained: Trained, seed: int, name: str, *, score: bool = True, **params: Any) -> Record:
    """Run a registered defense (through ``latentguard.api.defend``) on the model with the clean reserve."""
    result = defend(name, trained.model, lab.reserve(seed), device=CPU, seed=seed, **params)
    out: Record = {"seconds": result.seconds}
    if result.detection is not None:
        out["detection"] = detection_fields(result.detection, trained.targets)
    for key in ("removal", "targets", "alphas", "quantile", "initial_norms"):
        if key in result.extra:
            out[key] = result.extra[key]
    if score:
        out.update(measure(result.model, lab, trained))
    return out


def tac_detect(lab: Lab, trained: Trained, seed: int, **params: Any) -> Record:
    """TAC detection only (defaults: α = 4 on the MAD index of log ‖s_k‖, quantile 1)."""
    return run_defense(lab, trained, seed, "tac", score=False, detect_only=True, **params)["detection"]


def latents(model: nn.Module, images: Images) -> tuple[torch.Tensor, nn.Linear]:
    """Penultimate latents z of ``images`` and the head (W, b), as TAC sees them."""
    fm = feature_model(model, images, CPU)
    return extract_features(fm, images.tensors()[0], device=CPU)[0], fm.head


def pair_analysis(model: nn.Module, reserve: Images) -> Record:
    """The pairwise QP ‖s_{a→k}‖ on the reserve; MAD anomaly index of the log-norms over the C(C−1) pairs and
    the rank (1 = smallest norm) of each true all-to-all pair (a, a+1 mod C), overall and within its source row."""
    z, head = latents(model, reserve)
    sol = pairwise_flip_perturbations(z, reserve.y, head.weight.detach(), head.bias.detach())
    c = sol.norms.shape[0]
    off = ~np.eye(c, dtype=bool)
    values = sol.norms[off]
    index = np.full((c, c), np.nan)
    index[off] = anomaly_index(values, log=True)
    true = [(a, (a + 1) % c) for a in range(c)]
    return {"norms": _nan_to_none(sol.norms), "index": _nan_to_none(index),
            "true_rank": [int(1 + (values < sol.norms[a, k]).sum()) for a, k in true],
            "true_row_rank": [int(1 + (sol.norms[a, off[a]] < sol.norms[a, k]).sum()) for a, k in true],
            "true_index": [float(index[a, k]) for a, k in true],
            "max_other_index": float(max(index[a, k] for a in range(c) for k in range(c)
                                         if a != k and (a, k) not in true)),
            "kkt_max": float(np.nanmax(sol.kkt_residual))}


def _nan_to_none(a: np.ndarray) -> list:
    """A matrix as nested lists with non-finite entries as None (strict JSON)."""
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in a]


# ----------------------------------------------------------------------------------------------- records
class Store:
    """The finished records of one study in ``OUT/<study>.jsonl`` (append-only; a rerun skips their keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run: redone
                self.records[rec["key"]] = rec

    def ensure(self, config: str, seed: int, make: Callable[[], Record]) -> None:
        """Compute and append the record of (config, seed) unless it is already there."""
        key = f"{config}/seed{seed}"
        if key in self.records:
            return
        t0 = time.perf_counter()
        rec = {"key": key, "config": config, "seed": seed, **make(), "wall_seconds": time.perf_counter() - t0}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = rec
        print(f"  {self.path.stem}: {key} done ({rec['wall_seconds']:.0f}s)", flush=True)

    def get(self, config: str, seeds: Sequence[int]) -> list[Record]:
        """The finished records of ``config`` for ``seeds`` (missing ones skipped)."""
        return [self.records[k] for k in (f"{config}/seed{s}" for s in seeds) if k in self.records]


def pluck(records: Sequence[Record], path: str) -> list[Any]:
    """Values at a dotted path (``tac.acc``, ``detection.target_scores.0``) of every record that has it."""
    out = []
    for rec in records:
        v: Any = rec
        for part in path.split("."):
            if isinstance(v, list) and part.isdigit() and int(part) < len(v):
                v = v[int(part)]
            elif isinstance(v, dict) and part in v:
                v = v[part]
            else:
                v = None
                break
        if v is not None:
            out.append(v)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (percent by default), – when empty."""
    m, s = mean_std(values)
    return "–" if math.isnan(m) else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def frac(hits: Sequence[bool]) -> str:
    """``k/n``: how many of ``hits`` are true."""
    return f"{sum(bool(h) for h in hits)}/{len(hits)}"


def summary_row(records: Sequence[Record], paths: Sequence[str]) -> Record:
    """JSON summary of a group: mean and std of each numeric path over seeds."""
    out: Record = {"n": len(records)}
    for p in paths:
        m, s = mean_std([float(v) for v in pluck(records, p)])
        out[p] = {"mean": None if math.isnan(m) else m, "std": None if math.isnan(s) else s}
    return out


@dataclass
class Report:
    """What one study writes: a title, the paragraph's parts, Markdown tables, a JSON summary and a plot."""

    title: str
    measured: str
    reading: str
    tables: list[str]
    summary: Any
    plot: Callable[[Path], None]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- study 1
def run_poison_rate(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """BadNets / Blend at each poisoning rate: undefended, TAC detection, TAC removal and FIRE with their defaults
    (detection-driven) and, to separate detection from removal, with the true target given."""
    for attack in ("badnets", "blend"):
        for rate in RATES:
            for seed in seeds:
                def make(attack: str = attack, rate: float = rate, seed: int = seed) -> Record:
                    t = lab.trained(ModelSpec(attack, rate), seed)
                    return {"train_seconds": t.seconds, "undefended": measure(t.model, lab, t),
                            "tac_detect": tac_detect(lab, t, seed), "tac": run_defense(lab, t, seed, "tac"),
                            "fire": run_defense(lab, t, seed, "fire"),
                            "tac_given": run_defense(lab, t, seed, "tac", targets=[TARGET]),
                            "fire_given": run_defense(lab, t, seed, "fire", target=TARGET)}
                store.ensure(f"{attack}@{rate:g}", seed, make)


DEFENDED = (("tac", "TAC removal"), ("tac_given", "TAC removal, target given"), ("fire", "FIRE"),
            ("fire_given", "FIRE, target given"))


def mean_pct(records: Sequence[Record], path: str) -> str:
    """The mean in percent with one decimal (for the reading)."""
    m = mean_std(pluck(records, path))[0]
    return "–" if math.isnan(m) else f"{100 * m:.1f}"


def per_seed(records: Sequence[Record], path: str) -> str:
    """Each record's value in percent, comma-separated (for the reading)."""
    return ", ".join(f"{100 * v:.1f}" for v in pluck(records, path))


def mean_num(records: Sequence[Record], path: str, digits: int = 1) -> str:
    """The plain mean (scores, ratios) for the reading."""
    m = mean_std(pluck(records, path))[0]
    return "–" if math.isnan(m) else f"{m:.{digits}f}"


def report_poison_rate(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``poison_rate``."""
    rows, summary = [], []
    lines = ["**Undefended model and TAC detection**", "",
             "| attack | rate | ACC | ASR | RA | TAC flags target | target score | max other score | detection s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attack in ("badnets", "blend"):
        for rate in RATES:
            recs = store.get(f"{attack}@{rate:g}", seeds)
            if not recs:
                continue
            flagged = [TARGET in r["tac_detect"]["flagged"] for r in recs]
            lines.append(
                f"| {attack} | {100 * rate:g} % | {pm(pluck(recs, 'undefended.acc'))} | {pm(pluck(recs, 'undefended.asr'))} "
                f"| {pm(pluck(recs, 'undefended.ra'))} | {frac(flagged)} "
                f"| {pm(pluck(recs, 'tac_detect.target_scores.0'), 1, 2)} | {pm(pluck(recs, 'tac_detect.max_other'), 1, 2)} "
                f"| {pm(pluck(recs, 'tac_detect.seconds'), 1, 3)} |")
            rows.append((attack, rate, recs))
            summary.append({"attack": attack, "rate": rate, "target_flagged": sum(flagged),
                            **summary_row(recs, ["undefended.acc", "undefended.asr", "undefended.ra",
                                                 "tac_detect.target_scores.0", "tac_detect.max_other",
                                                 *(f"{k}.{m}" for k, _ in DEFENDED for m in ("acc", "asr", "ra", "seconds"))])})
    lines += ["", "**After the defenses** (ACC / ASR / RA, %; defaults = the target only if TAC flags it)", "",
              "| attack | rate | " + " | ".join(label for _, label in DEFENDED) + " |", "|---|---|---|---|---|---|"]
    for attack, rate, recs in rows:
        lines.append(f"| {attack} | {100 * rate:g} % | " + " | ".join(
            f"{pm(pluck(recs, f'{k}.acc'))} / {pm(pluck(recs, f'{k}.asr'))} / {pm(pluck(recs, f'{k}.ra'))}"
            for k, _ in DEFENDED) + " |")
    reading = []
    for attack in ("badnets", "blend"):
        sub = [recs for a, _, recs in rows if a == attack]
        if not sub:
            continue
        flags = [sum(TARGET in r["tac_detect"]["flagged"] for r in recs) for recs in sub]
        text = (f"{attack} at {' / '.join(f'{100 * r:g}' for r in RATES)} %: undefended ASR "
                f"{' / '.join(mean_pct(recs, 'undefended.asr') for recs in sub)} %, TAC flags the target in "
                f"{' / '.join(str(f) for f in flags)} of {len(sub[0])} models (mean score "
                f"{' / '.join(mean_num(recs, 'tac_detect.target_scores.0') for recs in sub)})")
        for k, label in DEFENDED:
            text += (f"; ASR after {label} {' / '.join(mean_pct(recs, f'{k}.asr') for recs in sub)} % at ACC "
                     f"{' / '.join(mean_pct(recs, f'{k}.acc') for recs in sub)} %")
        for rate, recs in zip(RATES, sub, strict=False):
            if mean_std(pluck(recs, "undefended.asr"))[1] > 0.2:
                text += (f" (at {100 * rate:g} % the backdoor is learned unevenly: ASR per seed "
                         f"{per_seed(recs, 'undefended.asr')} %)")
        if sum(flags) == 0:
            text += (f". TAC never flags {attack}'s target at any rate: its ‖s_0‖ is not a small outlier, so the "
                     "default removal and FIRE leave the model unchanged")
        reading.append(text)
    notes = ["Scores are the MAD anomaly index of log ‖s_k‖ (α = 4 flags). With its defaults TAC removal (and FIRE, "
             "which uses TAC's verdict) returns the model unchanged when nothing is flagged, so those cells then equal "
             "the undefended ones; the 'target given' columns pass the true target (TAC `targets=[0]`, FIRE "
             "`target=0`) to show what removal does once the class is known. FIRE's strength α is chosen by its "
             "default cross-fitting on the reserve."]

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, attack in zip(axes, ("badnets", "blend"), strict=True):
            sub = [(rate, recs) for a, rate, recs in rows if a == attack]
            x = [100 * rate for rate, _ in sub]
            for path_, label, style in (("undefended.asr", "ASR undefended", "k-o"), ("tac.asr", "ASR after TAC", "C0-o"),
                                        ("tac_given.asr", "ASR after TAC, target given", "C0:^"),
                                        ("fire.asr", "ASR after FIRE", "C1-o"),
                                        ("fire_given.asr", "ASR after FIRE, target given", "C1:^"),
                                        ("tac.acc", "ACC after TAC", "C0--s"), ("fire.acc", "ACC after FIRE", "C1--s")):
                ms = [mean_std(pluck(recs, path_)) for _, recs in sub]
                ax.errorbar(x, [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], fmt=style, label=label, capsize=3)
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{v:g} %" for v in x])
            ax.minorticks_off()
            ax.set_xlabel("poisoning rate")
            ax.set_title(attack)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("% (mean ± std over seeds)")
        axes[1].legend(fontsize=7, loc="lower left")
        _save(fig, path)

    return Report("Poisoning rate: BadNets and Blend at 1 / 5 / 10 %",
                  "Undefended ACC / ASR / RA, TAC detection (is the target flagged at α = 4, its anomaly score and the "
                  "largest score of another class), TAC removal and FIRE repair with their defaults and with the "
                  "target given, for BadNets and Blend (target 0) poisoning 1 %, 5 % and 10 % of the training set.",
                  ". ".join(reading) + ".", lines, summary, plot, notes)


# ----------------------------------------------------------------------------------------------- study 2
def run_beta_alpha(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """TAC β and FIRE α on BadNets; TAC detection scores of backdoored and clean models for the α sweep."""
    badnets = ModelSpec("badnets")
    for seed in seeds:
        for beta in BETAS:
            def make_beta(beta: float = beta, seed: int = seed) -> Record:
                t = lab.trained(badnets, seed)
                return {"undefended": measure(t.model, lab, t), "tac": run_defense(lab, t, seed, "tac", beta=beta)}
            store.ensure(f"beta={beta:g}", seed, make_beta)
        for alpha in FIRE_ALPHAS:
            def make_fire(alpha: float | None = alpha, seed: int = seed) -> Record:
                t = lab.trained(badnets, seed)
                return {"undefended": measure(t.model, lab, t), "fire": run_defense(lab, t, seed, "fire", alpha=alpha)}
            store.ensure(f"fire_alpha={_alpha_name(alpha)}", seed, make_fire)
        for attack in DETECT_ATTACKS:
            def make_scores(attack: str = attack, seed: int = seed) -> Record:
                t = lab.trained(ModelSpec(attack), seed)
                return {"undefended": measure(t.model, lab, t), "detection": tac_detect(lab, t, seed)}
            store.ensure(f"scores/{attack}", seed, make_scores)
    for seed in clean_seeds(seeds):
        def make_clean(seed: int = seed) -> Record:
            t = lab.trained(ModelSpec(), seed)
            return {"undefended": measure(t.model, lab, t), "detection": tac_detect(lab, t, seed)}
        store.ensure("scores/clean", seed, make_clean)


def clean_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds of the clean models for the false-alarm rate: at least MIN_CLEAN_SEEDS."""
    return list(range(max(len(seeds), MIN_CLEAN_SEEDS)))


def _alpha_name(alpha: float | None) -> str:
    """Config name of a FIRE strength (None = FIRE's default, chosen by cross-fitting)."""
    return "default" if alpha is None else f"{alpha:g}"


def report_beta_alpha(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``beta_alpha`` (α is applied here to the stored scores, no retraining)."""
    lines = ["**TAC removal weight β** (BadNets 10 %, TAC defaults otherwise)", "",
             "| β | flags target | ACC | ASR | RA | s |", "|---|---|---|---|---|---|"]
    beta_rows = []
    base = store.get(f"beta={BETAS[0]:g}", seeds)
    lines.append(f"| undefended | – | {pm(pluck(base, 'undefended.acc'))} | {pm(pluck(base, 'undefended.asr'))} "
                 f"| {pm(pluck(base, 'undefended.ra'))} | – |")
    for beta in BETAS:
        recs = store.get(f"beta={beta:g}", seeds)
        if not recs:
            continue
        flagged = [TARGET in pluck([r], "tac.detection.flagged")[0] for r in recs]
        lines.append(f"| {beta:g}{' (default)' if beta == 1 else ''} | {frac(flagged)} | {pm(pluck(recs, 'tac.acc'))} "
                     f"| {pm(pluck(recs, 'tac.asr'))} | {pm(pluck(recs, 'tac.ra'))} | {pm(pluck(recs, 'tac.seconds'), 1, 2)} |")
        beta_rows.append((beta, recs))
    bd = [r for a in DETECT_ATTACKS for r in store.get(f"scores/{a}", seeds)]
    clean = store.get("scores/clean", clean_seeds(seeds))
    eff = [r for r in bd if r["undefended"]["asr"] >= EFFECTIVE_ASR]
    lines += ["", f"**TAC detection threshold α** — scores of {len(bd)} backdoored models ({', '.join(DETECT_ATTACKS)} "
              f"× {len(seeds)} seeds, target 0; {len(eff)} of them with ASR ≥ {100 * EFFECTIVE_ASR:g} %) and "
              f"{len(clean)} clean models, reused for every α", "",
              "| α | target flagged (all backdoored) | target flagged (ASR ≥ 50 %) | only the target flagged (all) "
              "| backdoored models with a non-target flagged | false alarms (clean models with any flag) |",
              "|---|---|---|---|---|---|"]
    alpha_rows = []
    for alpha in THRESHOLDS:
        det = [r["detection"]["target_scores"][0] > alpha for r in bd]
        det_eff = [r["detection"]["target_scores"][0] > alpha for r in eff]
        other = [r["detection"]["max_other"] > alpha for r in bd]
        exact = [d and not o for d, o in zip(det, other, strict=True)]
        fa = [max(r["detection"]["scores"]) > alpha for r in clean]
        alpha_rows.append({"alpha": alpha, "detection": sum(det), "detection_effective": sum(det_eff),
                           "exact": sum(exact), "non_target_flag": sum(other), "false_alarm": sum(fa),
                           "n_backdoored": len(bd), "n_effective": len(eff), "n_clean": len(clean)})
        lines.append(f"| {alpha:g}{' (default)' if alpha == DEFAULT_THRESHOLD else ''} | {frac(det)} | {frac(det_eff)} "
                     f"| {frac(exact)} | {frac(other)} | {frac(fa)} |")
    lines += ["", "Per-model scores behind the α table:", "",
              "| model | seed | ACC | ASR | target score | max other score (clean: max score) |", "|---|---|---|---|---|---|"]
    for attack in (*DETECT_ATTACKS, "clean"):
        for r in store.get(f"scores/{attack}", clean_seeds(seeds) if attack == "clean" else seeds):
            d = r["detection"]
            asr = "–" if r["undefended"].get("asr") is None else f"{100 * r['undefended']['asr']:.1f}"
            tgt = f"{d['target_scores'][0]:.2f}" if d["target_scores"] else "–"
            oth = max(d["scores"]) if attack == "clean" else d["max_other"]
            lines.append(f"| {attack} | {r['seed']} | {100 * r['undefended']['acc']:.1f} | {asr} | {tgt} | {oth:.2f} |")
    lines += ["", "**FIRE strength α** (BadNets 10 %, gated rule; default = chosen by cross-fitting on the reserve)",
              "", "| FIRE α | ACC | ASR | RA | α used |", "|---|---|---|---|---|"]
    fire_rows = []
    for alpha in FIRE_ALPHAS:
        recs = store.get(f"fire_alpha={_alpha_name(alpha)}", seeds)
        if not recs:
            continue
        used = sorted({a for r in recs for a in r["fire"].get("alphas", {}).values()})
        lines.append(f"| {_alpha_name(alpha)} | {pm(pluck(recs, 'fire.acc'))} | {pm(pluck(recs, 'fire.asr'))} "
                     f"| {pm(pluck(recs, 'fire.ra'))} | {', '.join(f'{a:g}' for a in used)} |")
        fire_rows.append((alpha, recs))
    summary = {"beta": [{"beta": b, **summary_row(r, ["tac.acc", "tac.asr", "tac.ra"])} for b, r in beta_rows],
               "threshold": alpha_rows,
               "fire_alpha": [{"alpha": _alpha_name(a), **summary_row(r, ["fire.acc", "fire.asr", "fire.ra"])}
                              for a, r in fire_rows]}
    reading = []
    if beta_rows:
        b_lo, b_hi = beta_rows[0], beta_rows[-1]
        best = min(beta_rows, key=lambda br: mean_std(pluck(br[1], "tac.asr"))[0])
        n_flag = sum(TARGET in r["tac"]["detection"]["flagged"] for _, rs in beta_rows for r in rs)
        n_runs = sum(len(rs) for _, rs in beta_rows)
        reading.append(
            f"β (TAC flagged the BadNets target in {n_flag}/{n_runs} runs): from β = {b_lo[0]:g} to β = {b_hi[0]:g} the ASR after "
            f"removal goes from {mean_pct(b_lo[1], 'tac.asr')} to {mean_pct(b_hi[1], 'tac.asr')} % and ACC from "
            f"{mean_pct(b_lo[1], 'tac.acc')} to {mean_pct(b_hi[1], 'tac.acc')} % (undefended "
            f"{mean_pct(b_lo[1], 'undefended.acc')} / {mean_pct(b_lo[1], 'undefended.asr')} %); the lowest mean ASR, "
            f"{mean_pct(best[1], 'tac.asr')} % at β = {best[0]:g}, costs {100 * (mean_std(pluck(best[1], 'undefended.acc'))[0] - mean_std(pluck(best[1], 'tac.acc'))[0]):.1f} "
            f"points of ACC, and the seed-to-seed spread of ASR is large (std up to "
            f"{max(100 * mean_std(pluck(r, 'tac.asr'))[1] for _, r in beta_rows):.0f} points)")
    if bd:
        per_attack = {a: [r for r in bd if r["config"] == f"scores/{a}"] for a in DETECT_ATTACKS}
        learned = {a: sum(r["undefended"]["asr"] >= EFFECTIVE_ASR for r in rs) for a, rs in per_attack.items()}
        oth_max = max([r["detection"]["max_other"] for r in bd] + [max(r["detection"]["scores"]) for r in clean])
        row4 = next(r for r in alpha_rows if r["alpha"] == DEFAULT_THRESHOLD)
        tops = ", ".join(f"{a} {max(r['detection']['target_scores'][0] for r in rs):.2f}"
                         for a, rs in per_attack.items() if rs)
        reading.append(
            f"α: the highest target score per attack is {tops}, against at most {oth_max:.2f} for any non-target class "
            f"or clean model; at the default α = 4 TAC flags the target in {row4['detection']}/{row4['n_backdoored']} "
            f"backdoored models ({row4['detection_effective']}/{row4['n_effective']} with ASR ≥ 50 %; backdoor learned "
            f"per attack: {', '.join(f'{a} {n}/{len(per_attack[a])}' for a, n in learned.items())}) with "
            f"{row4['false_alarm']}/{row4['n_clean']} false alarms; "
            + "; ".join(f"α = {r['alpha']:g}: {r['detection']}/{r['n_backdoored']} detected, "
                        f"{r['false_alarm']}/{r['n_clean']} false alarms" for r in alpha_rows if r is not row4)
            + (". Lowering α trades false alarms for detections without reaching the attacks whose target scores "
               "stay in the range of ordinary classes"
               if any(max(r["detection"]["target_scores"][0] for r in rs) <= oth_max for rs in per_attack.values() if rs)
               else ""))
    if fire_rows:
        f0 = fire_rows[0][1]
        fixed = [(a, r) for a, r in fire_rows if a is not None]
        asr = [mean_std(pluck(r, "fire.asr"))[0] for _, r in fixed]
        plateau = next((i for i in range(len(asr) - 1) if max(asr[i:]) - min(asr[i:]) < 0.01), None)
        reading.append(
            f"FIRE: ASR {' / '.join(mean_pct(r, 'fire.asr') for _, r in fixed)} % at α = "
            f"{' / '.join(f'{a:g}' for a, _ in fixed)} with ACC between "
            f"{min(mean_std(pluck(r, 'fire.acc'))[0] for _, r in fixed) * 100:.1f} and "
            f"{max(mean_std(pluck(r, 'fire.acc'))[0] for _, r in fixed) * 100:.1f} %"
            + (f"; from α = {fixed[plateau][0]:g} on the ASR stays within 1 point, consistent with the gated rule's "
               "floor (the shift stops at the clean class mean)" if plateau is not None else "")
            + f"; its default (α chosen per model by cross-fitting: "
              f"{', '.join(sorted({f'{a:g}' for r in f0 for a in r['fire'].get('alphas', {}).values()}))}) gives "
              f"ASR {mean_pct(f0, 'fire.asr')} % at ACC {mean_pct(f0, 'fire.acc')} %")

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for path_, label, style in (("tac.asr", "ASR", "C3-o"), ("tac.acc", "ACC", "C0-s"), ("tac.ra", "RA", "C2-^")):
            ms = [mean_std(pluck(r, path_)) for _, r in beta_rows]
            axes[0].errorbar([b for b, _ in beta_rows], [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms],
                             fmt=style, label=label, capsize=3)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("TAC removal β")
        axes[0].set_ylabel("% after removal")
        axes[0].set_title("TAC β (BadNets 10 %)")
        axes[0].legend(fontsize=8)
        ths = [r["alpha"] for r in alpha_rows]
        axes[1].plot(ths, [100 * r["detection"] / max(1, r["n_backdoored"]) for r in alpha_rows], "C3-o",
                     label="detection rate")
        axes[1].plot(ths, [100 * r["exact"] / max(1, r["n_backdoored"]) for r in alpha_rows], "C1--o",
                     label="only the target flagged")
        axes[1].plot(ths, [100 * r["false_alarm"] / max(1, r["n_clean"]) for r in alpha_rows], "C0-s",
                     label="false alarms (clean)")
        axes[1].axvline(DEFAULT_THRESHOLD, color="gray", lw=0.8, ls=":")
        axes[1].set_xlabel("TAC threshold α")
        axes[1].set_ylabel("% of models")
        axes[1].set_title("TAC detection threshold")
        axes[1].legend(fontsize=8)
        labels = [_alpha_name(a) for a, _ in fire_rows]
        for path_, label, style in (("fire.asr", "ASR", "C3-o"), ("fire.acc", "ACC", "C0-s"), ("fire.ra", "RA", "C2-^")):
            ms = [mean_std(pluck(r, path_)) for _, r in fire_rows]
            axes[2].errorbar(range(len(fire_rows)), [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], fmt=style,
                             label=label, capsize=3)
        axes[2].set_xticks(range(len(labels)), labels)
        axes[2].set_xlabel("FIRE α")
        axes[2].set_title("FIRE strength (BadNets 10 %)")
        axes[2].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        _save(fig, path)

    return Report("TAC β and α, FIRE α",
                  f"TAC removal with β ∈ {{{', '.join(f'{b:g}' for b in BETAS)}}} on BadNets (10 %, target 0); the "
                  f"detection threshold α ∈ {{{', '.join(f'{a:g}' for a in THRESHOLDS)}}} applied to the TAC scores of "
                  f"backdoored models ({', '.join(DETECT_ATTACKS)}; WaNet s = 3) and of clean models (no retraining per "
                  "α); FIRE's repair strength α (the scale of its latent shift) at its default and fixed values "
                  "on the same BadNets models.",
                  ". ".join(reading) + ".", lines, summary, plot)


# ----------------------------------------------------------------------------------------------- study 3
def run_two_target(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """Two BadNets backdoors in one model; TAC / FIRE with detection and with both targets given."""
    both = [t for _, t, _ in TWO_TARGET]
    for seed in seeds:
        def make(seed: int = seed) -> Record:
            t = lab.trained(ModelSpec("badnets", two_target=True), seed)
            return {"train_seconds": t.seconds, "undefended": measure(t.model, lab, t),
                    "tac_detect": tac_detect(lab, t, seed), "tac": run_defense(lab, t, seed, "tac"),
                    "tac_given": run_defense(lab, t, seed, "tac", targets=both),
                    "fire": run_defense(lab, t, seed, "fire"),
                    "fire_given": run_defense(lab, t, seed, "fire", target=both)}
        store.ensure("two_target", seed, make)


def report_two_target(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``two_target`` (ASR per trigger)."""
    recs = store.get("two_target", seeds)
    (n0, t0, p0), (n1, t1, p1) = TWO_TARGET
    both = [r["tac_detect"]["targets_flagged"] == 2 for r in recs]
    lines = ["| condition | ACC | ASR trigger→0 | RA trigger→0 | ASR trigger→5 | RA trigger→5 |", "|---|---|---|---|---|---|"]
    conds = [("undefended", "undefended"), ("TAC removal (detected targets)", "tac"),
             ("TAC removal (targets [0, 5] given)", "tac_given"), ("FIRE (detected targets)", "fire"),
             ("FIRE (targets [0, 5] given)", "fire_given")]
    for label, k in conds:
        lines.append(f"| {label} | {pm(pluck(recs, k + '.acc'))} | {pm(pluck(recs, f'{k}.asr_{n0}'))} "
                     f"| {pm(pluck(recs, f'{k}.ra_{n0}'))} | {pm(pluck(recs, f'{k}.asr_{n1}'))} | {pm(pluck(recs, f'{k}.ra_{n1}'))} |")
    lines += ["", "| seed | TAC flagged | score class 0 | score class 5 | max other score | FIRE targets (detected) |",
              "|---|---|---|---|---|---|"]
    for r in recs:
        d = r["tac_detect"]
        lines.append(f"| {r['seed']} | {d['flagged']} | {d['target_scores'][0]:.2f} | {d['target_scores'][1]:.2f} "
                     f"| {d['max_other']:.2f} | {r['fire'].get('targets')} |")
    summary = {"both_flagged": sum(both), "n": len(recs),
               **{k: summary_row(recs, [f"{k}.acc", f"{k}.asr_{n0}", f"{k}.asr_{n1}", f"{k}.ra_{n0}", f"{k}.ra_{n1}"])
                  for _, k in conds}}
    n_one = sum(r["tac_detect"]["targets_flagged"] == 1 for r in recs)
    lo_t = min((min(r["tac_detect"]["target_scores"]) for r in recs), default=math.nan)
    hi_o = max((r["tac_detect"]["max_other"] for r in recs), default=math.nan)
    top2 = sum(min(r["tac_detect"]["target_scores"]) > r["tac_detect"]["max_other"] for r in recs)
    und = [mean_std(pluck(recs, f"undefended.asr_{n}"))[0] for n in (n0, n1)]
    fg = [mean_std(pluck(recs, f"fire_given.asr_{n}"))[0] for n in (n0, n1)]
    reading = (
        f"Both backdoors are learned (undefended ASR {mean_pct(recs, f'undefended.asr_{n0}')} % → 0 and "
        f"{mean_pct(recs, f'undefended.asr_{n1}')} % → 5, ACC {mean_pct(recs, 'undefended.acc')} %). At α = 4 TAC "
        f"flags both targets in {frac(both)} models, one of them in {n_one}/{len(recs)} "
        f"(flagged per seed: {', '.join(str(r['tac_detect']['flagged']) for r in recs)}). The two targets have the two "
        f"highest scores in {top2}/{len(recs)} models (lowest target score {lo_t:.2f}, highest other class {hi_o:.2f})"
        + (f", so on these models any α in ({hi_o:.2f}, {lo_t:.2f}) would flag exactly both (a range checked on "
           "these models only, not on clean ones); the default α = 4 is above both target scores in "
           f"{sum(max(r['tac_detect']['target_scores']) <= DEFAULT_THRESHOLD for r in recs)}/{len(recs)} models"
           if lo_t > hi_o else "")
        + f". TAC removal with its defaults (only what was flagged) leaves ASR {mean_pct(recs, f'tac.asr_{n0}')} / "
          f"{mean_pct(recs, f'tac.asr_{n1}')} % (→0 / →5) at ACC {mean_pct(recs, 'tac.acc')} %; with both targets "
          f"given {mean_pct(recs, f'tac_given.asr_{n0}')} / {mean_pct(recs, f'tac_given.asr_{n1}')} % at ACC "
          f"{mean_pct(recs, 'tac_given.acc')} %. FIRE takes several targets (one direction per class); with both given "
          f"it leaves {100 * fg[0]:.1f} / {100 * fg[1]:.1f} % at ACC {mean_pct(recs, 'fire_given.acc')} %"
        + (" — within 10 points of the undefended ASR for both triggers" if all(u - f < 0.1 for u, f in zip(und, fg, strict=True))
           else "") + ".")

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(9, 3.8))
        width = 0.27
        for i, (key, label) in enumerate(((f"asr_{n0}", "ASR trigger→0"), (f"asr_{n1}", "ASR trigger→5"),
                                          ("acc", "ACC"))):
            ms = [mean_std(pluck(recs, f"{k}.{key}")) for _, k in conds]
            ax.bar(np.arange(len(conds)) + (i - 1) * width, [100 * m for m, _ in ms], width,
                   yerr=[100 * s for _, s in ms], capsize=3, label=label)
        ax.set_xticks(range(len(conds)), [c.replace(" (", "\n(") for c, _ in conds], fontsize=8)
        ax.set_ylabel("% (mean ± std over seeds)")
        ax.set_title("Two BadNets backdoors (targets 0 and 5)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        _save(fig, path)

    return Report("Two targets: two BadNets backdoors in one model",
                  f"One model trained with two BadNets backdoors on disjoint poisoned subsets of {100 * TWO_TARGET_RATE:g} % "
                  f"of the training set each: a {p0['pattern']} 3×3 patch at the {p0['position']} → class {t0} and a "
                  f"{p1['pattern']} 3×3 patch at the {p1['position']} → class {t1}. TAC detection (which classes are "
                  "flagged at α = 4), TAC removal and FIRE with their defaults (detected targets) and with both targets "
                  "given; ASR measured per trigger on triggered test images whose label is not that trigger's target.",
                  reading, lines, summary, plot)


# ----------------------------------------------------------------------------------------------- study 4
def run_all_to_all(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """BadNets all-to-all and a clean baseline: per-class TAC detection and the pairwise QP."""
    for seed in seeds:
        for name, spec in (("badnets_all_to_all", ModelSpec("badnets", all_to_all=True)), ("clean", ModelSpec())):
            def make(spec: ModelSpec = spec, seed: int = seed) -> Record:
                t = lab.trained(spec, seed)
                return {"undefended": measure(t.model, lab, t), "tac_detect": tac_detect(lab, t, seed),
                        "pairs": pair_analysis(t.model, lab.reserve(seed))}
            store.ensure(name, seed, make)


def report_all_to_all(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``all_to_all`` (per-class index vs pair ranks)."""
    a2a, clean = store.get("badnets_all_to_all", seeds), store.get("clean", seeds)
    lines = ["| model | ACC | ASR (y→y+1) | RA | TAC flagged classes | max class score | median ‖s_k‖ | "
             "true pairs: mean rank / 90 | true pairs in the 10 smallest | true pairs with index > 4 | "
             "min true-pair index | max other-pair index |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for label, recs in (("BadNets all-to-all", a2a), ("clean (same pairs)", clean)):
        if not recs:
            continue
        ranks = [np.mean(r["pairs"]["true_rank"]) for r in recs]
        top10 = [sum(k <= 10 for k in r["pairs"]["true_rank"]) for r in recs]
        over = [sum(v > DEFAULT_THRESHOLD for v in r["pairs"]["true_index"]) for r in recs]
        lines.append(f"| {label} | {pm(pluck(recs, 'undefended.acc'))} | {pm(pluck(recs, 'undefended.asr'))} "
                     f"| {pm(pluck(recs, 'undefended.ra'))} | {[r['tac_detect']['flagged'] for r in recs]} "
                     f"| {pm([max(r['tac_detect']['scores']) for r in recs], 1, 2)} "
                     f"| {pm([float(np.median(r['tac_detect']['norms'])) for r in recs], 1, 2)} "
                     f"| {pm(ranks, 1, 1)} | {pm(top10, 1, 1)} | {pm(over, 1, 1)} "
                     f"| {pm([min(r['pairs']['true_index']) for r in recs], 1, 2)} "
                     f"| {pm(pluck(recs, 'pairs.max_other_index'), 1, 2)} |")
        rows.append({"model": label, "n": len(recs), "true_pair_mean_rank": mean_std(ranks),
                     "true_pairs_in_top10": mean_std(top10), "true_pairs_index_over_4": mean_std(over),
                     **summary_row(recs, ["undefended.acc", "undefended.asr", "undefended.ra", "pairs.max_other_index"])})
    lines += ["", "Rank of each true pair (a → a+1) among the 90 pair norms (1 = smallest), per seed of the "
              "all-to-all model, and [rank within its source row of 9]:", "",
              "| seed | " + " | ".join(f"{a}→{(a + 1) % 10}" for a in range(10)) + " |", "|---" * 11 + "|"]
    for r in a2a:
        p = r["pairs"]
        lines.append(f"| {r['seed']} | " + " | ".join(f"{k} [{q}]" for k, q in zip(p["true_rank"], p["true_row_rank"],
                                                                                      strict=True)) + " |")
    clean_by_seed = {r["seed"]: r for r in clean}
    shrink = [np.asarray(ra["tac_detect"]["norms"]) / np.asarray(clean_by_seed[ra["seed"]]["tac_detect"]["norms"])
              for ra in a2a if ra["seed"] in clean_by_seed]
    reading = ""
    if a2a:
        ranks = [k for r in a2a for k in r["pairs"]["true_rank"]]
        rowr = [q for r in a2a for q in r["pairs"]["true_row_rank"]]
        over = [v > DEFAULT_THRESHOLD for r in a2a for v in r["pairs"]["true_index"]]
        flagged = [r["tac_detect"]["flagged"] for r in a2a]
        reading = (
            f"The all-to-all backdoor is learned with ASR {per_seed(a2a, 'undefended.asr')} % "
            f"(per seed; ACC {mean_pct(a2a, 'undefended.acc')} %). Per-class TAC flags {flagged} (largest class score "
            f"{pm([max(r['tac_detect']['scores']) for r in a2a], 1, 2)}; clean models "
            f"{pm([max(r['tac_detect']['scores']) for r in clean], 1, 2)})"
            + (f". Every class is the target of one source, and the per-class norms shrink together (‖s_k‖ all-to-all / "
               f"clean between {min(x.min() for x in shrink):.2f} and {max(x.max() for x in shrink):.2f} over classes and "
               f"seeds, median {float(np.median(np.concatenate(shrink))):.2f}), so no class stands far below the other "
               "nine: s_k has to move the latents of all classes into k, while the backdoor only gives class k−1 a "
               "short path there." if shrink else ".")
            + f" The pairwise QP separates the sources: the true pairs (a, a+1) have mean rank {np.mean(ranks):.1f} of 90 "
              f"(best possible 5.5; clean models {np.mean([k for r in clean for k in r['pairs']['true_rank']]):.1f}), "
              f"{sum(k <= 10 for k in ranks)}/{len(ranks)} are among the 10 smallest norms of their model and "
              f"{sum(q == 1 for q in rowr)}/{len(rowr)} are the smallest of their source row; but only "
              f"{sum(over)}/{len(over)} have a pair anomaly index above 4 (the largest other pair index is "
              f"{pm(pluck(a2a, 'pairs.max_other_index'), 1, 2)}): with 10 of the 90 values being targets, the MAD over all "
              "pairs is a weaker test than the rank within each source row.")

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for recs, label, style in ((a2a, "all-to-all", "C3-o"), (clean, "clean", "C0-s")):
            ms = [mean_std([r["tac_detect"]["scores"][k] for r in recs]) for k in range(10)]
            axes[0].errorbar(range(10), [m for m, _ in ms], yerr=[s for _, s in ms], fmt=style, label=label, capsize=3)
        axes[0].axhline(DEFAULT_THRESHOLD, color="gray", ls=":", lw=0.8)
        axes[0].set_xlabel("class k")
        axes[0].set_ylabel("per-class TAC anomaly index")
        axes[0].set_title("Per-class TAC")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        for ax, recs, label in ((axes[1], a2a, "all-to-all"), (axes[2], clean, "clean")):
            if not recs:
                continue
            idx = np.mean(np.array([[[np.nan if v is None else v for v in row] for row in r["pairs"]["index"]]
                                       for r in recs], dtype=float), axis=0)
            im = ax.imshow(idx, cmap="RdBu_r", vmin=-6, vmax=6)
            for a in range(10):
                ax.add_patch(plt.Rectangle(((a + 1) % 10 - 0.5, a - 0.5), 1, 1, fill=False, ec="k", lw=1.2))
            ax.set_xlabel("target k")
            ax.set_ylabel("source a")
            ax.set_title(f"pairwise anomaly index, {label}\n(mean over seeds; boxes = a→a+1)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        _save(fig, path)

    return Report("All-to-all BadNets: per-class TAC vs the pairwise QP",
                  "BadNets all-to-all (label y → y+1 mod 10, 10 % poisoning) against a clean model of the same seed: "
                  "per-class TAC detection (defaults), and the pairwise QP `pairwise_flip_perturbations` on the clean "
                  "reserve (for each source a only its own latents must flip to k), whose 90 log-norms get the MAD "
                  "anomaly index (`anomaly_index`, positive = smaller than typical); reported are the ranks and indices "
                  "of the true pairs (a, a+1).",
                  reading, lines, {"models": rows}, plot)


# ----------------------------------------------------------------------------------------------- study 5
def run_adaptive(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """BadNets trained against TAC for each λ (λ = 0: the plain BadNets model, where the penalty vanishes)."""
    for lam in LAMBDAS:
        for seed in seeds:
            def make(lam: float = lam, seed: int = seed) -> Record:
                t = lab.trained(ModelSpec("badnets", lam=lam), seed)
                z, head = latents(t.model, lab.reserve(seed))
                with torch.no_grad():
                    r = flip_lower_bounds(z, head.weight, head.bias).numpy()
                qp = minimal_flip_perturbations(z, head.weight.detach(), head.bias.detach()).norms
                return {"train_seconds": t.seconds, "undefended": measure(t.model, lab, t),
                        "standin": {"r": r.tolist(), "ratio": float(r[TARGET] / np.median(r)),
                                    "qp_ratio": float(qp[TARGET] / np.median(qp)),
                                    "bound_tightness": float(r[TARGET] / qp[TARGET])},
                        "tac_detect": tac_detect(lab, t, seed), "tac": run_defense(lab, t, seed, "tac"),
                        "fire": run_defense(lab, t, seed, "fire"),
                        "tac_given": run_defense(lab, t, seed, "tac", targets=[TARGET]),
                        "fire_given": run_defense(lab, t, seed, "fire", target=TARGET)}
            store.ensure(f"lambda={lam:g}", seed, make)


def report_adaptive(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``adaptive``."""
    lines = ["| λ | ACC | ASR | RA | r_t / median r (reserve) | ‖s_t‖ / median ‖s_k‖ | r_t / ‖s_t‖ | TAC target score "
             "| flags target | TAC ACC | TAC ASR | TAC RA | FIRE ACC | FIRE ASR | FIRE RA | TAC ACC / ASR, target given "
             "| FIRE ACC / ASR, target given |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows, summary = [], []
    for lam in LAMBDAS:
        recs = store.get(f"lambda={lam:g}", seeds)
        if not recs:
            continue
        flagged = [TARGET in r["tac_detect"]["flagged"] for r in recs]
        lines.append(f"| {lam:g} | {pm(pluck(recs, 'undefended.acc'))} | {pm(pluck(recs, 'undefended.asr'))} "
                     f"| {pm(pluck(recs, 'undefended.ra'))} | {pm(pluck(recs, 'standin.ratio'), 1, 2)} "
                     f"| {pm(pluck(recs, 'standin.qp_ratio'), 1, 2)} | {pm(pluck(recs, 'standin.bound_tightness'), 1, 2)} "
                     f"| {pm(pluck(recs, 'tac_detect.target_scores.0'), 1, 2)} | {frac(flagged)} "
                     f"| {pm(pluck(recs, 'tac.acc'))} | {pm(pluck(recs, 'tac.asr'))} | {pm(pluck(recs, 'tac.ra'))} "
                     f"| {pm(pluck(recs, 'fire.acc'))} | {pm(pluck(recs, 'fire.asr'))} | {pm(pluck(recs, 'fire.ra'))} "
                     f"| {pm(pluck(recs, 'tac_given.acc'))} / {pm(pluck(recs, 'tac_given.asr'))} "
                     f"| {pm(pluck(recs, 'fire_given.acc'))} / {pm(pluck(recs, 'fire_given.asr'))} |")
        rows.append((lam, recs))
        summary.append({"lambda": lam, "target_flagged": sum(flagged),
                        **summary_row(recs, ["undefended.acc", "undefended.asr", "undefended.ra", "standin.ratio",
                                             "standin.qp_ratio", "standin.bound_tightness", "tac_detect.target_scores.0",
                                             "tac.acc", "tac.asr", "tac.ra", "fire.acc", "fire.asr", "fire.ra",
                                             "tac_given.acc", "tac_given.asr", "tac_given.ra", "fire_given.acc",
                                             "fire_given.asr", "fire_given.ra"])})
    def intact(r: Record) -> bool:
        return r["undefended"]["asr"] >= EFFECTIVE_ASR and r["undefended"]["acc"] >= INTACT_ACC

    parts = []
    for lam, recs in rows:
        ok = [r for r in recs if intact(r)]
        bad = [r for r in recs if not intact(r)]
        text = (f"λ = {lam:g}: {len(ok)}/{len(recs)} models keep the backdoor and the clean accuracy (ASR ≥ 50 %, "
                f"ACC ≥ {100 * INTACT_ACC:g} %)")
        if ok:
            text += (f"; on those ACC {mean_pct(ok, 'undefended.acc')} %, ASR {mean_pct(ok, 'undefended.asr')} %, "
                     f"‖s_t‖/median ‖s_k‖ {mean_num(ok, 'standin.qp_ratio', 2)}, TAC target score "
                     f"{mean_num(ok, 'tac_detect.target_scores.0', 2)}, target flagged "
                     f"{frac([TARGET in r['tac_detect']['flagged'] for r in ok])}, another class flagged "
                     f"{frac([bool(r['tac_detect']['false_flags']) for r in ok])}; ASR after TAC / FIRE defaults "
                     f"{mean_pct(ok, 'tac.asr')} / {mean_pct(ok, 'fire.asr')} %, with the target given "
                     f"{mean_pct(ok, 'tac_given.asr')} % (TAC, ACC {mean_pct(ok, 'tac_given.acc')} %) and "
                     f"{mean_pct(ok, 'fire_given.asr')} % (FIRE, ACC {mean_pct(ok, 'fire_given.acc')} %)")
        if bad:
            text += (f"; the other {len(bad)} collapsed in training (ACC "
                     f"{per_seed(bad, 'undefended.acc')} %, ASR "
                     f"{per_seed(bad, 'undefended.asr')} %)")
        parts.append(text)
    evaded = [r for lam, recs in rows if lam > 0 for r in recs if intact(r) and TARGET not in r["tac_detect"]["flagged"]]
    kept = [r for lam, recs in rows if lam > 0 for r in recs if intact(r)]
    verdict = (f" Of the {len(kept)} adaptive models (λ > 0) that kept their backdoor, {len(evaded)} have the target "
               "unflagged at α = 4, so the detection-driven defaults of TAC and FIRE do not remove their backdoor; "
               "removal with the target named still lowers ASR (numbers above)." if kept else "")
    reading = ". ".join(parts) + "." + verdict
    notes = ["Stand-in: r_k = max_i max_{j≠k} max(0, (w_j − w_k)ᵀz_i + b_j − b_k)/‖w_k − w_j‖ over the clean "
             "latents of the batch — the distance to the single most violated constraint of TAC's QP, hence a lower "
             "bound of ‖s_k‖ (quantile 1). The attacker adds λ·max(0, log median_k r_k − log r_t)² to the "
             "cross-entropy (a hinge: no push once r_t reaches the median), computed on the batch's clean images "
             "(the poisoned ones are excluded; the attacker knows which they are). The poisoned training set is "
             "BadNets' own (10 %, target 0); λ = 0 is the plain BadNets model (the same model as in the other "
             "studies). Columns r_t/median r and ‖s_t‖/median ‖s_k‖ are measured afterwards on the clean reserve "
             "(eval mode); r_t/‖s_t‖ says how tight the bound is on the target."]

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        x = range(len(rows))
        for path_, label, style in (("undefended.asr", "ASR undefended", "k-o"), ("tac.asr", "ASR after TAC", "C0-o"),
                                    ("fire.asr", "ASR after FIRE", "C1-o"),
                                    ("tac_given.asr", "ASR after TAC, target given", "C0:^"),
                                    ("fire_given.asr", "ASR after FIRE, target given", "C1:^"),
                                    ("undefended.acc", "ACC undefended", "k--s")):
            ms = [mean_std(pluck(r, path_)) for _, r in rows]
            axes[0].errorbar(x, [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], fmt=style, label=label, capsize=3)
        axes[0].set_ylim(-5, 105)
        axes[0].set_ylabel("% (mean ± std over seeds)")
        axes[0].legend(fontsize=7)
        ms = [mean_std(pluck(r, "tac_detect.target_scores.0")) for _, r in rows]
        axes[1].errorbar(x, [m for m, _ in ms], yerr=[s for _, s in ms], fmt="C3-o", capsize=3, label="TAC target score")
        axes[1].axhline(DEFAULT_THRESHOLD, color="gray", ls=":", lw=0.8, label="α = 4")
        axes[1].set_ylabel("anomaly index of class 0")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(list(x), [f"λ = {lam:g}" for lam, _ in rows])
            ax.grid(alpha=0.3)
        fig.suptitle("Adaptive BadNets against TAC (λ ≥ 1: means mix collapsed and intact models)", fontsize=10)
        _save(fig, path)

    return Report("Adaptive attacker: BadNets trained to hide from TAC",
                  f"BadNets (10 %, target 0) trained with an extra loss λ·max(0, log median_k r_k − log r_t)² for "
                  f"λ ∈ {{{', '.join(f'{lam:g}' for lam in LAMBDAS)}}}, where r_k is a differentiable lower bound of "
                  "TAC's ‖s_k‖ on each batch's clean latents (see the note). Reported: ACC / ASR / RA of the attacked "
                  "model, TAC detection (target score, flagged at α = 4), TAC removal and FIRE with their defaults "
                  "(detection-driven) and with the target given.",
                  reading, lines, summary, plot, notes)


# ----------------------------------------------------------------------------------------------- study 6
NC_MODELS = ("clean", *DETECT_ATTACKS)


def run_nc_vs_tac(lab: Lab, store: Store, seeds: Sequence[int]) -> None:
    """Detection only: NC with unlearn=False (its detect-only path) and TAC with detect_only=True, same models."""
    for name in NC_MODELS:
        for seed in seeds:
            def make(name: str = name, seed: int = seed) -> Record:
                t = lab.trained(ModelSpec(None if name == "clean" else name), seed)
                return {"undefended": measure(t.model, lab, t), "targets": t.targets,
                        "tac": tac_detect(lab, t, seed),
                        "nc": run_defense(lab, t, seed, "nc", score=False, unlearn=False)["detection"]}
            store.ensure(name, seed, make)


def _correct(det: Record, targets: Sequence[int]) -> bool:
    """Clean: nothing flagged; backdoored: the target flagged (other flags counted separately)."""
    return det["targets_flagged"] == len(targets) if targets else not det["flagged"]


def report_nc_vs_tac(store: Store, seeds: Sequence[int]) -> Report:
    """Tables, reading and plot of ``nc_vs_tac``."""
    lines = ["| model | ACC | ASR | TAC correct | TAC exact | TAC target score | NC correct | NC exact | NC target score "
             "| TAC s | NC s | NC / TAC time |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    allrecs, summary = [], []
    for name in NC_MODELS:
        recs = store.get(name, seeds)
        if not recs:
            continue
        allrecs += recs
        cells = []
        for m in ("tac", "nc"):
            ok = [_correct(r[m], r["targets"]) for r in recs]
            exact = [_correct(r[m], r["targets"]) and not r[m]["false_flags"] for r in recs]
            score = pm(pluck(recs, f"{m}.target_scores.0"), 1, 2) if name != "clean" else \
                f"max {pm([max(r[m]['scores']) for r in recs], 1, 2)}"
            cells += [frac(ok), frac(exact), score]
        ratio = [r["nc"]["seconds"] / r["tac"]["seconds"] for r in recs]
        lines.append(f"| {name} | {pm(pluck(recs, 'undefended.acc'))} | "
                     f"{pm(pluck(recs, 'undefended.asr')) if name != 'clean' else '–'} | {' | '.join(cells)} "
                     f"| {pm(pluck(recs, 'tac.seconds'), 1, 3)} | {pm(pluck(recs, 'nc.seconds'), 1, 1)} | {pm(ratio, 1, 0)} |")
        summary.append({"model": name, "tac_correct": sum(_correct(r["tac"], r["targets"]) for r in recs),
                        "nc_correct": sum(_correct(r["nc"], r["targets"]) for r in recs),
                        **summary_row(recs, ["tac.seconds", "nc.seconds", "tac.target_scores.0", "nc.target_scores.0"])})
    tac_ok = [_correct(r["tac"], r["targets"]) for r in allrecs]
    nc_ok = [_correct(r["nc"], r["targets"]) for r in allrecs]
    tac_ex = [o and not r["tac"]["false_flags"] for o, r in zip(tac_ok, allrecs, strict=True)]
    nc_ex = [o and not r["nc"]["false_flags"] for o, r in zip(nc_ok, allrecs, strict=True)]
    t_tac = max(sum(pluck(allrecs, "tac.seconds")), 1e-9)
    t_nc = sum(pluck(allrecs, "nc.seconds"))
    lines.append(f"| **all** | | | {frac(tac_ok)} | {frac(tac_ex)} | | {frac(nc_ok)} | {frac(nc_ex)} | "
                 f"| {t_tac / max(1, len(allrecs)):.3f} | {t_nc / max(1, len(allrecs)):.1f} | {t_nc / t_tac:.0f} (total) |")
    eff = [r for r in allrecs if r["targets"] and r["undefended"]["asr"] >= EFFECTIVE_ASR]
    cl = [r for r in allrecs if not r["targets"]]
    reading = (f"Over {len(allrecs)} models TAC's verdict was correct for {frac(tac_ok)} ({frac(tac_ex)} with no extra "
               f"class flagged) and Neural Cleanse's for {frac(nc_ok)} ({frac(nc_ex)}). On the {len(eff)} backdoored "
               f"models whose backdoor was learned (ASR ≥ 50 %) TAC flagged the target in "
               f"{frac([_correct(r['tac'], r['targets']) for r in eff])} and NC in "
               f"{frac([_correct(r['nc'], r['targets']) for r in eff])}; on the {len(cl)} clean models TAC raised "
               f"{sum(bool(r['tac']['flagged']) for r in cl)} and NC {sum(bool(r['nc']['flagged']) for r in cl)} false "
               f"alarms, and on backdoored models NC flagged a non-target class {sum(bool(r['nc']['false_flags']) for r in allrecs)} "
               f"times, TAC {sum(bool(r['tac']['false_flags']) for r in allrecs)}. Per model (correct / seeds): "
               + "; ".join(f"{s['model']} TAC {s['tac_correct']}/{s['n']}, NC {s['nc_correct']}/{s['n']}" for s in summary)
               + f". NC's detection took {t_nc / t_tac:.0f}× TAC's wall time in total ({t_nc / max(1, len(allrecs)):.1f} s "
               f"vs {t_tac / max(1, len(allrecs)):.3f} s per model).")
    notes = ["Correct = clean model: nothing flagged; backdoored model: the target (0) flagged. Exact = correct and "
             "no other class flagged. Each detector uses its own default threshold (TAC α = 4 on the MAD index of "
             "log ‖s_k‖; NC 2 on the MAD index of the mask L1 norms). NC runs its defaults (30 epochs of at most "
             "1,000 reserve samples per class, early stop) with `unlearn=False`, its detect-only path, so both "
             "times are detection only (the defense's own wall clock, model copy excluded)."]

    def plot(path: Path) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        names = [s["model"] for s in summary]
        for i, m in enumerate(("tac", "nc")):
            axes[0].bar(np.arange(len(names)) + (i - 0.5) * 0.38, [s[f"{m}_correct"] / s["n"] * 100 for s in summary],
                        0.38, label=m.upper())
        axes[0].set_xticks(range(len(names)), names)
        axes[0].set_ylabel("% of seeds with the correct verdict")
        axes[0].legend(fontsize=8)
        for i, m in enumerate(("tac", "nc")):
            axes[1].bar(np.arange(len(names)) + (i - 0.5) * 0.38, [s[f"{m}.seconds"]["mean"] for s in summary], 0.38,
                        yerr=[s[f"{m}.seconds"]["std"] for s in summary], capsize=3, label=m.upper())
        axes[1].set_yscale("log")
        axes[1].set_xticks(range(len(names)), names)
        axes[1].set_ylabel("detection wall seconds (log)")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3, axis="y")
        _save(fig, path)

    return Report("Neural Cleanse vs TAC: detection accuracy and wall time",
                  f"Detection verdicts of Neural Cleanse and TAC (each with its defaults) on the same models — clean "
                  f"and {', '.join(DETECT_ATTACKS)} (10 %, target 0, WaNet s = 3) — and their wall time on one CPU thread.",
                  reading, lines, summary, plot, notes)


# ----------------------------------------------------------------------------------------------- output
RUNNERS: dict[str, tuple[Callable[[Lab, Store, Sequence[int]], None], Callable[[Store, Sequence[int]], Report]]] = {
    "poison_rate": (run_poison_rate, report_poison_rate),
    "beta_alpha": (run_beta_alpha, report_beta_alpha),
    "two_target": (run_two_target, report_two_target),
    "all_to_all": (run_all_to_all, report_all_to_all),
    "adaptive": (run_adaptive, report_adaptive),
    "nc_vs_tac": (run_nc_vs_tac, report_nc_vs_tac),
}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _json_safe(v: Any) -> Any:
    """Non-finite floats → None, tuples → lists: strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


def write_report(study: str, report: Report, store: Store, seeds: Sequence[int], command: str, epochs: int,
                 out: Path) -> None:
    """``<study>.md`` (paragraph, tables, notes), ``<study>.json`` (summary + records) and ``<study>.png``."""
    setup = (f"Model/data: small_cnn (width 32, latent 128) on the embedded 16×16 digits (1,347 train / 450 test), "
             f"{epochs} epochs SGD (lr 0.05, batch 64, one-cycle, random crops), seeds {', '.join(map(str, seeds))} "
             "(model init, poisoning, reserve and defense seed); defenses see only a clean reserve of 130 training "
             "images (10 %, class-balanced); cells are mean ± std (ddof 1) over seeds, in % unless a score or seconds; "
             "1 CPU thread.")
    md = [f"# {report.title}", "",
          f"{report.measured} Reproduce: `{command}`. {setup} **Reading:** {report.reading}", "",
          *report.tables, ""]
    for note in report.notes:
        md += [note, ""]
    md.append(f"Plot: `{study}.png`; per-seed records: `{study}.json` (cache: `{study}.jsonl`).")
    (out / f"{study}.md").write_text("\n".join(md) + "\n")
    used = set(seeds) | (set(clean_seeds(seeds)) if study == "beta_alpha" else set())
    records = sorted((r for r in store.records.values() if r["seed"] in used), key=lambda r: r["key"])
    (out / f"{study}.json").write_text(json.dumps(_json_safe(
        {"study": study, "command": command, "epochs": epochs, "seeds": list(seeds), "summary": report.summary,
         "records": records}), indent=1) + "\n")
    report.plot(out / f"{study}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {', '.join(STUDIES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown:
        parser.error(f"unknown studies {unknown}: choose from {', '.join(STUDIES)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    lab = Lab(args.epochs)
    t_all = time.perf_counter()
    for study in studies:
        t0 = time.perf_counter()
        print(f"== {study}", flush=True)
        run, report = RUNNERS[study]
        store = Store(args.out / f"{study}.jsonl")
        run(lab, store, seeds)
        opts = [f"--studies {study}", f"--seeds {args.seeds}", f"--epochs {args.epochs}"]
        if args.out != DEFAULT_OUT:
            opts.append(f"--out {shlex.quote(args.out.name if args.out.is_absolute() else str(args.out))}")
        command = "OMP_NUM_THREADS=1 python benchmarks/studies_digits.py " + " ".join(opts)
        write_report(study, report(store, seeds), store, seeds, command, args.epochs, args.out)
        print(f"== {study} written in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"all done in {time.perf_counter() - t_all:.0f}s", flush=True)


if __name__ == "__main__":
    main()
