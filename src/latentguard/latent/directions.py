"""Backdoor directions in a latent space: the trigger as a vector βₗ that can be subtracted again.

FIRE (Ahlers et al., arXiv 2602.10780) models a trigger as a structured, repeatable change of the
representation ``xₗ`` between two layers: triggered inputs sit, to a good approximation, at ``xₗ + βₗ``. This
module holds the estimators of ``βₗ``; the run-time repair that subtracts them is
:mod:`latentguard.defenses.fire`. Every estimator takes activations of shape ``(N, *S)`` (any per-sample
shape ``S``: a latent vector, a feature map) and returns a direction of shape ``S``.

Estimators, by the data they need:

- clean data only: :func:`qp_direction` — the TAC flip perturbation ``s_p`` of the flagged target class ``p``
  in the penultimate latent (the smallest shift sending every clean latent into ``p``);
  :func:`layer_flip_delta` — the same idea for an intermediate layer: a shared ``δ`` of the layer's output
  shape, optimised through the rest of the network to push clean data into ``p`` under an L2 penalty;
  :func:`class_mean_direction` — the offset of the clean class-``p`` mean from the other classes' (any layer);
- paired clean/triggered activations: :func:`paired_direction` (mean of the differences, or their top
  principal direction);
- unpaired clean and suspicious sets: :func:`unpaired_direction` (difference of means, the suspicious set
  usually enlarged with augmented views);
- a stream of inputs flagged at run time: :class:`OnlineDirection` (running or exponentially weighted mean,
  ``O(|S|)`` memory whatever the stream length).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentguard.errors import LatentGuardError

__all__ = [
    "OnlineDirection",
    "as_activations",
    "class_mean_direction",
    "class_projection_stats",
    "layer_flip_delta",
    "paired_direction",
    "qp_direction",
    "unit_directions",
    "unpaired_direction",
]


def as_activations(x: Any, name: str = "activations", *, min_rows: int = 1) -> torch.Tensor:
    """``x`` as a finite float64 CPU tensor of shape ``(N, *S)`` with ``N ≥ min_rows``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise LatentGuardError(f"{name} must be a tensor or numpy array of shape (N, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise LatentGuardError(f"{name} must have shape (N, ...) with one row per sample, got {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise LatentGuardError(f"{name} has {x.shape[0]} samples: give at least {min_rows}")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise LatentGuardError(f"{name} contains NaN or infinite values: drop those samples first")
    return x


def unit_directions(beta: torch.Tensor) -> torch.Tensor:
    """Flatten ``(K, *S)`` directions to unit rows ``(K, |S|)`` (a zero direction stays zero)."""
    flat = beta.reshape(beta.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, flat / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))


# ----------------------------------------------------------------------------------------------------------
# (a) clean data only
# ----------------------------------------------------------------------------------------------------------


def qp_direction(latents: Any, weight: Any, bias: Any, target: int, *, quantile: float = 1.0) -> torch.Tensor:
    """The TAC flip perturbation ``s_p``: the minimal latent shift classifying every clean latent as ``target``.

    Args:
        latents: ``(N, d)`` clean penultimate latents.
        weight, bias: the linear head ``(C, d)``, ``(C,)``.
        target: the suspected backdoor target class ``p``.
        quantile: fraction of the clean latents each constraint must hold for (1.0 = all, the TAC QP).

    Returns:
        ``(d,)`` float64 tensor ``s_p`` (see :func:`latentguard.latent.qp.minimal_flip_perturbations`).
    """
    from latentguard.latent.qp import minimal_flip_perturbations

    sol = minimal_flip_perturbations(latents, weight, bias, classes=[int(target)], quantile=quantile)
    return torch.from_numpy(np.asarray(sol.perturbations[0], dtype=np.float64))


def class_mean_direction(activations: Any, classes: Any, target: int) -> torch.Tensor:
    """``β = mean(x | class p) − mean(x | other classes)`` over clean activations: where the target lives.

    A backdoor teaches the network to move a triggered input's representation to where class ``p`` lives, so
    the trigger-activated change tends to align with the offset of the clean class-``p`` centroid from the
    other classes' (on digits models the cosine with the true change was 0.94–0.98, against 0.87–0.90 for
    the QP flip perturbation). ``classes`` are labels or the model's predictions on the clean samples; works
    for any layer's activations ``(N, *S)``.
    """
    a = as_activations(activations, "activations")
    c = torch.as_tensor(np.asarray(classes)).long().reshape(-1)
    if c.shape[0] != a.shape[0]:
        raise LatentGuardError(f"{a.shape[0]} activations but {c.shape[0]} classes: give one class per sample")
    inside, outside = c == int(target), c != int(target)
    if not bool(inside.any()) or not bool(outside.any()):
        raise LatentGuardError(f"class {target} needs clean samples inside and outside it to form a class-mean direction")
    return a[inside].mean(dim=0) - a[outside].mean(dim=0)


class _DeltaModel(nn.Module):
    """``model`` with a learnable shared offset ``delta`` added to one layer's output; always in eval mode."""

    def __init__(self, model: nn.Module, layer: nn.Module, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.delta = nn.Parameter(torch.zeros(shape, device=device))
        self._layer = [layer]  # a list, so the layer is not registered twice

    def train(self, mode: bool = True) -> _DeltaModel:  # dropout/BN stay in inference mode while δ is fitted
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handle = self._layer[0].register_forward_hook(lambda _m, _a, out: out + self.delta)
        try:
            return self.model(x)
        finally:
            handle.remove()


def layer_flip_delta(
    model: nn.Module,
    layer: str | nn.Module,
    images: torch.Tensor,
    target: int,
    *,
    l2: float = 1e-2,
    margin: float = 1.0,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 128,
    device: str | torch.device | None = "auto",
    seed: int = 0,
) -> torch.Tensor:
    """A shared offset ``δ`` of ``layer``'s output shape that pushes clean ``images`` into class ``target``.

    The intermediate-layer analogue of the TAC QP (which only exists for the linear head): ``δ`` minimises

        mean_i max(0, max_{j≠p} f_j(h_i + δ) − f_p(h_i + δ) + margin) + l2 · ‖δ‖² / |S|

    where ``h_i`` is the layer's output on clean image ``i`` and ``f`` the rest of the network. The hinge stops
    pushing a sample once it sits ``margin`` logits inside ``p``, so — as in the QP — ``δ`` stays close to the
    smallest shift that flips the clean data; the penalty is per element so ``l2`` does not depend on the
    layer size. Only ``δ`` is trained (the model's weights are untouched; BatchNorm/dropout run in inference
    mode) with Adam through the one training loop :func:`latentguard.train.fit`.

    Args:
        model: the classifier (images in [0, 1] → logits).
        layer: the module (or its name in ``model.named_modules()``) whose output receives ``δ``.
        images: clean float images ``(N, C, H, W)`` in [0, 1] (uint8 is accepted).
        target: the suspected backdoor target class ``p``.

    Returns:
        ``δ`` as a float64 CPU tensor of the layer's per-sample output shape.
    """
    from latentguard.device import resolve_device
    from latentguard.inference import to_float_images
    from latentguard.models import named_layer
    from latentguard.train import TrainConfig, fit

    if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 >= 0):
        raise LatentGuardError(f"l2 must be a non-negative number, got {l2!r}")
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise LatentGuardError(f"margin must be a non-negative number, got {margin!r}")
    module = named_layer(model, layer) if isinstance(layer, str) else layer
    x = to_float_images(images)
    if x.dim() != 4 or x.shape[0] < 1:
        raise LatentGuardError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(x.shape)}")
    dev = resolve_device(device)
    model.to(dev)
    shape = _output_shape(model, module, x[:1].to(dev))
    wrapped = _DeltaModel(model, module, shape, dev)
    with torch.no_grad():
        n_classes = int(model.eval()(x[:1].to(dev)).shape[1])
    if not 0 <= int(target) < n_classes:
        raise LatentGuardError(f"target {target} is not a class of this {n_classes}-class model")
    p = int(target)
    numel = float(max(1, wrapped.delta.numel()))

    def loss_fn(m: nn.Module, xb: torch.Tensor, _yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = m(xb)
        others = logits.clone()
        others[:, p] = float("-inf")
        hinge = F.relu(others.max(dim=1).values - logits[:, p] + margin).mean()
        return hinge + l2 * wrapped.delta.pow(2).sum() / numel, logits

    frozen = [q for q in model.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam", weight_decay=0.0,
                          schedule="constant", augment=False, seed=seed)
        labels = torch.full((x.shape[0],), p, dtype=torch.int64)
        fit(wrapped, (x, labels), cfg, device=dev, params=[wrapped.delta], loss_fn=loss_fn)
    finally:
        for q in frozen:
            q.requires_grad_(True)
    return wrapped.delta.detach().to("cpu", torch.float64)


def _output_shape(model: nn.Module, module: nn.Module, x1: torch.Tensor) -> torch.Size:
    seen: list[torch.Size] = []

    def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise LatentGuardError(
                f"the layer returns {type(out).__name__}, not a tensor: pick a layer whose output is one tensor"
            )
        seen.append(out.shape[1:])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(x1)
    finally:
        handle.remove()
    if not seen:
        raise LatentGuardError("the layer did not run during the forward pass: pick a layer on the model's path")
    return seen[-1]


# ----------------------------------------------------------------------------------------------------------
# (b) paired and (c) unpaired samples
# ----------------------------------------------------------------------------------------------------------


def paired_direction(clean: Any, triggered: Any, *, method: str = "mean", iters: int = 100) -> torch.Tensor:
    """The trigger direction from paired activations (row ``i`` of both = the same image without/with trigger).

    ``method="mean"``: ``β = mean_i (triggered_i − clean_i)`` (the paper's paired estimate).
    ``method="pca"``: the top (uncentred) principal direction ``v`` of the differences, oriented along their
    mean and scaled to the mean's length along it, ``β = ⟨mean, v⟩ v`` — robust to a minority of pairs whose
    shift points elsewhere (e.g. images the trigger does not flip).
    """
    c = as_activations(clean, "clean")
    t = as_activations(triggered, "triggered")
    if c.shape != t.shape:
        raise LatentGuardError(
            f"paired activations must have the same shape, got clean {tuple(c.shape)} and triggered {tuple(t.shape)}"
        )
    diff = (t - c).reshape(c.shape[0], -1)
    mean = diff.mean(dim=0)
    if method == "mean":
        return mean.reshape(c.shape[1:])
    if method != "pca":
        raise LatentGuardError(f"unknown method {method!r}: use 'mean' or 'pca'")
    v = _top_singular_vector(diff, mean, iters)
    return (torch.dot(mean, v) * v).reshape(c.shape[1:])


def _top_singular_vector(d: torch.Tensor, start: torch.Tensor, iters: int) -> torch.Tensor:
    """Top right singular vector of ``d`` (power iteration on ``dᵀd`` from ``start``), oriented along ``start``."""
    if min(d.shape) <= 512:
        v = torch.linalg.svd(d, full_matrices=False).Vh[0]
    else:
        v = start / start.norm() if start.norm() > 0 else torch.ones_like(start) / math.sqrt(start.numel())
        for _ in range(iters):
            w = d.T @ (d @ v)
            n = w.norm()
            if n == 0:
                break
            v = w / n
    return -v if torch.dot(v, start) < 0 else v


def unpaired_direction(clean: Any, suspicious: Any) -> torch.Tensor:
    """``β = mean(suspicious) − mean(clean)``: the paper's unpaired estimate (difference of means).

    ``suspicious`` holds activations of (mostly) triggered inputs — typically a handful of samples enlarged
    with augmented views; the sets need not have the same size or correspond to the same images.
    """
    c = as_activations(clean, "clean")
    s = as_activations(suspicious, "suspicious")
    if c.shape[1:] != s.shape[1:]:
        raise LatentGuardError(
            f"clean and suspicious activations differ per sample: {tuple(c.shape[1:])} vs {tuple(s.shape[1:])}"
        )
    return s.mean(dim=0) - c.mean(dim=0)


# ----------------------------------------------------------------------------------------------------------
# clean statistics of the projection on a direction
# ----------------------------------------------------------------------------------------------------------


def class_projection_stats(
    projections: Any, predicted: Any, num_classes: int, quantile: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-predicted-class clean statistics of projections ``π = ⟨x, β̂⟩``.

    Args:
        projections: ``(N, K)`` projections of ``N`` clean activations on ``K`` unit directions.
        predicted: ``(N,)`` the class the model predicts for each clean sample.
        num_classes: ``C``.
        quantile: ``q ∈ (0, 1]`` for the thresholds (1.0 = the clean maximum).

    Returns:
        ``(thresholds, means, stds)``, each ``(K, C)`` float64: the ``q``-quantile, mean and standard deviation
        of ``π`` over the clean samples predicted as ``c``. A class no clean sample is predicted as falls back
        to the statistics over all samples; a class with fewer than two samples takes the global standard
        deviation, and every standard deviation is floored at 1e-3 of the global one (never zero).
    """
    proj = as_activations(projections, "projections")
    if proj.dim() != 2:
        raise LatentGuardError(f"projections must be (N, K), got shape {tuple(proj.shape)}")
    pred = torch.as_tensor(np.asarray(predicted)).long().reshape(-1)
    if pred.shape[0] != proj.shape[0]:
        raise LatentGuardError(f"{proj.shape[0]} projections but {pred.shape[0]} predictions: give one per sample")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise LatentGuardError(f"predicted classes must lie in [0, {num_classes})")
    if not (isinstance(quantile, int | float) and 0.0 < quantile <= 1.0):
        raise LatentGuardError(f"quantile must be in (0, 1], got {quantile!r}")
    k = proj.shape[1]
    g_tau = torch.quantile(proj, float(quantile), dim=0)
    g_mu = proj.mean(dim=0)
    g_sd = proj.std(dim=0, unbiased=True) if proj.shape[0] > 1 else torch.zeros(k, dtype=torch.float64)
    floor = torch.clamp(1e-3 * g_sd, min=1e-12)
    g_sd = torch.maximum(g_sd, floor)
    tau = g_tau[:, None].repeat(1, num_classes)
    mu = g_mu[:, None].repeat(1, num_classes)
    sd = g_sd[:, None].repeat(1, num_classes)
    for c in range(num_classes):
        rows = proj[pred == c]
        if rows.shape[0] == 0:
            continue
        tau[:, c] = torch.quantile(rows, float(quantile), dim=0)
        mu[:, c] = rows.mean(dim=0)
        if rows.shape[0] > 1:
            sd[:, c] = torch.maximum(rows.std(dim=0, unbiased=True), floor)
    return tau, mu, sd


# ----------------------------------------------------------------------------------------------------------
# (d) streaming
# ----------------------------------------------------------------------------------------------------------


class OnlineDirection:
    """A running estimate of ``β`` refined as suspicious inputs arrive, in ``O(|S|)`` memory.

    It keeps the (weighted) running mean ``m`` of what it is fed and returns ``β = m − reference``:

    - :meth:`update` with activations of flagged inputs and ``reference`` = the clean mean: the unpaired
      difference of means, grown one batch at a time;
    - :meth:`update_pairs` with paired clean/triggered activations (``reference`` left at zero): the running
      mean of the differences.

    ``decay=None`` is the exact running mean (Welford): after any split of the stream into batches it equals the
    batch estimate. ``decay=γ ∈ (0, 1)`` forgets old batches: each batch's total weight shrinks by ``γ`` per
    later batch, so the estimate follows a drifting trigger. A ``prior`` direction (e.g. the clean-data QP
    estimate) counts as ``prior_weight`` samples, and is what :attr:`direction` returns before any update.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        reference: Any | None = None,
        decay: float | None = None,
        prior: Any | None = None,
        prior_weight: float = 0.0,
    ) -> None:
        self.shape = torch.Size(shape)
        if decay is not None and not (isinstance(decay, int | float) and 0.0 < decay < 1.0):
            raise LatentGuardError(f"decay must be in (0, 1) or None (exact running mean), got {decay!r}")
        if not (isinstance(prior_weight, int | float) and math.isfinite(prior_weight) and prior_weight >= 0):
            raise LatentGuardError(f"prior_weight must be a non-negative number, got {prior_weight!r}")
        self.decay = decay
        self.reference = self._vector(reference, "reference")
        self.prior = self._vector(prior, "prior")
        self.prior_weight = float(prior_weight) if prior is not None else 0.0
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.weight = 0.0  # effective number of samples behind ``mean``
        self.count = 0  # samples seen in total

    def _vector(self, v: Any, name: str) -> torch.Tensor:
        if v is None:
            return torch.zeros(self.shape, dtype=torch.float64)
        t = as_activations(torch.as_tensor(v)[None], name)[0]
        if t.shape != self.shape:
            if t.numel() != math.prod(self.shape):
                raise LatentGuardError(f"{name} has shape {tuple(t.shape)}, expected {tuple(self.shape)}")
            t = t.reshape(self.shape)
        return t

    def update(self, activations: Any) -> OnlineDirection:
        """Fold a batch ``(n, *S)`` of suspicious activations into the running mean."""
        a = as_activations(activations, "activations", min_rows=0)
        if a.shape[1:] != self.shape:
            raise LatentGuardError(f"activations have per-sample shape {tuple(a.shape[1:])}, expected {tuple(self.shape)}")
        n = a.shape[0]
        if n == 0:
            return self
        gamma = 1.0 if self.decay is None else self.decay
        self.weight = gamma * self.weight + n
        self.mean += (a.sum(dim=0) - n * self.mean) / self.weight
        self.count += n
        return self

    def update_pairs(self, clean: Any, triggered: Any) -> OnlineDirection:
        """Fold paired activations in as their differences ``triggered − clean``."""
        c = as_activations(clean, "clean", min_rows=0)
        t = as_activations(triggered, "triggered", min_rows=0)
        if c.shape != t.shape:
            raise LatentGuardError(f"paired batches differ in shape: {tuple(c.shape)} vs {tuple(t.shape)}")
        return self.update(t - c)

    @property
    def direction(self) -> torch.Tensor:
        """The current ``β``: ``mean − reference``, blended with the prior by their weights."""
        total = self.weight + self.prior_weight
        if total == 0:
            return torch.zeros(self.shape, dtype=torch.float64)
        data = self.mean - self.reference
        return (self.weight * data + self.prior_weight * self.prior) / total

    @property
    def nbytes(self) -> int:
        """Memory held by the estimate (independent of how many samples were seen)."""
        return sum(t.numel() * t.element_size() for t in (self.mean, self.reference, self.prior))
