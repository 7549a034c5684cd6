"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger.

A pattern generator G and a mask generator M (encoder–decoders, :class:`~latentguard.attacks.generators.
EncoderDecoder`) turn an image x into a pattern p = G(x) ∈ [0, 1] and a near-binary mask
m = ½·tanh(20·M(x) − 10) + ½; the triggered image is x' = x + m·(p − x).

Training, as in the paper:

1. **Mask pre-training** (``mask_epochs``): M alone minimises λ_norm·mean(relu(m − mask_density)) +
   λ_div·mean(‖x₁ − x₂‖ / ‖m₁ − m₂‖) over pairs of images of a batch (the diversity loss makes masks differ
   whenever images differ); M is then frozen.
2. **Joint training** (the classifier's ``train_config.epochs``): in each shuffled batch the first ρ_b·B
   images (ρ_b = the spec's ``rate``) become backdoor images x' with the attack label, the next ρ_c·B
   (``cross_ratio``) get the pattern and mask generated from *another* image of the batch and keep their true
   label (cross-trigger samples, which make a trigger useless on other inputs), the rest stay clean.
   Classifier and G are updated in the same step on cross-entropy + λ_div·diversity(G).

Defaults (paper and its official release): ρ_b = 0.1, ρ_c = 0.1, mask density 0.032, λ_div = 1,
λ_norm = 100, Adam with lr 0.01 and betas (0.5, 0.9) for G and M, 25 mask epochs and 600 joint epochs there
(BackdoorBench's ``inputaware/default.yaml``: the same learning rates, λs, density, poison ratio 0.1 and 25
mask epochs). Here M is pre-trained by the training loop's Adam (default betas) with a cosine schedule in
place of the paper's step decay; G gets the paper's Adam at a constant rate (the paper first decays it at
epoch 200 of 600; a proportionally scaled decay did not help in short runs). ``mask_epochs`` keeps the paper's 25 (the
mask network is small and trains alone); the joint phase takes the train config's epochs, a CPU-sized
fraction of the paper's 600. On the 16 px digits (1.3 k training images) with a small CNN, 60 epochs give
clean accuracy ≈ 99 % and an ASR between 79 % and 97 % depending on the seed: the cross-trigger samples teach
the classifier to check that a trigger belongs to its image, which such a small training set lets it partly
memorise (ASR on training images ≈ 95 %); with ``cross_ratio`` = 0 the ASR is 100 %. The paper's 600 joint
epochs give ACC 98.9 % and ASR 90.4 % there (seed 0, 13 min on one core, ``benchmarks/attacks_digits.md``).
Generators are sized like the paper's (first width 16 and two down-sampling steps up to 28 px, width 32 and
three steps above); ``generator_width`` overrides the width.

After each generator is trained its BatchNorm running statistics are recomputed exactly over the
(un-augmented) training images: during training they lag behind weights that move quickly and come from
small augmented sub-batches, which cost ~10 points of ASR on test images in short schedules.

Both all-to-one (target label) and all-to-all (y + 1 mod C) are supported, as in the paper.

Poisoned indices: the backdoor and cross images are re-drawn in every batch of every epoch, and the training
loop does not expose which dataset indices a batch holds, so there is no fixed poisoned subset;
:meth:`InputAware.train_model` returns an empty index array. After training, :meth:`get_poisoned_dataset`
still produces a static poisoned set (``rate`` × N images triggered with the learned generators) for
defenses that need one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.attacks.base import Attack, AttackContext, check_range, register_attack
from latentguard.attacks.generators import (
    EncoderDecoder,
    default_steps,
    default_width,
    flatten_state,
    load_flat_state,
)
from latentguard.errors import SpecError
from latentguard.train import TrainHistory, fit

_EPS = 1e-7


def _check_int(name: str, value, low: int, *, attack: str = "inputaware") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{attack}: parameter {name} must be an integer >= {low}, got {value!r}")


@dataclass
class InputAwareParams:
    cross_ratio: float = 0.1  # ρ_c: fraction of each batch given another image's trigger (true label kept)
    mask_density: float = 0.032  # target mask density of the norm penalty
    lambda_div: float = 1.0  # weight of the diversity loss (mask pre-training and G)
    lambda_norm: float = 100.0  # weight of the mask-density penalty
    mask_epochs: int = 25  # mask-generator pre-training epochs (paper: 25)
    generator_lr: float = 0.01  # Adam learning rate of the pattern generator G
    mask_lr: float = 0.01  # Adam learning rate of the mask generator M
    generator_width: int | None = None  # first-stage channels of G and M (None: 16 up to 28 px, else 32)

    def __post_init__(self) -> None:
        check_range("cross_ratio", self.cross_ratio, 0.0, 0.9, attack="inputaware")
        check_range("mask_density", self.mask_density, 0.0, 1.0, attack="inputaware")
        check_range("lambda_div", self.lambda_div, 0.0, 1e6, attack="inputaware")
        check_range("lambda_norm", self.lambda_norm, 0.0, 1e6, attack="inputaware")
        _check_int("mask_epochs", self.mask_epochs, 0)
        check_range("generator_lr", self.generator_lr, 1e-8, 10.0, attack="inputaware")
        check_range("mask_lr", self.mask_lr, 1e-8, 10.0, attack="inputaware")
        if self.generator_width is not None:
            _check_int("generator_width", self.generator_width, 1)


def _pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (a tiny floor keeps the gradient finite for identical inputs)."""
    return ((a - b).pow(2).flatten(1).mean(1) + 1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss: mean over pairs of ‖x₁ − x₂‖ / ‖g(x₁) − g(x₂)‖ (RMS distances)."""
    if x1.shape[0] == 0:
        return x1.new_zeros(())
    return (_pair_distance(x1, x2) / (_pair_distance(out1, out2) + _EPS)).mean()


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, images, device: torch.device, *, batch_size: int = 128) -> None:
    """Replace ``net``'s BatchNorm running statistics by their exact average over ``images`` (un-augmented).

    During training the generator normalises with statistics of small, augmented sub-batches while its
    weights move, so the exponential running averages lag behind; at test time it sees whole, un-augmented
    images. One pass with cumulative averaging makes test-time triggers match the final generator."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.to(device).train()
    try:
        x_all = torch.from_numpy(images.x).permute(0, 3, 1, 2)
        for s in range(0, x_all.shape[0], batch_size):
            net(x_all[s : s + batch_size].to(device).float().div_(255))
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        net.eval()


@register_attack
class InputAware(Attack):
    name = "inputaware"
    Params = InputAwareParams

    def __init__(self, spec) -> None:
        super().__init__(spec)
        p = self.params
        if spec.rate + p.cross_ratio >= 1.0:
            raise SpecError(
                f"inputaware: rate {spec.rate} + cross_ratio {p.cross_ratio} must stay below 1 (clean images are needed)"
            )
        c, h, w = self.image_shape
        size = max(h, w)
        width = p.generator_width or default_width(size)
        steps = default_steps(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.pattern_net = EncoderDecoder(c, c, width=width, steps=steps)
            self.mask_net = EncoderDecoder(c, 1, width=width, steps=steps)
        self.pattern_net.eval()
        self.mask_net.eval()
        self._ready = False
        self.phase_histories: dict[str, TrainHistory] = {}

    # ----------------------------------------------------------------- generators
    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger patterns G(x) in [0, 1] (same shape as x); differentiable, in the networks' current mode."""
        return torch.tanh(self.pattern_net(x)) / (2 + _EPS) + 0.5

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """Near-binary masks m(x) in [0, 1], shape N×1×H×W; differentiable, in the networks' current mode."""
        return torch.tanh(self.mask_net(x) * 20 - 10) / (2 + _EPS) + 0.5

    @staticmethod
    def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + mask * (pattern - x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise SpecError("inputaware: the generators are not trained: train the attack or load its tensors first")
        self.pattern_net.to(x.device).eval()
        self.mask_net.to(x.device).eval()
        with torch.no_grad():
            xf = x.float()
            out = self.blend(xf, self.patterns(xf), self.masks(xf))
        return out.clamp(0, 1).to(x.dtype)

    # ----------------------------------------------------------------- learned state
    def tensors(self) -> dict[str, torch.Tensor]:
        if not self._ready:
            return {}
        return {**flatten_state("pattern", self.pattern_net), **flatten_state("mask", self.mask_net)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = sorted(k for k in tensors if not k.startswith(("pattern.", "mask.")))
        if unknown:
            raise SpecError(f"inputaware: unexpected saved tensor(s) {', '.join(unknown[:3])}: regenerate the attack")
        load_flat_state("pattern", self.pattern_net, tensors, attack=self.name)
        load_flat_state("mask", self.mask_net, tensors, attack=self.name)
        self.pattern_net.eval()
        self.mask_net.eval()
        self._ready = True

    @property
    def is_ready(self) -> bool:
        return self._ready

    # ----------------------------------------------------------------- training
    def split_sizes(self, batch_size: int) -> tuple[int, int]:
        """Numbers of backdoor and cross images in a batch of ``batch_size`` (the first and next ones)."""
        return int(self.spec.rate * batch_size), int(self.params.cross_ratio * batch_size)

    def mixed_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training batch of the joint phase: (images, labels, diversity loss of G).

        Images ``[:n_bd]`` are triggered with their own pattern and mask and relabelled with the attack label;
        images ``[n_bd:n_bd + n_cross]`` get the pattern and mask of the image ``n_cross`` positions further on
        (wrapping around) and keep their label; the rest are unchanged. Gradients flow into G (and into M
        unless it is frozen).
        """
        bs = x.shape[0]
        n_bd, n_cross = self.split_sizes(bs)
        x_bd_src = x[:n_bd]
        x_cross = x[n_bd : n_bd + n_cross]
        other = torch.roll(x, shifts=-n_cross, dims=0)[n_bd : n_bd + n_cross]  # image i + n_cross for cross i
        # one generator pass over both sources, so BatchNorm sees one batch of their statistics
        src = torch.cat([x_bd_src, other])
        if src.shape[0] == 0:
            return x, y, x.new_zeros(())
        pats, msks = self.patterns(src), self.masks(src)
        p_bd, p_other = pats[:n_bd], pats[n_bd:]
        parts_x = [self.blend(x_bd_src, p_bd, msks[:n_bd]), self.blend(x_cross, p_other, msks[n_bd:])]
        parts_y = [torch.as_tensor(self.attack_labels(y[:n_bd])).to(y.dtype), y[n_bd : n_bd + n_cross]]
        k = min(n_bd, n_cross)
        div = diversity_loss(x_bd_src[:k], other[:k], p_bd[:k], p_other[:k])
        parts_x.append(x[n_bd + n_cross :])
        parts_y.append(y[n_bd + n_cross :])
        return torch.cat(parts_x), torch.cat(parts_y), div * self.params.lambda_div

    def mask_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mask pre-training objective on a batch: density penalty + diversity over (x_i, x_{i+1}) pairs."""
        p = self.params
        other = torch.roll(x, shifts=-1, dims=0)
        m1 = self.masks(x)
        m2 = torch.roll(m1, shifts=-1, dims=0)  # the masks of ``other``: one pass serves both
        norm = F.relu(m1 - p.mask_density).mean()
        return p.lambda_norm * norm + p.lambda_div * diversity_loss(x, other, m1, m2)

    def train_model(self, model: nn.Module, context: AttackContext, *, eval_data=None) -> tuple[TrainHistory, np.ndarray]:
        """Pre-train M, then train ``model`` and G jointly; returns the joint phase's history (its ``seconds``
        cover both phases; each phase's history is kept in :attr:`phase_histories`) and an empty index array
        (no fixed poisoned subset exists, see the module docstring)."""
        self._check_images(context.train)
        p = self.params
        cfg = context.train_config
        dev = context.device
        t0 = time.perf_counter()
        self.mask_net.to(dev)
        self.mask_net.requires_grad_(True)
        self.mask_net.train()
        mask_hist = TrainHistory()
        if p.mask_epochs > 0:
            mask_cfg = dataclasses.replace(cfg, epochs=p.mask_epochs, optimizer="adam", lr=p.mask_lr,
                                           weight_decay=0.0, schedule="cosine", freeze_bn=False, progress=False)
            mask_hist = fit(self.mask_net, context.train, mask_cfg, device=dev,
                            loss_fn=lambda net, xb, yb: self.mask_loss(xb))
            recalibrate_batchnorm(self.mask_net, context.train, dev, batch_size=cfg.batch_size)
        self.mask_net.eval()
        self.mask_net.requires_grad_(False)

        self.pattern_net.to(dev)
        self.pattern_net.requires_grad_(True)
        self.pattern_net.train()
        opt_g = torch.optim.Adam(self.pattern_net.parameters(), lr=p.generator_lr, betas=(0.5, 0.9))
        pending: dict[str, torch.Tensor] = {}

        def batch_hook(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
            xm, ym, div = self.mixed_batch(xb, yb)
            pending["div"] = div
            return xm, ym

        def loss_fn(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing) + pending.pop("div")
            return loss, logits

        try:
            joint_hist = fit(model, context.train, cfg, device=dev, batch_hook=batch_hook, loss_fn=loss_fn,
                             extra_optimizers=[opt_g], eval_data=eval_data)
        finally:
            self.pattern_net.eval()
            self.pattern_net.requires_grad_(False)
        recalibrate_batchnorm(self.pattern_net, context.train, dev, batch_size=cfg.batch_size)
        self._ready = True
        self.phase_histories = {"mask": mask_hist, "joint": joint_hist}
        joint_hist.seconds = time.perf_counter() - t0
        return joint_hist, np.zeros(0, dtype=np.int64)
