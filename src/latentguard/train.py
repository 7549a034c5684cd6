"""The one training loop of latentguard.

Attacks (poisoned training, generator training), defenses (fine-tuning, unlearning, TAC-guided removal) and the
CLI all call :func:`fit`. What differs between them enters through three hooks instead of copies of the loop:

- ``batch_hook(x, y, generator) -> (x, y)``: transforms each augmented batch (e.g. on-the-fly poisoning);
- ``loss_fn(model, x, y) -> loss`` or ``(loss, logits)``: the objective (default cross-entropy);
- ``epoch_hook(epoch, model)``: work between epochs (e.g. recomputing a latent perturbation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.device import resolve_device
from latentguard.errors import LatentGuardError
from latentguard.inference import predict, to_float_images

BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
EpochHook = Callable[[int, nn.Module], None]

SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit` (validated on construction)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    augment: bool = True
    crop_padding: int = 4
    hflip: bool | None = None  # None: take it from the data (Images.hflip), else False
    seed: int = 0
    progress: bool = False
    label_smoothing: float = 0.0
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (useful when fine-tuning on little data)
    max_steps_per_epoch: int | None = None
    drop_last: bool = False  # skip a ragged last batch (a 2-image batch upsets BatchNorm) when N > batch_size

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise LatentGuardError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise LatentGuardError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LatentGuardError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise LatentGuardError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LatentGuardError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.crop_padding < 0:
            raise LatentGuardError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LatentGuardError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_acc: float
    seconds: float
    eval: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainHistory:
    epochs: list[EpochLog] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "epochs": [asdict(e) for e in self.epochs]}


def augment_batch(
    x: torch.Tensor, *, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding and optional horizontal flip, batched on x's device."""
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # N×H
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # N×W
        idx_n = torch.arange(n, device=dev)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Accept an ``Images`` container or an ``(x, y)`` pair; keep uint8 images compact until batching."""
    if hasattr(data, "x") and hasattr(data, "y") and isinstance(data.x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(data.x.transpose(0, 3, 1, 2)))
        y = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
        return x, y, bool(getattr(data, "hflip", False))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
        if x.ndim != 4:
            raise LatentGuardError(f"training images must be N×C×H×W, got shape {tuple(x.shape)}")
        if y.shape[0] != x.shape[0]:
            raise LatentGuardError(f"{x.shape[0]} images but {y.shape[0]} labels: give one label per image")
        return x, y.long(), False
    raise LatentGuardError("training data must be an Images container or an (images, labels) pair")


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    """Optimiser steps :func:`fit` takes per epoch over ``n`` images: a ragged last batch counts unless
    ``drop_last`` skips it, capped at ``max_steps_per_epoch``."""
    steps = n // cfg.batch_size if cfg.drop_last and n > cfg.batch_size else math.ceil(n / cfg.batch_size)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def fit(
    model: nn.Module,
    data,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = "auto",
    params: Iterable[nn.Parameter] | None = None,
    loss_fn: LossFn | None = None,
    batch_hook: BatchHook | None = None,
    epoch_hook: EpochHook | None = None,
    extra_optimizers: Iterable[torch.optim.Optimizer] = (),
    eval_data: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` and return the per-epoch history.

    ``eval_data`` maps a name (e.g. "acc", "asr") to (images, labels) evaluated as accuracy after each epoch;
    it is for monitoring only and never influences training.
    """
    cfg = config or TrainConfig()
    dev = resolve_device(device)
    x_all, y_all, data_hflip = _as_tensors(data)
    n = x_all.shape[0]
    if n == 0:
        raise LatentGuardError("training data is empty")
    hflip = data_hflip if cfg.hflip is None else cfg.hflip
    model.to(dev)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise LatentGuardError("nothing to train: no parameter requires a gradient")
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    else:
        opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(n, cfg)
    total = max(1, steps * cfg.epochs)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    extra = list(extra_optimizers)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = TrainHistory()
    t_start = time.perf_counter()
    progress = _Progress(cfg.progress, cfg.epochs * steps)
    try:
        for epoch in range(cfg.epochs):
            _set_train_mode(model, cfg.freeze_bn)
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for step in range(steps):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                xb = to_float_images(x_all[idx]).to(dev, non_blocking=True)
                yb = y_all[idx].to(dev, non_blocking=True)
                if cfg.augment:
                    xb = augment_batch(xb, padding=cfg.crop_padding, hflip=hflip, generator=gen)
                if batch_hook is not None:
                    xb, yb = batch_hook(xb, yb, gen)
                out = loss_fn(model, xb, yb) if loss_fn else None
                if out is None:
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
                elif isinstance(out, tuple):
                    loss, logits = out
                else:
                    loss, logits = out, None
                if not torch.isfinite(loss):
                    raise LatentGuardError(
                        f"training diverged (loss {loss.item()}) in epoch {epoch + 1}: lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                for o in extra:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for o in extra:
                    o.step()
                sched.step()
                bs = yb.shape[0]
                loss_sum += loss.item() * bs
                seen += bs
                if logits is not None:
                    correct += int((logits.argmax(1) == yb).sum())
                progress.advance(epoch, loss_sum / seen, correct / seen)
            if epoch_hook is not None:
                epoch_hook(epoch, model)
            log = EpochLog(epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1), time.perf_counter() - t0)
            if eval_data:
                for name, (ex, ey) in eval_data.items():
                    pred = predict(model, ex, device=dev)
                    log.eval[name] = float((pred == ey.cpu()).float().mean()) if len(ey) else float("nan")
            history.epochs.append(log)
            progress.epoch_done(log)
    finally:
        progress.close()
        model.eval()
    history.seconds = time.perf_counter() - t_start
    return history


class _Progress:
    """A rich progress bar with live loss/accuracy, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled and total > 0:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("train", total=total, epoch=1, loss=0.0, acc=0.0)
            self._bar.start()

    def advance(self, epoch: int, loss: float, acc: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, epoch=epoch + 1, loss=loss, acc=acc)

    def epoch_done(self, log: EpochLog) -> None:
        if self._bar is not None:
            extra = " ".join(f"{k} {v:.3f}" for k, v in log.eval.items())
            self._bar.console.print(
                f"epoch {log.epoch}: loss {log.loss:.3f} train-acc {log.train_acc:.3f} {extra} ({log.seconds:.1f}s)"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
