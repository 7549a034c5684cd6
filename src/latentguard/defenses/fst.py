"""FST (Min et al., NeurIPS 2023): Feature Shift Tuning.

With few poisoned samples the backdoor and clean features are entangled, so vanilla fine-tuning leaves the
backdoor in place. FST re-initialises the head (the output ``nn.Linear``, found by the latent adapter or named
by ``head``) and fine-tunes the whole network on the clean reserve with a penalty that pushes the new head's
weights away from the original (compromised) ones,

    L = CE(f(x), y) + α · ⟨W, W_ori⟩,

while keeping the head's norm fixed: after every optimiser step W is rescaled to ‖W‖_F = ‖W_ori‖_F (run as an
extra "optimiser" of :func:`latentguard.train.fit`, which steps right after the main one). The bias is
re-initialised too but neither penalised nor rescaled.

Defaults and sources (paper §5 and the authors' implementation, AISafety-HKUST/stable_backdoor_purification
``fine_tune/fst.py``): SGD lr 0.01, momentum 0.9, no weight decay, cosine schedule, batch 128, standard
augmentation (random crop with padding = image size / 8, flips where the data allows them), 10 epochs, α = 0.2 (CIFAR-10; the paper uses 0.1 for GTSRB and lr 0.001 / α = 0.001 for
CIFAR-100 and Tiny-ImageNet), head re-initialised U(−1/√d, 1/√d), 2 % of the training data as reserve. No CPU
reduction needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import Defense, DefenseResult, register_defense
from latentguard.defenses.params import check, check_finetune_params, crop_padding, is_real
from latentguard.models import split_model
from latentguard.train import TrainConfig, fit


@dataclass
class FSTParams:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha: float = 0.2  # weight of the ⟨W, W_ori⟩ feature-shift penalty
    head: str | None = None  # name of the output nn.Linear (None: found automatically)
    schedule: str = "cosine"
    augment: bool = True

    def __post_init__(self) -> None:
        check(is_real(self.alpha) and self.alpha >= 0, "fst", "alpha", "a number >= 0", self.alpha)
        check(self.head is None or (isinstance(self.head, str) and bool(self.head)), "fst", "head",
              "the name of the output nn.Linear", self.head)
        check_finetune_params(self, "fst", allow_zero_epochs=False)


class NormProjection(torch.optim.Optimizer):
    """Not an optimiser: its ``step`` rescales ``weight`` to Frobenius norm ``radius`` (run after each step);
    with ``rows``, each listed row of ``weight`` to its own norm ``radius[i]`` instead, the other rows untouched."""

    def __init__(self, weight: nn.Parameter, radius: float | list[float], rows: list[int] | None = None) -> None:
        radii = [float(r) for r in radius] if rows is not None else float(radius)
        if rows is not None and len(rows) != len(radii):
            raise ValueError(f"NormProjection: {len(rows)} rows but {len(radii)} radii")
        super().__init__([weight], {"radius": radii, "rows": rows})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group["params"]:
                if group["rows"] is None:
                    _rescale(w, group["radius"])
                    continue
                for row, radius in zip(group["rows"], group["radius"], strict=True):
                    _rescale(w[row], radius)
        return None


def _rescale(w: torch.Tensor, radius: float) -> None:
    norm = w.norm()
    if norm > 0:
        w.mul_(radius / norm)


def reinitialise_head(head: nn.Linear, generator: torch.Generator, rows: list[int] | None = None) -> None:
    """U(−1/√d, 1/√d) for the weight and bias of ``head`` (d = its input dimension); with ``rows``, only those
    output rows (and their bias entries) are drawn again."""
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        w = (torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound
        b = (torch.rand(head.out_features, generator=generator) * 2 - 1) * bound
        keep = slice(None) if rows is None else rows
        head.weight[keep] = w[keep].to(head.weight.device)
        if head.bias is not None:
            head.bias[keep] = b[keep].to(head.bias.device)


@register_defense
class FST(Defense):
    """Re-initialise the head and fine-tune with a penalty shifting it away from the compromised weights."""

    name = "fst"
    kind = "removal"
    Params = FSTParams

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        probe, _ = clean.subset(np.arange(min(2, len(clean)))).tensors(device)
        fm = split_model(model, head=p.head, example_input=probe)
        head = fm.head
        w_ori = head.weight.detach().clone()
        radius = float(w_ori.norm())
        reinitialise_head(head, torch.Generator().manual_seed(seed))
        projection = NormProjection(head.weight, radius)

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
            logits = m(x)
            return F.cross_entropy(logits, y) + p.alpha * (head.weight * w_ori).sum(), logits

        cfg = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, optimizer="sgd", momentum=p.momentum,
                          weight_decay=p.weight_decay, schedule=p.schedule, augment=p.augment,
                          crop_padding=crop_padding(clean), seed=seed)
        history = fit(model, clean, cfg, device=device, loss_fn=loss_fn, extra_optimizers=[projection])
        with torch.no_grad():
            cosine = float(F.cosine_similarity(head.weight.flatten(), w_ori.flatten(), dim=0))
        return self._result(model, extra={"head": fm.head_name, "head_norm": radius,
                                          "head_cosine_to_original": cosine, "history": history.to_dict()})
