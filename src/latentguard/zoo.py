"""A reproducible, resumable zoo of backdoored models (plus one clean model per dataset) on real data.

Layout: ``ROOT/<dataset>/<cell>/`` with ``model.safetensors`` + ``model.json`` (architecture), ``attack.json``
(+ tensors), ``poisoned_indices.json``, ``reserve_indices.json`` (the defender's clean reserve: a
class-balanced share of the training set that excludes every poisoned index) and ``metrics.json`` (ACC, ASR,
RA, minutes). A cell whose ``metrics.json`` exists is finished and skipped, so the build resumes where it
stopped; each cell is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentguard.errors import LatentGuardError
from latentguard.published import BACKDOORBENCH_CIFAR10

if TYPE_CHECKING:
    import torch

    from latentguard.data import Images


@dataclass
class ZooConfig:
    """How every cell is trained; the defaults keep a CIFAR-10 cell within about 15 minutes on 2 CPU cores.

    The standard setting of the literature (width 64, more epochs) is one flag away for GPU machines.
    """

    model: str = "preact_resnet18"
    width: int = 16
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    rate: float = 0.1
    target: int = 0
    seed: int = 0
    reserve_fraction: float = 0.05
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LatentGuardError("zoo: epochs, batch size and learning rate must be positive")
        if not 0.0 < self.reserve_fraction < 1.0:
            raise LatentGuardError(f"zoo: reserve fraction must be in (0, 1), got {self.reserve_fraction}")


DATASET_ARCHIVES = {"cifar10": ("cifar10-jpeg.tar.gz", "cifar10"), "gtsrb": ("gtsrb-official.tar.xz", "GTSRB")}


def default_zoo_root() -> Path:
    from latentguard.data import cache_dir

    return cache_dir() / "zoo"


def data_spec_for(dataset: str, data_root: str | Path) -> str:
    """``cifar10``/``gtsrb`` → a data spec under ``data_root`` (archive or unpacked folder); else unchanged."""
    if dataset not in DATASET_ARCHIVES:
        return dataset
    root = Path(data_root)
    for name in DATASET_ARCHIVES[dataset]:
        if (root / name).exists():
            return f"{dataset}:{root / name}"
    raise LatentGuardError(f"no {dataset} data under {root}: pass --data-root DIR holding "
                           f"{' or '.join(DATASET_ARCHIVES[dataset])}")


def cell_dir(root: str | Path, dataset: str, cell: str) -> Path:
    return Path(root) / dataset / cell


def cell_reserve(cell: str | Path, train):
    """The defender's clean reserve of a zoo cell: its ``reserve_indices.json`` applied to the training split."""
    import json

    return train.subset(np.asarray(json.loads((Path(cell) / "reserve_indices.json").read_text())["indices"]))


def spec_target(spec: dict[str, Any] | None) -> int | None:
    """The target class of a cell's attack spec; None for the clean model and for an all-to-all attack."""
    if spec is None or spec.get("all_to_all"):
        return None
    return spec.get("target")


@dataclass(frozen=True)
class ZooModel:
    """One finished zoo cell, ready for a defense: its metrics, attack, clean reserve and model (eval mode)."""

    dataset: str
    name: str
    path: Path
    record: dict[str, Any]  # the cell's metrics.json
    spec: dict[str, Any] | None  # the attack spec (``record["parameters"]["attack"]``); None for the clean model
    reserve: Images
    model: torch.nn.Module

    @property
    def target(self) -> int | None:
        """The backdoor's target class; None for the clean model and for an all-to-all attack."""
        return spec_target(self.spec)

    @property
    def asr(self) -> float | None:
        """The undefended model's attack success rate (None for the clean model)."""
        return self.record["metrics"].get("asr")


def zoo_models(root: str | Path, data_root: str | Path, *, clean: bool = True, all_to_all: bool = False,
               cells: Collection[str] | None = None) -> Iterator[ZooModel]:
    """Every finished cell under ``root``, sorted by dataset and cell, with its reserve and model loaded.

    ``clean=False`` leaves out the clean models, ``all_to_all=False`` the all-to-all attacks; ``cells`` (names
    ``dataset/cell``) keeps only those. Each dataset is loaded from ``data_root`` once, when its first cell comes,
    and replaced by the next one (cells come sorted by dataset), so at most one dataset is held at a time.
    """
    from latentguard.data import load_data
    from latentguard.models import load_model

    loaded: tuple[str, Any] | None = None  # (dataset, splits)
    for metrics in sorted(Path(root).glob("*/*/metrics.json")):
        cell = metrics.parent
        dataset, name = cell.parent.name, cell.name
        if cells is not None and f"{dataset}/{name}" not in cells:
            continue
        record = json.loads(metrics.read_text())
        spec = record["parameters"].get("attack")
        if (spec is None and not clean) or (spec is not None and spec.get("all_to_all") and not all_to_all):
            continue
        if loaded is None or loaded[0] != dataset:
            loaded = None  # free the previous dataset before loading the next
            loaded = (dataset, load_data(data_spec_for(dataset, data_root)))
        yield ZooModel(dataset=dataset, name=name, path=cell, record=record, spec=spec,
                       reserve=cell_reserve(cell, loaded[1].train), model=load_model(str(cell / "model.json")).eval())


def is_done(path: Path) -> bool:
    return (path / "metrics.json").is_file()


def build_cell(root: str | Path, dataset: str, data_spec: str, attack: str | None, config: ZooConfig, *,
               device: str = "auto", progress: bool = False, splits=None) -> dict[str, Any]:
    """Train one cell (``attack`` None = the clean model) unless it is already finished; return its metrics."""
    import torch

    from latentguard.attacks import AttackContext, make_attack, save_attack
    from latentguard.data import load_data
    from latentguard.device import resolve_device
    from latentguard.evaluation import evaluate
    from latentguard.io import atomic_output_dir, result_record, write_json
    from latentguard.models import save_model
    from latentguard.train import TrainConfig, fit
    from latentguard.workflows import model_arch, new_model

    name = attack or "clean"
    out = cell_dir(root, dataset, name)
    if is_done(out):
        return json.loads((out / "metrics.json").read_text())
    dev = resolve_device(device)
    t0 = time.perf_counter()
    splits = splits or load_data(data_spec)
    h, w, c = splits.train.image_shape
    arch = model_arch(config.model, splits, config.width)
    cfg = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                      progress=progress)
    torch.manual_seed(config.seed)
    with atomic_output_dir(out, overwrite=True) as tmp:
        net = new_model(arch, seed=config.seed)
        poisoned = np.zeros(0, dtype=np.int64)
        atk = None
        if attack is None:
            history = fit(net, splits.train, cfg, device=dev)
        else:
            atk = make_attack(attack, num_classes=splits.train.num_classes, image_shape=(c, h, w),
                              target=config.target, rate=config.rate, seed=config.seed,
                              params=config.attack_params.get(attack, {}))
            clean_model = _load_clean(root, dataset, arch) if atk.needs_preparation else None
            context = AttackContext(train=splits.train, build_model=lambda: new_model(arch, seed=config.seed + 1),
                                    train_config=cfg, device=dev, clean_model=clean_model)
            history, poisoned = atk.train_model(net, context)
            save_attack(atk, tmp)
        ev = evaluate(net, splits.test, atk, device=dev)
        save_model(net.cpu(), tmp, arch)
        reserve, originals = defender_reserve(splits.train, config.reserve_fraction, config.seed, poisoned,
                                              clean_label=atk is not None and atk.clean_label)
        write_json(tmp / "poisoned_indices.json", {"indices": poisoned.tolist(), "count": int(len(poisoned))})
        write_json(tmp / "reserve_indices.json", {"indices": reserve.tolist(), "fraction": config.reserve_fraction,
                                                  "clean_originals_of_classes": originals})
        minutes = (time.perf_counter() - t0) / 60
        record = result_record(
            "zoo", parameters={"dataset": dataset, "data": data_spec, "attack": atk.spec.to_json() if atk else None,
                               "model": arch, "zoo": asdict(config)},
            metrics={**ev.to_dict(), "minutes": minutes}, seconds=minutes * 60,
            extra={"history": history.to_dict(), "cell": name, "dataset": dataset},
        )
        write_json(tmp / "metrics.json", record)
    return record


def defender_reserve(train, fraction: float, seed: int, poisoned: np.ndarray, *,
                     clean_label: bool = False) -> tuple[np.ndarray, list[int]]:
    """The defender's clean reserve: a class-balanced share of the training set without any poisoned index.

    A clean-label attack may poison every image of its target class (SIG at 10 % takes all of CIFAR-10's and
    GTSRB's target images). Its images were never relabelled, so the unmodified originals of such a class are
    correctly labelled clean images: the reserve takes them for that class rather than leave it out. Returns the
    indices and the classes served from originals.
    """
    from latentguard.data import clean_reserve

    poisoned = np.asarray(poisoned, dtype=np.int64)
    y = np.asarray(train.y)
    exhausted = [int(k) for k in np.unique(y[poisoned])
                 if clean_label and np.isin(np.flatnonzero(y == k), poisoned).all()]
    keep_out = poisoned[~np.isin(y[poisoned], exhausted)]
    return clean_reserve(train, fraction, seed=seed, exclude=keep_out), exhausted


def _load_clean(root: str | Path, dataset: str, arch: dict[str, Any]):
    """The dataset's clean zoo model, for attacks that optimise a trigger against a clean model."""
    path = cell_dir(root, dataset, "clean")
    if not is_done(path):
        return None
    from latentguard.models import load_model

    return load_model(str(path / "model.json"))


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Metrics of every finished cell under ``root``, sorted by dataset and cell."""
    rows = []
    for metrics in sorted(Path(root).glob("*/*/metrics.json")):
        rec = json.loads(metrics.read_text())
        m = rec["metrics"]
        rows.append({"dataset": rec.get("dataset", metrics.parent.parent.name), "cell": rec.get("cell", metrics.parent.name),
                     "acc": m["acc"], "asr": m.get("asr"), "ra": m.get("ra"), "minutes": m.get("minutes"),
                     "model": rec["parameters"]["model"], "epochs": rec["parameters"]["zoo"]["epochs"],
                     "target": spec_target(rec["parameters"].get("attack")),
                     "attack_params": rec["parameters"]["zoo"].get("attack_params", {}).get(
                         rec.get("cell", metrics.parent.name), {}),
                     "fastest_epoch_s": min((e["seconds"] for e in rec.get("history", {}).get("epochs", [])),
                                            default=None)})
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The zoo table with BackdoorBench's published CIFAR-10 no-defense figures beside ours."""

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| dataset | cell | model | epochs | target | attack parameters set | ACC % | ASR % | RA % | minutes "
             "| fastest epoch s | BackdoorBench ACC/ASR % |", "|---" * 12 + "|"]
    for r in rows:
        # BackdoorBench's figures are for target 0
        bb = BACKDOORBENCH_CIFAR10.get(r["cell"]) if r["dataset"] == "cifar10" and r.get("target") == 0 else None
        ref = f"{bb[0]:.1f} / {bb[1]:.1f}" if bb else "–"
        model = f"{r['model']['arch']} w{r['model']['width']}"
        fastest = "–" if r.get("fastest_epoch_s") is None else f"{r['fastest_epoch_s']:.0f}"
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.get("attack_params", {}).items())) or "–"
        target = "–" if r.get("target") is None else r["target"]
        lines.append(f"| {r['dataset']} | {r['cell']} | {model} | {r['epochs']} | {target} | {params} | {pct(r['acc'])} | {pct(r['asr'])} "
                     f"| {pct(r['ra'])} | {r['minutes']:.1f} | {fastest} | {ref} |")
    return "\n".join(lines) + "\n"


def write_table(root: str | Path, out: str | Path | None = None) -> Path:
    """``zoo.md`` and ``zoo.json`` of every finished cell, in ``out`` (default: the zoo root)."""
    from latentguard.io import write_json

    rows = collect(root)
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "zoo.md"
    d = ZooConfig()
    path.write_text(
        f"# Model zoo\n\nBuilt with `latentguard zoo build` (defaults: {d.model} width {d.width}, {d.epochs} epochs, "
        f"SGD OneCycle lr {d.lr}, batch {d.batch_size}, {100 * d.rate:g} % poisoning, seed {d.seed}, "
        f"crop/flip augmentation; each row names its model and epochs) on {os.cpu_count()} CPU cores ({platform.machine()}); minutes are wall time per cell, including the test "
        "evaluation, and grow when other jobs share the cores (the fastest epoch shows the undisturbed pace). ASR is measured on triggered test images whose "
        "label is not the target; RA on the same images against their true labels. BackdoorBench figures: CIFAR-10, "
        "PreAct-ResNet18 (width 64, 100 epochs), 10 % poisoning, no defense, as published. \"Attack parameters set\" lists "
        "what `--attack-param` changed from the attack's defaults (CPU reductions).\n\n" + table_markdown(rows))
    write_json(out / "zoo.json", rows)
    return path
