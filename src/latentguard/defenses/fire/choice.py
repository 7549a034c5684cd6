"""Choosing FIRE's α and quantile on the clean reserve: cross-fitted candidates scored on synthetic triggers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from latentguard.defenses.fire.sites import _flat, _hooks, _on, _Site
from latentguard.inference import eval_mode

if TYPE_CHECKING:
    from latentguard.defenses.fire.wrapper import RepairedModel

SELECTIONS = ("left", "restored")

#: Candidate strengths. The QP direction is the *smallest* shift that flips the clean data, so a real trigger
#: may be larger; a measured (paired/unpaired) direction is not exceeded by the constant rule.
ALPHAS_GATED = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)
ALPHAS_QP = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
ALPHAS_MEASURED = (0.25, 0.5, 0.75, 1.0)
QUANTILES = (0.9, 0.95, 0.99, 1.0)
#: Strengths ``c`` of the synthetic triggers ``x + c·β`` that choose α under ``select="left"``: the minimal flip
#: and twice it (a real trigger moves the latent 1.1–2.3× as far as ``s_p``, ``benchmarks/tac_direction.md``).
SYNTHETIC_SCALES = (1.0, 2.0)
#: ``select="restored"`` (the rule before ``"left"``): the minimal flip alone, counted back to the clean prediction.
RESTORED_SCALES = (1.0,)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, dev: torch.device,
             hooks: Sequence[tuple[_Site, Callable]] = ()) -> torch.Tensor:
    out = []
    with eval_mode(model), _hooks(hooks):
        for s in range(0, x.shape[0], batch_size):
            out.append(model(x[s : s + batch_size].to(dev)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


#: Evaluate the choice's candidates from cached head inputs when the only site is the penultimate one (the
#: same predictions as full passes); False forces full passes.
_FAST_CHOICE = True


@torch.no_grad()
def _head_inputs(wrapper: RepairedModel, x: torch.Tensor, batch_size: int,
                 dev: torch.device) -> list[torch.Tensor] | None:
    """The head's input of each batch of an unrepaired full pass over ``x``, or None when the model's output is
    not the head's own output of its only call (then only full passes give the wrapper's predictions)."""
    site = wrapper._sites[0]
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    taps = [(site, lambda _m, args: ins.append(args[0])),
            (_Site(site.name, site.module, "output"), lambda _m, _a, out: outs.append(out))]
    batches = []
    with eval_mode(wrapper.model), _hooks(taps):
        for s in range(0, x.shape[0], batch_size):
            ins.clear()
            outs.clear()
            logits = wrapper.model(x[s : s + batch_size].to(dev))
            if len(ins) != 1 or len(outs) != 1 or logits is not outs[0]:
                return None
            batches.append(ins[0])
    return batches


class _Inputs:
    """Images a candidate repair is scored on: full passes of the network, or — single penultimate site —
    the head alone on the latents a full pass gives it, captured once (pre-hooks fire on direct calls)."""

    def __init__(self, wrapper: RepairedModel, x: torch.Tensor, batch_size: int, dev: torch.device) -> None:
        self.wrapper, self.x, self.batch_size, self.dev = wrapper, x, batch_size, dev
        fast = _FAST_CHOICE and wrapper._single_head_site
        self.latents = _head_inputs(wrapper, x, batch_size, dev) if fast else None

    def subset(self, keep: torch.Tensor) -> _Inputs:
        """The images selected by the mask ``keep`` (their latents recaptured batch by batch, as a full pass)."""
        if bool(keep.all()):
            return self
        return _Inputs(self.wrapper, self.x[keep], self.batch_size, self.dev)

    @torch.no_grad()
    def predict(self, hooks: Sequence[tuple[_Site, Callable]] = (), *, repaired: bool = True) -> torch.Tensor:
        """Predictions of the wrapper (``repaired``) or the undefended model, with ``hooks`` registered first."""
        w = self.wrapper
        if self.latents is None:
            return _predict(w if repaired else w.model, self.x, self.batch_size, self.dev, hooks)
        head = w._sites[0].module
        call = w._head_forward if repaired else head
        with eval_mode(w), _hooks(hooks):
            out = [call(z).argmax(dim=1).cpu() for z in self.latents]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _adding(site: _Site, vec: torch.Tensor) -> tuple[_Site, Callable]:
    """A hook adding the fixed vector ``vec`` to every activation at ``site`` (a synthetic trigger)."""
    v = vec.reshape(-1).clone()
    return site, _on(site, lambda t: (_flat(t, site, v.numel()) + v.to(t.dtype)).reshape(t.shape))


class _Restoration:
    """Clean-only proxy of how well a repair undoes a backdoor: add each direction, times each scale, to the
    holdout's activations (a synthetic trigger) and keep the inputs this flips. ``select="left"`` counts how
    many the repair moves off the prediction the synthetic trigger caused (what ASR counts), ``"restored"``
    how many it brings back to their clean prediction (an overshoot past the clean class then counts against)."""

    def __init__(self, wrapper: RepairedModel, held: _Inputs, base: torch.Tensor, select: str = "left") -> None:
        self.select = select
        scales = SYNTHETIC_SCALES if select == "left" else RESTORED_SCALES
        # (hook, flipped inputs, their clean predictions, their predictions under the synthetic trigger)
        self.cases: list[tuple[tuple[_Site, Callable], _Inputs, torch.Tensor, torch.Tensor]] = []
        for i, site in enumerate(wrapper._sites):
            for k, scale in itertools.product(range(wrapper._buf("beta", i).shape[0]), scales):
                hook = _adding(site, scale * wrapper._buf("beta", i)[k])
                triggered = held.predict([hook], repaired=False)
                flipped = triggered != base
                if bool(flipped.any()):
                    self.cases.append((hook, held.subset(flipped), base[flipped], triggered[flipped]))
        if wrapper.per_source:  # each input of class a also gets its own source's s_{a→p}
            site, src = wrapper._sites[0], wrapper._buf("srcbeta", 0)
            for k, a in itertools.product(range(src.shape[0]), range(src.shape[1])):
                mine = base == a
                if not bool(src[k, a].any()) or not bool(mine.any()):
                    continue
                hook = _adding(site, src[k, a])
                sub, ys = held.subset(mine), base[mine]
                triggered = sub.predict([hook], repaired=False)
                flipped = triggered != ys
                if bool(flipped.any()):
                    self.cases.append((hook, sub.subset(flipped), ys[flipped], triggered[flipped]))

    @property
    def flipped(self) -> int:
        return sum(len(c[2]) for c in self.cases)

    def count(self) -> int:
        """How many of the flipped inputs the wrapper's current repair undoes (see the class docstring)."""
        if self.select == "left":
            return sum(int((xs.predict([hook]) != bad).sum()) for hook, xs, _, bad in self.cases)
        return sum(int((xs.predict([hook]) == ys).sum()) for hook, xs, ys, _ in self.cases)


class _Observed:
    """Real suspicious inputs the defender holds; counts how many a repair moves off the backdoor's prediction
    and how many it restores to the clean prediction, where that is known.

    ``paired``: each triggered copy that the backdoor flips away from its clean partner's prediction (the
    clean prediction is known). ``unpaired``: each suspicious image predicted as the set's most frequent class
    (the backdoor's, as far as the defender can tell; no clean prediction is known, so none counts as restored).
    """

    def __init__(self, wrapper: RepairedModel, x_triggered: torch.Tensor, got: torch.Tensor, want: torch.Tensor | None,
                 batch_size: int, dev: torch.device) -> None:
        """``got``: the unrepaired predictions of ``x_triggered``; ``want``: those of their clean partners (paired)."""
        if want is not None:
            keep = got != want
        else:
            keep = got == torch.mode(got).values if got.numel() else got.bool()
            want = torch.full_like(got, -1)
        self.inputs = _Inputs(wrapper, x_triggered[keep], batch_size, dev)
        self.expected, self.backdoored = want[keep], got[keep]

    @property
    def flipped(self) -> int:
        return int(self.expected.numel())

    def counts(self) -> tuple[int, int]:
        """(restored to the clean partner's prediction, no longer the backdoor's prediction)."""
        if not self.flipped:
            return 0, 0
        pred = self.inputs.predict()
        return int((pred == self.expected).sum()), int((pred != self.backdoored).sum())


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold id per sample: each class's samples shuffled and dealt round-robin over the ``k`` folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def _choose(wrapper: RepairedModel, x: torch.Tensor, y: torch.Tensor, info: dict[str, Any], *,
            alpha: float | Mapping[str, float] | None, quantile: float | None, tolerance: float, folds: int,
            seed: int, batch_size: int, dev: torch.device, observed: _Observed | None = None,
            select: str = "left") -> float:
    """Choose α and the quantile by ``folds``-fold cross-fitting on the clean reserve; returns the quantile.

    For each fold the statistics are fitted on the other folds and every candidate is scored on the fold:
    correct predictions, and synthetic backdoor inputs undone (see :class:`_Restoration`; ``select``). Summed
    over the folds, a candidate is feasible when its accuracy is within ``tolerance`` of the undefended model's;
    the feasible candidate undoing most wins, ties to the smaller α and then the higher quantile. When the
    defender holds real suspicious inputs (``observed``: the paired or unpaired source), the share of them moved
    off the backdoor's prediction ranks first, then the share restored to the clean prediction (paired only),
    and the synthetic share breaks the remaining ties: a synthetic trigger x + β only mimics the mean change of
    a real one. With the penultimate site alone the candidates run only the head, on latents captured once per
    fold (:class:`_Inputs`).
    """
    rule, source = wrapper.rule, wrapper.source
    grid_q = [wrapper.quantile] if rule == "constant" or quantile is not None else list(QUANTILES)
    if alpha is not None:
        grid_a: list[Any] = [dict(alpha) if isinstance(alpha, Mapping) else float(alpha)]
    else:
        grid_a = list(ALPHAS_GATED if rule == "gated" else ALPHAS_QP if source == "qp" else ALPHAS_MEASURED)
    base = _predict(wrapper.model, x, batch_size, dev)
    n = int(y.numel())
    base_correct = int((base == y).sum())
    fold = torch.from_numpy(_stratified_folds(y.numpy(), folds, seed))
    correct = np.zeros((len(grid_q), len(grid_a)), dtype=np.int64)
    undone = np.zeros_like(correct)
    seen = np.zeros_like(correct)
    left = np.zeros_like(correct)
    flipped = 0
    for f in range(folds):
        test = fold == f
        if not bool(test.any()) or bool(test.all()):
            continue
        wrapper.calibrate(x[~test], batch_size=batch_size, seed=seed)
        held = _Inputs(wrapper, x[test], batch_size, dev)
        restoration = _Restoration(wrapper, held, base[test], select)
        flipped += restoration.flipped
        for iq, q in enumerate(grid_q):
            wrapper.set_quantile(q)
            for ia, a in enumerate(grid_a):
                wrapper.set_alpha(a)
                correct[iq, ia] += int((held.predict() == y[test]).sum())
                undone[iq, ia] += restoration.count()
                if observed is not None:
                    back, off = observed.counts()
                    seen[iq, ia] += back
                    left[iq, ia] += off
    tried, best = [], None
    n_seen = observed.flipped * folds if observed is not None else 0
    for iq, q in enumerate(grid_q):
        for ia, a in enumerate(grid_a):
            a_val = a if isinstance(a, float) else max(a.values())
            ok = correct[iq, ia] >= base_correct - tolerance * n - 1e-6
            share = undone[iq, ia] / flipped if flipped else 1.0
            real = seen[iq, ia] / n_seen if n_seen else 1.0
            off = left[iq, ia] / n_seen if n_seen else 1.0
            row = {"quantile": float(q), "alpha": float(a_val), "acc": float(correct[iq, ia] / n),
                   "synthetic": float(share), "ok": bool(ok)}
            if n_seen:
                row.update(observed_restored=float(real), observed_left=float(off))
            tried.append(row)
            key = (round(off, 9), round(real, 9), round(share, 9), -a_val, q)
            if ok and (best is None or key > best[0]):
                best = (key, a, q, float(correct[iq, ia] / n), float(share))
    if best is None:  # nothing within tolerance: the weakest candidate
        best = (None, grid_a[0], grid_q[-1], float("nan"), float("nan"))
        info["note"] = "no candidate kept the clean accuracy within tolerance: the weakest one is used"
    _, chosen_a, chosen_q, acc, share = best
    wrapper.set_alpha(chosen_a)
    info.update(folds=folds, cv_acc_before=base_correct / n, cv_acc_after=acc, select=select,
                synthetic_flipped=flipped, synthetic_undone=share, tolerance=float(tolerance), candidates=tried)
    if observed is not None:  # the chosen candidate's key starts with its (left, restored) shares
        key = best[0] or (float("nan"), float("nan"))
        info.update(observed_flipped=observed.flipped, observed_left=key[0], observed_restored=key[1])
    return float(chosen_q)
