"""What each CLI verb does, as plain functions over the library (the CLI only parses and reports).

Each ``*_command`` loads its inputs, runs, and writes its output directory atomically with the one result
schema of :mod:`latentguard.io`; it returns the result record.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentguard.data import DataSplits, load_data
from latentguard.device import resolve_device, seed_everything
from latentguard.errors import DataError, LatentGuardError, ModelError
from latentguard.io import atomic_output_dir, result_record, write_json
from latentguard.train import TrainConfig, fit


def _data_path(spec: str) -> str | None:
    """The filesystem path inside a data spec (for input hashing and overwrite checks)."""
    if spec == "digits":
        return None
    return spec.split(":", 1)[1] if ":" in spec and not Path(spec).exists() else spec


def model_arch(name: str, data: DataSplits, width: int | None) -> dict[str, Any]:
    """The architecture description saved as model.json for a built-in model trained on ``data``."""
    h, w, c = data.train.image_shape
    if h != w:
        raise LatentGuardError(f"built-in models take square images, data is {h}×{w}: resize it")
    return {"arch": name, "num_classes": data.train.num_classes, "in_channels": c, "image_size": h,
            "width": width}


def new_model(arch: dict[str, Any], *, seed: int) -> nn.Module:
    from latentguard.models import build_model

    seed_everything(seed)
    return build_model(arch["arch"], arch["num_classes"], in_channels=arch["in_channels"],
                       image_size=arch["image_size"], width=arch["width"])


def open_model(spec: str, weights: str | None, data: DataSplits | None, *, width: int | None = None,
               head: str | None = None) -> nn.Module:
    """Load a model to inspect: built-in name, FILE.py:callable or a latentguard model directory/json."""
    from latentguard.models import load_model

    kwargs: dict[str, Any] = {"weights": weights, "width": width}
    if data is not None:
        h, _, c = data.train.image_shape
        kwargs.update(num_classes=data.train.num_classes, in_channels=c, image_size=h)
    model = load_model(spec, **kwargs)
    check_model_finite(model)
    if head is not None:
        check_head(model, head)
    if data is not None:
        check_model_fits(model, data)
    return model


def check_model_finite(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN/Inf (nothing it computes would mean anything)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}: pass the classifier itself")
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f", … (+{len(bad) - 3})" if len(bad) > 3 else "")
        raise ModelError(f"the model has NaN/Inf values in {shown}: the weights are broken, retrain or reload them")


def check_head(model: nn.Module, head: str) -> None:
    """``head`` must name an nn.Linear of ``model``."""
    from latentguard.models import named_layer

    layer = named_layer(model, head)
    if not isinstance(layer, nn.Linear):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ModelError(f"--head {head!r} is a {type(layer).__name__}, not an nn.Linear: use one of "
                         f"{', '.join(linears[-5:]) or '(none: the model has no nn.Linear)'}")


def check_model_fits(model: nn.Module, data: DataSplits) -> None:
    """The model must take the data's images and output one logit per class of the data."""
    x, _ = data.test.subset(range(min(2, len(data.test)))).tensors()
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # the user's own model code may raise anything
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the model cannot process this data's {tuple(x.shape[1:])} images ({msg}): "
                         "check the model's input channels and image size match the data") from exc
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns a {type(out).__name__}, not a tensor of logits: "
                         "make forward() return the logits")
    if out.ndim != 2 or out.shape[1] != data.train.num_classes:
        raise ModelError(
            f"the model outputs {tuple(out.shape[1:])} logits but the data has {data.train.num_classes} classes: "
            "use the model trained for this dataset"
        )


def train_config(epochs: int, lr: float, batch_size: int, seed: int, progress: bool) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)


def train_command(*, data: str, model: str, width: int | None, epochs: int, lr: float, batch_size: int, out: str,
                  overwrite: bool, device: str, seed: int, progress: bool) -> dict[str, Any]:
    from latentguard.evaluation import evaluate
    from latentguard.models import save_model

    dev = resolve_device(device)
    t0 = time.perf_counter()
    splits = load_data(data)
    arch = model_arch(model, splits, width)
    net = new_model(arch, seed=seed)
    cfg = train_config(epochs, lr, batch_size, seed, progress)
    with atomic_output_dir(out, inputs=[_data_path(data)], overwrite=overwrite) as tmp:
        history = fit(net, splits.train, cfg, device=dev)
        ev = evaluate(net, splits.test, device=dev)
        save_model(net.cpu(), tmp, arch)
        record = result_record(
            "train", inputs={"data": _data_path(data)},
            parameters={"data": data, "model": arch, "train": cfg.__dict__, "seed": seed},
            metrics=ev.to_dict(), seconds=time.perf_counter() - t0, extra={"history": history.to_dict()},
        )
        write_json(tmp / "train.json", record)
    return record


def evaluate_command(*, data: str, model: str, weights: str | None, head: str | None, width: int | None,
                     attack: str | None, repair: str | None, out: str | None, overwrite: bool,
                     device: str) -> dict[str, Any]:
    from latentguard.evaluation import evaluate

    dev = resolve_device(device)
    t0 = time.perf_counter()
    splits = load_data(data)
    net = open_model(model, weights, splits, width=width, head=head)
    atk = None
    if attack is not None:
        from latentguard.attacks import load_attack

        atk = load_attack(attack)
    if repair is not None:
        from latentguard.defenses.fire import load_repair

        net = load_repair(net, repair, head=head)
    ev = evaluate(net, splits.test, atk, device=dev)
    record = result_record(
        "evaluate", inputs={"data": _data_path(data), "weights": weights, "attack": attack, "repair": repair},
        parameters={"data": data, "model": model}, metrics=ev.to_dict(), seconds=time.perf_counter() - t0,
    )
    if out is not None:
        with atomic_output_dir(out, inputs=[weights, attack, repair, _data_path(data), _model_path(model)],
                               overwrite=overwrite) as tmp:
            write_json(tmp / "evaluation.json", record)
    return record


def attack_command(*, data: str, attack: str, target: int, rate: float, all_to_all: bool, params: dict[str, Any],
                   model: str, width: int | None, epochs: int, lr: float, batch_size: int, out: str,
                   overwrite: bool, device: str, seed: int, progress: bool) -> dict[str, Any]:
    from latentguard.attacks import AttackContext, make_attack, save_attack
    from latentguard.evaluation import evaluate
    from latentguard.models import save_model

    dev = resolve_device(device)
    t0 = time.perf_counter()
    splits = load_data(data)
    h, w, c = splits.train.image_shape
    atk = make_attack(attack, num_classes=splits.train.num_classes, image_shape=(c, h, w), target=target,
                      rate=rate, all_to_all=all_to_all, seed=seed, params=params)
    arch = model_arch(model, splits, width)
    cfg = train_config(epochs, lr, batch_size, seed, progress)
    context = AttackContext(train=splits.train, build_model=lambda: new_model(arch, seed=seed + 1),
                            train_config=cfg, device=dev)
    with atomic_output_dir(out, inputs=[_data_path(data)], overwrite=overwrite) as tmp:
        net = new_model(arch, seed=seed)
        history, poisoned = atk.train_model(net, context)
        ev = evaluate(net, splits.test, atk, device=dev)
        save_model(net.cpu(), tmp, arch)
        save_attack(atk, tmp)
        write_json(tmp / "poisoned_indices.json", {"indices": poisoned.tolist(), "count": len(poisoned),
                                                   "train_size": len(splits.train)})
        record = result_record(
            "attack", inputs={"data": _data_path(data)},
            parameters={"data": data, "attack": atk.spec.to_json(), "model": arch, "train": cfg.__dict__,
                        "seed": seed},
            metrics=ev.to_dict(), seconds=time.perf_counter() - t0, extra={"history": history.to_dict()},
        )
        write_json(tmp / "metrics.json", record)
    return record


def print_metrics_table(title: str, metrics: dict[str, Any]) -> None:
    """A small two-column table on stdout (rates as percentages)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, float) and key.lower().split()[-1] in ("acc", "asr", "ra"):
            table.add_row(key.upper() if key.islower() else key, f"{100 * value:.2f} %")
        else:
            table.add_row(str(key), str(value))
    Console().print(table)


# ----------------------------------------------------------------------------- defender-side commands
def load_clean(data: str, *, fraction: float | None, seed: int, indices: str | None = None):
    """The defender's clean data: the training split of ``data`` (all of it, a class-balanced ``fraction``,
    or the indices listed in a JSON file such as a zoo cell's reserve_indices.json); plus the splits."""
    import json

    import numpy as np

    from latentguard.data import clean_reserve

    splits = load_data(data)
    train = splits.train
    if indices is not None:
        try:
            idx = np.asarray(json.loads(Path(indices).read_text())["indices"], dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{indices} is not an indices JSON file ({type(exc).__name__}: {exc}): write it as "
                            '{"indices": [0, 5, ...]}, e.g. the reserve_indices.json of a zoo cell') from exc
        if idx.size and (idx.min() < 0 or idx.max() >= len(train)):
            raise DataError(f"{indices} lists indices in [{idx.min()}, {idx.max()}] but the training split of "
                            f"{data} has {len(train)} images: use indices written for this data")
        reserve = train.subset(idx)
    elif fraction is not None:
        reserve = train.subset(clean_reserve(train, fraction, seed=seed))
    else:
        reserve = train
    if len(reserve) < reserve.num_classes:
        raise DataError(f"the clean reserve has {len(reserve)} images for {reserve.num_classes} classes: "
                        "give at least one image per class (a larger --clean-fraction or more --clean-indices)")
    return reserve, splits


def _model_path(model: str) -> str | None:
    """The file or directory a model spec reads (None for a built-in name)."""
    model_path = model.rsplit(":", 1)[0] if ".py:" in model else model
    return model_path if Path(model_path).exists() else None


def _defender_inputs(model: str, weights: str | None, clean: str, extra: list[str | None]) -> list[str | None]:
    return [weights, _data_path(clean), _model_path(model), *extra]


def detect_command(*, model: str, weights: str | None, head: str | None, width: int | None, clean: str,
                   clean_fraction: float | None, clean_indices: str | None, threshold: float | None, quantile: float,
                   out: str, overwrite: bool, device: str, seed: int, statistic: str = "both",
                   noise_probe: float | None = None, smooth_probe: float | None = None,
                   mad_floor: float | None = None, alignment: bool | None = None) -> dict[str, Any]:
    from latentguard.defenses.tac import detect
    from latentguard.report import plot_detection

    dev = resolve_device(device)
    seed_everything(seed)
    reserve, splits = load_clean(clean, fraction=clean_fraction, seed=seed, indices=clean_indices)
    net = open_model(model, weights, splits, width=width, head=head)
    with atomic_output_dir(out, inputs=_defender_inputs(model, weights, clean, [clean_indices]),
                           overwrite=overwrite) as tmp:
        report = detect(net, reserve, threshold=threshold, quantile=quantile, device=dev, head=head,
                        statistic=statistic, noise_probe=noise_probe, smooth_probe=smooth_probe,
                        mad_floor=mad_floor, alignment=alignment)
        payload = {**report.to_json(), "class_names": reserve.class_names, "clean_size": len(reserve)}
        write_json(tmp / "detection.json", payload)
        plot_detection(payload, tmp / "detection.png", class_names=reserve.class_names)
        record = result_record("detect", inputs={"weights": weights, "clean": _data_path(clean)},
                               parameters={"model": model, "clean": clean, "clean_fraction": clean_fraction,
                                           "threshold": threshold, "quantile": quantile, "statistic": statistic,
                                           "noise_probe": report.extra.get("noise_probe", 0.0),
                                           "smooth_probe": report.extra.get("smooth_probe", 0.0),
                                           "mad_floor": report.extra.get("mad_floor"),
                                           "alignment": "alignment_scores" in report.extra, "seed": seed},
                               metrics={"backdoored": report.backdoored, "target_classes": report.target_classes},
                               seconds=report.seconds)
        write_json(tmp / "result.json", record)
    return payload


def defend_command(*, method: str, params: dict[str, Any], model: str, weights: str | None, head: str | None,
                   width: int | None, clean: str, clean_fraction: float | None, clean_indices: str | None,
                   out: str, overwrite: bool, device: str, seed: int, command: str = "defend") -> dict[str, Any]:
    """Run any registered defense; removal defenses write the new weights, runtime ones their state."""
    from latentguard.defenses import make_defense
    from latentguard.evaluation import evaluate

    dev = resolve_device(device)
    defense = make_defense(method, **_with_head(method, params, head))
    reserve, splits = load_clean(clean, fraction=clean_fraction, seed=seed, indices=clean_indices)
    net = open_model(model, weights, splits, width=width, head=head)
    arch = _arch_of(model, weights, splits, width)
    with atomic_output_dir(out, inputs=_defender_inputs(model, weights, clean, [clean_indices]),
                           overwrite=overwrite) as tmp:
        before = evaluate(net, reserve, device=dev)
        result = defense.run(net, reserve, device=dev, seed=seed)
        after = evaluate(result.model, reserve, device=dev)
        if result.kind == "removal":
            save_defended(result.model.cpu(), tmp, arch)
        elif hasattr(result.model, "save"):
            result.model.save(tmp / "repair.pt")
        elif result.name == "fire":
            from latentguard.defenses.fire import save_repair

            save_repair(result.model, tmp / "repair.pt")
        if result.detection is not None:
            from latentguard.report import plot_detection

            det = {**result.detection.to_json(), "class_names": reserve.class_names}
            write_json(tmp / "detection.json", det)
            plot_detection(det, tmp / "detection.png", class_names=reserve.class_names)
        record = result_record(
            command, inputs={"weights": weights, "clean": _data_path(clean)},
            parameters={"method": method, "params": result.params, "model": model, "clean": clean,
                        "clean_fraction": clean_fraction, "seed": seed},
            metrics={"reserve_acc_before": before.acc, "reserve_acc_after": after.acc,
                     "reserve_class_acc_before": before.class_acc, "reserve_class_acc_after": after.class_acc,
                     "backdoored": result.detection.backdoored if result.detection else None,
                     "target_classes": result.detection.target_classes if result.detection else None},
            seconds=result.seconds, extra={"defense": _jsonable(result.to_json())},
        )
        write_json(tmp / "report.json", record)
    return record


def _with_head(method: str, params: dict[str, Any], head: str | None) -> dict[str, Any]:
    """``--head`` reaches every defense that splits the model at its head (those with a ``head`` parameter)."""
    import dataclasses

    from latentguard.defenses import DEFENSES

    if method not in DEFENSES:
        return params  # make_defense names the choices
    fields = {f.name for f in dataclasses.fields(DEFENSES[method].Params)}
    if head is None or "head" not in fields or params.get("head") is not None:
        return params
    return {**params, "head": head}


def _jsonable(obj: Any) -> Any:
    """Drop values JSON cannot hold (tensors become lists, other objects their repr)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def _arch_of(model: str, weights: str | None, splits: DataSplits, width: int | None) -> dict[str, Any] | None:
    """The architecture description to save next to defended weights."""
    import json

    p = Path(model)
    if p.is_dir():
        p = p / "model.json"
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    if ".py:" in model:
        return None  # a user's own module: only the weights are written, the code stays the user's
    return model_arch(model, splits, width)


def save_defended(model: nn.Module, out: Path, arch: dict[str, Any] | None) -> None:
    """Write defended weights: a full latentguard model bundle, or (user models) weights only."""
    from latentguard.models import save_model

    if arch is not None:
        save_model(model, out, arch)
        return
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    torch.save(state, out / "model.pt")
