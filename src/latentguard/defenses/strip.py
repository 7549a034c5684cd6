"""STRIP, STRong Intentional Perturbation (Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against
Trojan Attacks on Deep Neural Networks", ACSAC 2019). A run-time input detector; the model is not changed.

An input x is superimposed with N clean images x_j drawn from the defender's reserve and the model classifies
each blend. A trigger dominates the prediction whatever it is blended with, so a triggered input yields
confident, consistent predictions: low entropy. The score of x is the normalised entropy

    H(x) = (1/N) Σ_j  −Σ_c p_c(blend(x, x_j)) · log2 p_c(blend(x, x_j)),

and x is flagged when H(x) falls below a threshold. As in the paper, the threshold comes from the entropy
distribution of clean inputs only: a normal distribution is fitted to the reserve's entropies (each reserve
image blended with N *other* reserve images) and the threshold is its ``frr`` quantile, so about ``frr`` of
clean inputs are falsely rejected. ``threshold_rule: quantile`` takes the empirical quantile instead.

Blending as in the paper's code: ``add`` superimposes the two images (pixel sum, saturated at 1, i.e.
OpenCV's addWeighted with weights 1 and 1); ``average`` takes their mean (a common variant).

The result's ``model`` is the unchanged model; ``input_score(x)`` returns −H(x) (higher = more suspicious)
and ``extra`` holds the entropy threshold (``entropy_threshold``; flag when H < it) and the matching score
threshold (``score_threshold``; flag when score > it). ``input_score`` is the bound ``score`` method of a
:class:`StripDetector`, an ``nn.Module`` whose ``forward`` returns the model's logits and whose
``flag(x)`` returns the boolean verdicts; get it with :func:`strip_detector`.

================= ============ ==========================================================================
parameter         default      source
================= ============ ==========================================================================
n_superimpose     100          paper (N = 100 perturbed copies per input)
frr               0.01         paper (threshold at a 1 % false rejection rate)
blend             "add"        paper's code (superimposition by pixel sum)
threshold_rule    "normal"     paper (normal distribution fitted to clean entropies)
batch_size        1024         blended images per forward pass (speed only)
================= ============ ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import Defense, DefenseResult, register_defense
from latentguard.defenses.params import check, is_int, is_real
from latentguard.device import module_device
from latentguard.errors import SpecError
from latentguard.inference import eval_mode, to_float_images

BLENDS = ("add", "average")
THRESHOLD_RULES = ("normal", "quantile")


class StripDetector(nn.Module):
    """A model plus STRIP's input check: ``forward`` = the model's logits, ``flag``/``score``/``entropy`` per input.

    ``overlays`` are the clean images (float N×C×H×W in [0, 1]) superimposed on every input; draws come from
    an internal generator seeded with ``seed``, so a fresh detector gives reproducible scores.
    """

    def __init__(self, model: nn.Module, overlays: torch.Tensor, *, n_superimpose: int = 100, blend: str = "add",
                 threshold: float = float("nan"), batch_size: int = 1024, seed: int = 0) -> None:
        super().__init__()
        if blend not in BLENDS:
            raise SpecError(f"strip: blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        if overlays.dim() != 4 or overlays.shape[0] < 1:
            raise SpecError("strip: overlays must be a non-empty N×C×H×W batch of clean images")
        self.model = model
        self.register_buffer("overlays", to_float_images(overlays).clone(), persistent=False)
        self.n_superimpose = int(n_superimpose)
        self.blend = blend
        self.threshold = float(threshold)  # on the entropy: flag when entropy < threshold
        self.batch_size = int(batch_size)
        self._gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _draw(self, n_inputs: int, exclude: torch.Tensor | None) -> torch.Tensor:
        """Overlay indices, n_inputs × N; without replacement when the pool allows, never the excluded index."""
        pool = self.overlays.shape[0]
        n = self.n_superimpose
        available = pool - (1 if exclude is not None else 0)
        if available < 1:
            raise SpecError("strip needs at least two clean images to superimpose")
        if n <= available:
            keys = torch.rand(n_inputs, pool, generator=self._gen)
            if exclude is not None:
                keys[torch.arange(n_inputs), exclude] = -1.0
            return keys.topk(n, dim=1).indices
        idx = torch.randint(0, available, (n_inputs, n), generator=self._gen)
        if exclude is not None:
            idx = idx + (idx >= exclude[:, None]).long()
        return idx

    @torch.no_grad()
    def entropy(self, x: torch.Tensor, *, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Mean prediction entropy (bits) of each input over its N superimposed copies, as a CPU tensor."""
        x = to_float_images(x)
        dev = module_device(self.model)
        n = self.n_superimpose
        per_chunk = max(1, self.batch_size // n)
        out = []
        with eval_mode(self.model):
            for s in range(0, x.shape[0], per_chunk):
                xb = x[s:s + per_chunk].to(dev)
                ex = exclude[s:s + per_chunk] if exclude is not None else None
                idx = self._draw(xb.shape[0], ex).to(self.overlays.device)
                over = self.overlays[idx].to(dev)  # b × N × C × H × W
                base = xb[:, None]
                blended = (base + over).clamp_(0.0, 1.0) if self.blend == "add" else (base + over) * 0.5
                logits = self.model(blended.flatten(0, 1)).float()
                logp = torch.log_softmax(logits, dim=1)
                h = -(logp.exp() * logp).sum(dim=1) / np.log(2.0)
                out.append(h.view(xb.shape[0], n).mean(dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Suspicion score −H(x): higher = more likely triggered."""
        return -self.entropy(x)

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        """True for inputs STRIP rejects as triggered (entropy below the threshold)."""
        return self.entropy(x) < self.threshold


def strip_detector(result: DefenseResult) -> StripDetector:
    """The :class:`StripDetector` behind a STRIP result's ``input_score``."""
    owner = getattr(result.input_score, "__self__", None)
    if not isinstance(owner, StripDetector):
        raise SpecError("this result does not come from the strip defense")
    return owner


@register_defense
class Strip(Defense):
    """Flag inputs whose predictions stay confident under superimposition with clean images."""

    name = "strip"
    kind = "runtime"

    @dataclass
    class Params:
        n_superimpose: int = 100
        frr: float = 0.01
        blend: str = "add"
        threshold_rule: str = "normal"
        batch_size: int = 1024

        def __post_init__(self) -> None:
            d = "strip"
            check(is_int(self.n_superimpose) and self.n_superimpose >= 1, d, "n_superimpose", "an integer >= 1",
                  self.n_superimpose)
            check(is_real(self.frr) and 0 < self.frr < 1, d, "frr", "in (0, 1)", self.frr)
            check(self.blend in BLENDS, d, "blend", f"one of {', '.join(BLENDS)}", self.blend)
            check(self.threshold_rule in THRESHOLD_RULES, d, "threshold_rule", f"one of {', '.join(THRESHOLD_RULES)}",
                  self.threshold_rule)
            check(is_int(self.batch_size) and self.batch_size >= 1, d, "batch_size", "an integer >= 1", self.batch_size)

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        if len(clean) < 2:
            raise SpecError("strip needs at least two clean images to superimpose")
        x, _ = clean.tensors()
        detector = StripDetector(model, x, n_superimpose=p.n_superimpose, blend=p.blend,
                                 batch_size=p.batch_size, seed=seed).to(device)
        clean_entropy = detector.entropy(x, exclude=torch.arange(len(clean)))
        mean, std = float(clean_entropy.mean()), float(clean_entropy.std()) if len(clean) > 1 else 0.0
        if p.threshold_rule == "normal":
            threshold = float(norm.ppf(p.frr, loc=mean, scale=max(std, 1e-12)))
        else:
            threshold = float(torch.quantile(clean_entropy.double(), p.frr))
        detector.threshold = threshold
        score: Callable[[torch.Tensor], torch.Tensor] = detector.score
        extra = {
            "entropy_threshold": threshold,
            "score_threshold": -threshold,
            "clean_entropy_mean": mean,
            "clean_entropy_std": std,
            "clean_frr": float((clean_entropy < threshold).float().mean()),
            "n_overlays": len(clean),
        }
        return self._result(model.eval(), input_score=score, extra=extra)
