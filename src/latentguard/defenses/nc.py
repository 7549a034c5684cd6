"""Neural Cleanse (Wang et al., IEEE S&P 2019): trigger reverse-engineering, MAD detection and unlearning.

For every class k a mask m (H×W, shared by the channels) and a pattern p (C×H×W), both in [0, 1] through the
tanh parameterisation ``m = tanh(m')/(2−ε) + ½``, are optimised on the clean reserve so that the stamped
image ``(1−m)·x + m·p`` is classified as k with the smallest mask:

    min_{m', p'}  CE(f((1−m)·x + m·p), k) + λ·‖m‖₁

λ follows the paper's schedule: it starts at 0, is set to ``init_cost`` once the reversed trigger reaches the
attack-success threshold for ``patience`` consecutive epochs, then is multiplied by ``cost_multiplier`` after
``patience`` epochs above the threshold and divided by ``cost_multiplier ** 1.5`` after ``patience`` epochs
below it. The trigger kept is the one with the smallest ‖m‖₁ among epochs above the threshold; the search
stops early once λ has moved both ways and ‖m‖₁ stopped improving (by ``early_stop_threshold``) for
``early_stop_patience`` epochs. A target class needs an abnormally *small* trigger: the MAD anomaly index of
the per-class ‖m‖₁ (positive below the median) flags every class above ``anomaly_threshold``. Mitigation
fine-tunes on the clean reserve where a fraction of every batch carries the reversed trigger of a flagged
class with its TRUE label (unlearning).

Defaults and sources (paper §IV–VI and the authors' reference implementation, bolunwang/backdoor):
Adam lr 0.1 with betas (0.5, 0.9), batch 32, ``init_cost`` 1e-3, attack-success threshold 0.99, patience 5,
cost multiplier 1.5 (up ×1.5, down ÷1.5^1.5; the authors' GTSRB script uses 2), early stop at 0.99 after
2·patience epochs, anomaly threshold 2, unlearning on the clean reserve with 20 % of the images stamped for
one epoch (the paper fine-tunes 1 epoch on 10 % of the training data, lr 0.01 here).

CPU reduction: the reference optimises each class for up to 1,000 epochs of 1,000 samples (≈ 31 mini-batches)
with early stopping; here ``epochs`` (default 30) and ``samples_per_epoch`` (default 1,000, capped by the
reserve) bound the search per class and are recorded in the result's params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import Defense, DefenseResult, low_outlier_report, register_defense
from latentguard.defenses.params import check, is_int, is_real
from latentguard.errors import SpecError
from latentguard.inference import eval_mode
from latentguard.train import TrainConfig, fit

_TANH_EPS = 1e-7


@dataclass
class NCParams:
    # reverse engineering (per class)
    epochs: int = 30  # CPU reduction of the reference's 1,000 (with early stopping)
    samples_per_epoch: int = 1000  # images drawn per epoch (the reference's NB_SAMPLE), capped by the reserve
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3  # λ once the trigger first succeeds
    cost_multiplier: float = 1.5  # λ ×1.5 up, ÷1.5^1.5 down
    patience: int = 5  # epochs before λ is adjusted
    attack_success_threshold: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 10  # 2 × patience, as in the reference
    classes: list[int] | None = None  # classes to scan (None: all); unscanned classes take no part in the MAD
    # detection
    anomaly_threshold: float = 2.0
    # unlearning
    unlearn: bool = True  # False: detection only, the model is returned unchanged
    unlearn_fraction: float = 0.2  # share of each batch stamped with a reversed trigger (true label kept)
    unlearn_epochs: int = 1
    unlearn_lr: float = 0.01
    unlearn_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("epochs", "samples_per_epoch", "batch_size", "patience", "early_stop_patience",
                     "unlearn_batch_size"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, "nc", name, "an integer >= 1", v)
        check(is_int(self.unlearn_epochs) and self.unlearn_epochs >= 0, "nc", "unlearn_epochs", "an integer >= 0",
              self.unlearn_epochs)
        for name in ("lr", "init_cost", "unlearn_lr", "anomaly_threshold"):
            v = getattr(self, name)
            check(is_real(v) and v > 0, "nc", name, "a positive number", v)
        check(is_real(self.cost_multiplier) and self.cost_multiplier > 1, "nc", "cost_multiplier", "a number > 1",
              self.cost_multiplier)
        for name in ("attack_success_threshold", "early_stop_threshold", "unlearn_fraction"):
            v = getattr(self, name)
            check(is_real(v) and 0 < v <= 1, "nc", name, "in (0, 1]", v)
        for name in ("early_stop", "unlearn"):
            check(isinstance(getattr(self, name), bool), "nc", name, "true or false", getattr(self, name))
        if self.classes is not None:
            if is_int(self.classes):
                self.classes = [self.classes]
            ok = (isinstance(self.classes, (list, tuple)) and len(self.classes) >= 3
                  and all(is_int(c) and c >= 0 for c in self.classes) and len(set(self.classes)) == len(self.classes))
            check(ok, "nc", "classes", "a list of at least 3 distinct class indices", self.classes)
            self.classes = [int(c) for c in self.classes]


def _to_unit(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t) / (2 - _TANH_EPS) + 0.5


def _from_unit(u: torch.Tensor) -> torch.Tensor:
    return torch.atanh((u - 0.5) * (2 - _TANH_EPS))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 − m)·x + m·p`` for images N×C×H×W, a mask H×W (or N×1×H×W) and a pattern C×H×W (or N×C×H×W)."""
    if mask.dim() == 2:
        mask = mask[None, None]
    return (1 - mask) * x + mask * pattern


@torch.no_grad()
def trigger_success(model: nn.Module, clean_x: torch.Tensor, target: int, mask: torch.Tensor,
                    pattern: torch.Tensor, device: torch.device, batch_size: int = 256) -> float:
    """Fraction of ``clean_x`` classified as ``target`` once stamped with (mask, pattern)."""
    hits = 0
    m, p = mask.to(device), pattern.to(device)
    for s in range(0, clean_x.shape[0], batch_size):
        xb = clean_x[s:s + batch_size].to(device)
        hits += int((model(stamp(xb, m, p)).argmax(1) == target).sum())
    return hits / max(1, clean_x.shape[0])


def reverse_engineer_trigger(model: nn.Module, clean_x: torch.Tensor, target: int, params: NCParams,
                             device: torch.device, generator: torch.Generator
                             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Neural Cleanse's per-class search: the smallest (mask, pattern) that sends ``clean_x`` to ``target``.

    ``clean_x`` is float N×C×H×W in [0, 1] (CPU or ``device``); the model is used in eval mode and left
    untouched (no gradient reaches its parameters). Returns the mask (H×W), the pattern (C×H×W), both on the
    CPU, and the fraction of ``clean_x`` the returned trigger sends to ``target``.
    """
    p = params
    n, c, h, w = clean_x.shape
    mask_t = _from_unit(torch.rand(h, w, generator=generator)).to(device).requires_grad_(True)
    pattern_t = _from_unit(torch.rand(c, h, w, generator=generator)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_t, pattern_t], lr=p.lr, betas=(0.5, 0.9))
    steps = max(1, math.ceil(min(n, p.samples_per_epoch) / p.batch_size))
    labels = torch.full((p.batch_size,), int(target), dtype=torch.long, device=device)

    cost = 0.0
    best_reg, best = math.inf, None
    set_counter = up_counter = down_counter = 0
    up_flag = down_flag = False
    stop_counter, stop_best = 0, math.inf
    order, cursor = torch.randperm(n, generator=generator), 0
    with eval_mode(model):
        for _epoch in range(p.epochs):
            hits, reg_sum, seen = 0, 0.0, 0
            for _ in range(steps):
                if cursor + p.batch_size > n:
                    order, cursor = torch.randperm(n, generator=generator), 0
                idx = order[cursor:cursor + p.batch_size]
                cursor += p.batch_size
                xb = clean_x[idx].to(device)
                mask, pattern = _to_unit(mask_t), _to_unit(pattern_t)
                logits = model(stamp(xb, mask, pattern))
                reg = mask.abs().sum()
                loss = F.cross_entropy(logits, labels[: xb.shape[0]]) + cost * reg
                grads = torch.autograd.grad(loss, [mask_t, pattern_t])
                mask_t.grad, pattern_t.grad = grads
                opt.step()
                hits += int((logits.argmax(1) == target).sum())
                reg_sum += float(reg.detach()) * xb.shape[0]
                seen += xb.shape[0]
            acc, avg_reg = hits / seen, reg_sum / seen
            if acc >= p.attack_success_threshold and avg_reg < best_reg:
                best_reg = avg_reg
                best = (_to_unit(mask_t).detach().cpu(), _to_unit(pattern_t).detach().cpu())
            if p.early_stop:  # stop once λ moved both ways and the best norm stalls
                if best_reg < math.inf:
                    stop_counter = stop_counter + 1 if best_reg >= p.early_stop_threshold * stop_best else 0
                stop_best = min(stop_best, best_reg)
                if up_flag and down_flag and stop_counter >= p.early_stop_patience:
                    break
            if cost == 0 and acc >= p.attack_success_threshold:
                set_counter += 1
                if set_counter >= p.patience:
                    cost = p.init_cost
                    up_counter = down_counter = 0
                    up_flag = down_flag = False
            else:
                set_counter = 0
            if acc >= p.attack_success_threshold:
                up_counter, down_counter = up_counter + 1, 0
            else:
                up_counter, down_counter = 0, down_counter + 1
            if up_counter >= p.patience:
                up_counter, up_flag = 0, True
                cost *= p.cost_multiplier
            elif down_counter >= p.patience:
                down_counter, down_flag = 0, True
                cost /= p.cost_multiplier ** 1.5
    if best is None:  # never reached the threshold: keep the last trigger
        best = (_to_unit(mask_t).detach().cpu(), _to_unit(pattern_t).detach().cpu())
    mask, pattern = best
    with eval_mode(model):
        asr = trigger_success(model, clean_x, target, mask, pattern, device)
    return mask, pattern, asr


def unlearning_hook(triggers: list[tuple[torch.Tensor, torch.Tensor]], fraction: float):
    """A ``fit`` batch hook stamping ``fraction`` of every batch with one of ``triggers``, labels unchanged."""
    masks = torch.stack([m for m, _ in triggers])[:, None]  # T×1×H×W
    patterns = torch.stack([p for _, p in triggers])  # T×C×H×W

    def hook(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(round(fraction * x.shape[0]))
        if k == 0:
            return x, y
        idx = torch.randperm(x.shape[0], generator=gen)[:k]
        which = torch.randint(len(triggers), (k,), generator=gen)
        x = x.clone()
        dev_idx = idx.to(x.device)
        x[dev_idx] = stamp(x[dev_idx], masks[which].to(x.device), patterns[which].to(x.device))
        return x, y

    return hook


@register_defense
class NeuralCleanse(Defense):
    """Reverse-engineer a minimal trigger per class, flag abnormally small ones, unlearn them."""

    name = "nc"
    kind = "removal"
    Params = NCParams

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        classes = list(range(clean.num_classes)) if p.classes is None else p.classes
        if any(k >= clean.num_classes for k in classes):
            raise SpecError(f"nc: classes {classes} are not all classes of a {clean.num_classes}-class model")
        x, _ = clean.tensors()
        gen = torch.Generator().manual_seed(seed)
        triggers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        norms, asrs = [], []
        for k in classes:
            mask, pattern, asr = reverse_engineer_trigger(model, x, k, p, device, gen)
            triggers[k] = (mask, pattern)
            norms.append(float(mask.abs().sum()))
            asrs.append(asr)
        report = low_outlier_report("nc", np.array(norms), p.anomaly_threshold, log=False,
                                    extra={"classes": classes, "trigger_asr": asrs})
        # the report indexes the scanned classes; map its verdict back to class indices
        report.target_classes = [classes[i] for i in report.target_classes]
        flagged = report.target_classes
        extra: dict = {"flagged": flagged,
                       "triggers": {int(k): {"mask_l1": norms[i], "asr": asrs[i]} for i, k in enumerate(classes)}}
        if not flagged or not p.unlearn or p.unlearn_epochs == 0:
            extra["removal"] = ("no class flagged: model returned unchanged" if not flagged
                                else "unlearning disabled: model returned unchanged")
            return self._result(model, detection=report, extra=extra)
        cfg = TrainConfig(epochs=p.unlearn_epochs, batch_size=p.unlearn_batch_size, lr=p.unlearn_lr,
                          optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="constant",
                          augment=False, seed=seed)
        hook = unlearning_hook([triggers[k] for k in flagged], p.unlearn_fraction)
        history = fit(model, clean, cfg, device=device, batch_hook=hook)
        extra["history"] = history.to_dict()
        extra["unlearned_trigger_asr"] = {
            int(k): trigger_success(model, x, k, *triggers[k], device) for k in flagged
        }
        return self._result(model, detection=report, extra=extra)
