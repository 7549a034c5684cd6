"""FIRE's repaired model: the wrapper that shifts latents back at inference, its clean statistics and state."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentguard.data import Images
from latentguard.defenses.base import DetectionReport
from latentguard.defenses.fire.sites import (
    _collect,
    _flat,
    _hooks,
    _on,
    _resolve_sites,
    _Site,
)
from latentguard.device import module_device
from latentguard.errors import ModelError, SpecError
from latentguard.inference import eval_mode, to_float_images
from latentguard.latent.directions import OnlineDirection, class_projection_stats, unit_directions
from latentguard.models import named_layer

RULES = ("gated", "constant")
GATES = ("neutral", "predicted")
FORMAT = "latentguard.fire/1"
DEFAULT_QUANTILE = 0.99
MAX_CALIBRATION = 2048


class RepairedModel(nn.Module):
    """A model whose latent features are shifted back along backdoor directions at inference (FIRE).

    ``forward`` has the wrapped model's signature; the weights are not modified and the hooks exist only
    during the wrapper's own calls (``wrapper.model(x)`` runs the undefended model; for the same reason one
    wrapper should not be called from several threads at once).

    Read-only views: ``directions`` (layer → ``(K, *S)`` directions ``β``, ``K`` = number of target classes),
    ``thresholds`` (layer → ``(K, C)`` clean thresholds ``τ``), ``alphas`` (layer → ``α``), ``targets``,
    ``info`` (how the repair was built) and ``detection`` (the detection report when the target was detected).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str],
        directions: Mapping[str, torch.Tensor],
        alphas: Mapping[str, float],
        rule: str = "gated",
        gate: str = "neutral",
        floor: bool = False,
        quantile: float = DEFAULT_QUANTILE,
        head: str | None = None,
        num_classes: int | None = None,
        targets: Sequence[int] = (),
        source: str = "qp",
        thresholds: Mapping[str, torch.Tensor] | None = None,
        proj_mean: Mapping[str, torch.Tensor] | None = None,
        proj_std: Mapping[str, torch.Tensor] | None = None,
        proj_ref: Mapping[str, torch.Tensor] | None = None,
        per_source: bool = False,
        source_directions: torch.Tensor | None = None,
        source_thresholds: torch.Tensor | None = None,
        flag_thresholds: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise SpecError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
        if gate not in GATES:
            raise SpecError(f"unknown gate {gate!r}: use one of {', '.join(GATES)}")
        if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
            raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
        self.model = model
        self.rule = rule
        self.gate = gate
        self.floor = bool(floor)
        self.per_source = bool(per_source)
        self.quantile = float(quantile)
        self.head_name = head
        self.source = source
        self.info: dict[str, Any] = dict(info or {})
        self.detection: DetectionReport | None = None
        self._sites = _resolve_sites(model, list(layers), head)
        self.layers = [s.name for s in self._sites]
        head_mod = named_layer(model, head) if head is not None else None
        if num_classes is None:
            if thresholds is not None:
                num_classes = int(torch.as_tensor(next(iter(thresholds.values()))).shape[-1])
            elif isinstance(head_mod, nn.Linear):
                num_classes = head_mod.out_features
            else:
                raise ModelError("num_classes is unknown: pass num_classes= or the head's name")
        self.num_classes = int(num_classes)
        if isinstance(head_mod, nn.Linear) and head_mod.out_features != self.num_classes:
            raise ModelError(
                f"the repair is for {self.num_classes} classes but the head {head!r} has {head_mod.out_features} "
                "outputs: the repair was made for another model"
            )
        self.targets = [int(t) for t in targets]
        if any(not 0 <= t < self.num_classes for t in self.targets):
            raise ModelError(f"targets {self.targets} are not classes of a {self.num_classes}-class model")
        self._alpha: dict[str, float] = {}
        self._active: bool | None = None
        self._fused: _HeadCache | None = None
        self._hook_fns: list[tuple[_Site, Callable]] | None = None
        self._single_head_site = len(self._sites) == 1 and self._sites[0].kind == "input"
        self._calibrated = thresholds is not None
        for i, site in enumerate(self._sites):
            beta = torch.as_tensor(directions[site.name]).detach().float().cpu()
            if beta.dim() < 2 or beta.shape[0] < 1:
                raise ModelError(f"direction for layer {site.name!r} must be (K, ...), got shape {tuple(beta.shape)}")
            if site.kind == "input" and beta[0].numel() != site.module.in_features:
                raise ModelError(
                    f"the repair's penultimate direction has {beta[0].numel()} elements but the head {head!r} "
                    f"takes {site.module.in_features}: the repair was made for another model"
                )
            k = beta.shape[0]
            stats = {}
            for key, given, fill in (("tau", thresholds, 0.0), ("mu", proj_mean, 0.0), ("sd", proj_std, 1.0)):
                t = torch.full((k, self.num_classes), fill) if given is None else torch.as_tensor(given[site.name]).float().cpu()
                if t.shape != (k, self.num_classes):
                    raise ModelError(
                        f"statistics for layer {site.name!r} must have shape ({k}, {self.num_classes}), got {tuple(t.shape)}"
                    )
                stats[key] = t
            ref = torch.zeros(k) if proj_ref is None else torch.as_tensor(proj_ref[site.name]).float().cpu().reshape(-1)
            if ref.shape != (k,):
                raise ModelError(f"reference projections for layer {site.name!r} must have shape ({k},), got {tuple(ref.shape)}")
            self.register_buffer(f"_beta{i}", beta)
            self.register_buffer(f"_unit{i}", unit_directions(beta.double()).float())
            self.register_buffer(f"_shift{i}", torch.zeros(beta[0].numel()))
            self.register_buffer(f"_ref{i}", ref)
            for key, t in stats.items():
                self.register_buffer(f"_{key}{i}", t)
        if self.per_source:
            self._init_source_stage(source_directions, source_thresholds, flag_thresholds)
        self.set_alpha(dict(alphas))
        # clean calibration cache (kept in memory only): images, activations, projections, classes
        self._calib_x: torch.Tensor | None = None
        self._calib_acts: dict[str, torch.Tensor] | None = None
        self._calib_proj: dict[str, torch.Tensor] | None = None
        self._calib_cls: torch.Tensor | None = None
        self._calib_batch = 256
        self._online: dict[str, OnlineDirection] | None = None
        self.eval()  # an inference wrapper: its model runs in eval mode (BatchNorm running statistics)

    def _init_source_stage(self, directions: torch.Tensor | None, thresholds: torch.Tensor | None,
                           flags: torch.Tensor | None) -> None:
        """Buffers of the per-source stage: ``s_{a→p}`` (K, C, d), their unit vectors, the clean thresholds
        ``τ_{a→p}`` (K, C) along them and the flag thresholds ``τ_flag`` (K,) on the shared direction."""
        if not self._single_head_site or self.rule != "gated":
            raise SpecError("per_source works with the gated rule at the penultimate layer alone: drop layer= or rule=")
        k, d = self._buf("beta", 0).shape[0], self._buf("beta", 0)[0].numel()
        if len(self.targets) != k:
            raise ModelError(f"per_source needs one target class per direction: {k} direction(s), targets {self.targets}")
        if directions is None:
            raise ModelError("per_source needs the per-source directions s_{a→p}: build the repair with repair(..., per_source=True)")
        src = torch.as_tensor(directions).detach().float().cpu()
        if src.shape != (k, self.num_classes, d) or not bool(torch.isfinite(src).all()):
            raise ModelError(f"per-source directions must be finite with shape ({k}, {self.num_classes}, {d}), "
                             f"got {tuple(src.shape)}: the repair was made for another model")
        tau = torch.zeros(k, self.num_classes) if thresholds is None else torch.as_tensor(thresholds).float().cpu()
        flag = torch.full((k,), math.inf) if flags is None else torch.as_tensor(flags).float().cpu().reshape(-1)
        if tau.shape != (k, self.num_classes) or flag.shape != (k,):
            raise ModelError(f"per-source thresholds must have shapes ({k}, {self.num_classes}) and ({k},), "
                             f"got {tuple(tau.shape)} and {tuple(flag.shape)}")
        self.register_buffer("_srcbeta0", src)
        self.register_buffer("_srcunit0", unit_directions(src.double().reshape(k * self.num_classes, d))
                             .reshape(k, self.num_classes, d).float())
        self.register_buffer("_srctau0", tau)
        self.register_buffer("_flagtau0", flag)

    # ------------------------------------------------------------------ views and settings
    def _buf(self, kind: str, i: int) -> torch.Tensor:
        return getattr(self, f"_{kind}{i}")

    @property
    def directions(self) -> dict[str, torch.Tensor]:
        return {s.name: self._buf("beta", i) for i, s in enumerate(self._sites)}

    @property
    def thresholds(self) -> dict[str, torch.Tensor]:
        return {s.name: self._buf("tau", i) for i, s in enumerate(self._sites)}

    @property
    def alphas(self) -> dict[str, float]:
        return dict(self._alpha)

    @property
    def active(self) -> bool:
        """False when the wrapper cannot change any output (every α or direction is zero)."""
        if self._active is None:
            self._active = any(self._alpha[s.name] > 0 and bool(self._buf("beta", i).any())
                               for i, s in enumerate(self._sites))
        return self._active

    def _changed(self) -> None:
        """Forget what is derived from α, the directions or the statistics (recomputed on next use)."""
        self._active = None
        self._fused = None
        self._hook_fns = None

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> RepairedModel:
        out = super()._apply(fn, *args, **kwargs)  # .to()/.cuda()/.half() replace the buffers
        self._changed()
        return out

    def set_alpha(self, alpha: float | Mapping[str, float]) -> RepairedModel:
        """Set ``α`` (one number for every layer, or layer → number)."""
        values = dict(alpha) if isinstance(alpha, Mapping) else {n: alpha for n in self.layers}
        if set(values) != set(self.layers):
            raise SpecError(f"alpha must give one value per repaired layer {self.layers}, got {sorted(values)}")
        for i, site in enumerate(self._sites):
            a = values[site.name]
            if isinstance(a, bool) or not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
                raise SpecError(f"alpha for layer {site.name!r} must be a non-negative number, got {a!r}")
            self._alpha[site.name] = float(a)
            beta = self._buf("beta", i)
            self._buf("shift", i).copy_((float(a) * beta.sum(dim=0)).reshape(-1))
        self._changed()
        return self

    def set_quantile(self, quantile: float) -> RepairedModel:
        """Recompute the thresholds for another clean ``quantile`` (needs the calibration cache)."""
        if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
            raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
        self.quantile = float(quantile)
        self._refresh_stats(recompute_classes=False)
        return self

    def extra_repr(self) -> str:
        return (f"rule={self.rule!r}, gate={self.gate!r}, layers={self.layers}, alphas={self._alpha}, "
                f"quantile={self.quantile}, targets={self.targets}, per_source={self.per_source}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.active:
            return self.model(x, *args, **kwargs)
        if self.rule == "gated" and not self._calibrated:
            raise SpecError("the gated repair has no clean statistics yet: call wrapper.calibrate(clean) first")
        if self.rule == "gated" and not self._single_head_site:
            return self._gated_passes(x, *args, **kwargs)
        with _hooks(self._repair_hooks()):
            return self.model(x, *args, **kwargs)

    def _repair_hooks(self) -> list[tuple[_Site, Callable]]:
        """The hooks of a one-pass repair (constant rule, or gated at the penultimate site), built once per setting."""
        if self._hook_fns is None:
            if self.rule == "constant":
                self._hook_fns = [(s, self._constant_hook(i, s)) for i, s in enumerate(self._sites)]
            else:
                self._hook_fns = [(self._sites[0], self._gated_head_hook())]
        return self._hook_fns

    def _head_forward(self, z: torch.Tensor) -> torch.Tensor:
        """``forward`` from the head's input ``z`` on (single penultimate site): the head with the repair's hook."""
        head = self._sites[0].module
        if not self.active:
            return head(z)
        if self.rule == "gated" and not self._calibrated:
            raise SpecError("the gated repair has no clean statistics yet: call wrapper.calibrate(clean) first")
        with _hooks(self._repair_hooks()):
            return head(z)

    def _constant_hook(self, i: int, site: _Site) -> Callable:
        shift = self._buf("shift", i)
        return _on(site, lambda t: (_flat(t, site, shift.numel()) - shift.to(t.dtype)).reshape(t.shape))

    def _fused_head(self, like: torch.Tensor) -> _HeadCache:
        """Cached tensors of the penultimate fast path, rebuilt when the head, the device or the repair change."""
        head = self._sites[0].module
        w, b = head.weight, head.bias
        key = (id(w), w._version, None if b is None else (id(b), b._version), like.device, like.dtype)
        if self._fused is None or self._fused.key != key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
                opts = {"device": like.device, "dtype": like.dtype}
                unit = self._buf("unit", 0).to(**opts).contiguous()
                wd = w.detach().to(**opts)
                tau_t = self._buf("tau", 0).T.to(**opts).contiguous()
                self._fused = _HeadCache(
                    key=key, unit=unit, weight=wd,
                    bias=torch.zeros(wd.shape[0], **opts) if b is None else b.detach().to(**opts),
                    neutral=-(unit @ wd.T), ref=self._buf("ref", 0).to(**opts), tau_t=tau_t,
                    tau_min=tau_t.min(dim=0).values, mu_t=self._buf("mu", 0).T.to(**opts).contiguous(),
                )
                if self.per_source:
                    self._fused.src_unit = self._srcunit0.to(**opts).contiguous()
                    self._fused.src_tau = self._srctau0.to(**opts)
                    self._fused.flag_tau = self._flagtau0.to(**opts)
        return self._fused

    def _head_classes(self, zf: torch.Tensor, proj: torch.Tensor, cache: _HeadCache) -> torch.Tensor:
        """Gate classes at the penultimate site: the head's prediction, on the neutralised latent if ``gate``
        says so (``logits + (π − π̄) A`` with ``A = −β̂ Wᵀ``: the head is linear)."""
        logits = F.linear(zf, cache.weight, cache.bias)
        if self.gate == "neutral":
            logits = torch.addmm(logits, proj - cache.ref, cache.neutral)
        return logits.argmax(dim=1)

    def _head_pass(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections ``(N, K)`` and gate classes at the penultimate site, from the latents alone."""
        cache = self._fused_head(zf)
        proj = F.linear(zf, cache.unit)
        return proj, self._head_classes(zf, proj, cache)

    def _gated_head_hook(self) -> Callable:
        site = self._sites[0]
        dim, alpha = self._buf("unit", 0).shape[1], self._alpha[site.name]

        def shared(zf: torch.Tensor, proj: torch.Tensor, cache: _HeadCache) -> torch.Tensor | None:
            if not bool((proj > cache.tau_min).any()):  # below every class's threshold: nothing to do
                return None
            cls = self._head_classes(zf, proj, cache)
            thr = cache.tau_t[cls]
            excess = (proj - thr).clamp_min(0)
            if not bool((excess > 0).any()):
                return None
            amount = alpha * excess
            if self.floor:
                amount = torch.minimum(amount, torch.maximum(excess, proj - cache.mu_t[cls]))
            return _gate_shift(zf, cache.unit, amount)

        def fn(z: torch.Tensor) -> torch.Tensor | None:
            zf = _flat(z, site, dim)
            cache = self._fused_head(zf)
            proj = F.linear(zf, cache.unit)
            out = shared(zf, proj, cache)
            if self.per_source:
                out = self._source_stage(zf, proj, out, cache, alpha)
            return None if out is None else out.reshape(z.shape)

        return _on(site, fn)

    def _source_stage(self, zf: torch.Tensor, proj: torch.Tensor, shifted: torch.Tensor | None, cache: _HeadCache,
                      alpha: float) -> torch.Tensor | None:
        """The per-source stage: an input whose projection on ``β̂_p`` exceeds the clean ``τ_flag`` is moved
        back along ``û_{a→p}`` (the unit TAC perturbation from its likely source class ``a``, the best class
        but ``p`` on the unrepaired latent) by ``α · max(0, ⟨x, û_{a→p}⟩ − τ_{a→p})``, after the shared shift.

        On the GTSRB zoo models a real trigger moves each class along its own ``s_{a→p}`` more than along the
        shared ``s_p`` (``benchmarks/tac_direction.md``); what the shared shift leaves is removed here."""
        flag = proj > cache.flag_tau
        if not bool(flag.any()):
            return shifted
        out = (zf if shifted is None else shifted).clone()
        logits = F.linear(zf, cache.weight, cache.bias)
        for k, p in enumerate(self.targets):
            rows = flag[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            others = logits[rows].clone()
            others[:, p] = -math.inf
            src = others.argmax(dim=1)
            unit = cache.src_unit[k][src]
            excess = ((out[rows] * unit).sum(dim=1) - cache.src_tau[k][src]).clamp_min(0)
            out[rows] = out[rows] - (alpha * excess)[:, None].to(out.dtype) * unit.to(out.dtype)
        return out

    def _amount(self, i: int, proj: torch.Tensor, cls: torch.Tensor, excess: torch.Tensor, alpha: float) -> torch.Tensor:
        """How far to move along each unit direction: ``α · excess``, with ``floor`` never past the class mean."""
        amount = alpha * excess
        if self.floor:
            room = torch.maximum(excess, proj - self._buf("mu", i)[:, cls].T)
            amount = torch.minimum(amount, room)
        return amount

    def _capture(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        acts: dict[str, torch.Tensor] = {}

        def grab(i: int, site: _Site) -> Callable:
            dim = self._buf("unit", i).shape[1]

            def keep(t: torch.Tensor) -> None:
                acts[site.name] = _flat(t, site, dim)

            return _on(site, keep)

        with _hooks([(s, grab(i, s)) for i, s in enumerate(self._sites)]):
            logits = self.model(x, *args, **kwargs)
        missing = [s.name for s in self._sites if s.name not in acts]
        if missing:
            raise ModelError(f"layer(s) {missing} did not run during the forward pass: repair layers on the model's path")
        return acts, logits

    def _neutral_logits(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits with every site's projections set to their clean means (the backdoor direction neutralised)."""

        def hook(i: int, site: _Site) -> Callable:
            unit, ref = self._buf("unit", i), self._buf("ref", i)

            def fn(t: torch.Tensor) -> torch.Tensor:
                tf = _flat(t, site, unit.shape[1])
                proj = tf.to(unit.dtype) @ unit.T
                return (tf - ((proj - ref) @ unit).to(tf.dtype)).reshape(t.shape)

            return _on(site, fn)

        with _hooks([(s, hook(i, s)) for i, s in enumerate(self._sites)]):
            return self.model(x, *args, **kwargs)

    def _analyse(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Unrepaired activations, projections (layer → ``(N, K)``), logits and gate classes of a batch."""
        acts, logits = self._capture(x, *args, **kwargs)
        proj = {s.name: acts[s.name].to(self._buf("unit", i).dtype) @ self._buf("unit", i).T for i, s in enumerate(self._sites)}
        if self.gate == "predicted":
            cls = logits.argmax(dim=1)
        elif self._single_head_site:
            cls = self._head_pass(acts[self.layers[0]])[1]
        else:
            cls = self._neutral_logits(x, *args, **kwargs).argmax(dim=1)
        return acts, proj, logits, cls

    def _gated_passes(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Gated repair at intermediate layers: an unrepaired pass, then repaired passes on open-gate rows only.

        With ``gate="neutral"`` the neutralised pass runs only on rows whose projection exceeds the lowest
        class threshold somewhere (the other rows cannot open a gate).
        """
        acts, logits = self._capture(x, *args, **kwargs)
        n = x.shape[0]
        dev = logits.device
        proj = [acts[s.name].to(self._buf("unit", i).dtype) @ self._buf("unit", i).T for i, s in enumerate(self._sites)]
        if self.gate == "predicted":
            cls = logits.argmax(dim=1)
        else:
            cand = torch.zeros(n, dtype=torch.bool, device=dev)
            for i, p in enumerate(proj):
                cand |= (p > self._buf("tau", i).min(dim=1).values).any(dim=1)
            if not bool(cand.any()):
                return logits
            cls = torch.zeros(n, dtype=torch.int64, device=dev)
            ci = cand.nonzero().squeeze(1)
            cls[ci] = self._neutral_logits(x[ci.to(x.device)], *args, **kwargs).argmax(dim=1).to(dev)
        excess = [(p - self._buf("tau", i)[:, cls].T).clamp_min(0) for i, p in enumerate(proj)]
        amounts = [self._amount(i, p, cls, e, self._alpha[s.name]) for i, (s, p, e) in enumerate(zip(self._sites, proj, excess, strict=True))]
        rows = torch.zeros(n, dtype=torch.bool, device=dev)
        for e in excess:
            rows |= (e > 0).any(dim=1)
        if not bool(rows.any()):
            return logits
        idx = rows.nonzero().squeeze(1)

        def hook(i: int, site: _Site) -> Callable:
            unit, amount = self._buf("unit", i), amounts[i][idx]
            return _on(site, lambda t: _gate_shift(_flat(t, site, unit.shape[1]), unit, amount).reshape(t.shape))

        with _hooks([(s, hook(i, s)) for i, s in enumerate(self._sites)]):
            repaired = self.model(x[idx.to(x.device)], *args, **kwargs)
        out = logits.clone()
        out[idx] = repaired.to(out.dtype)
        return out

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def projections(self, x: torch.Tensor, *, batch_size: int = 512) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Projections ``π`` (layer → ``(N, K)``) of the unrepaired activations on the unit directions, and
        the class each input's statistics are taken from (``gate``). Images float in [0, 1] or uint8."""
        dev = module_device(self)
        proj: dict[str, list[torch.Tensor]] = {s.name: [] for s in self._sites}
        classes = []
        with eval_mode(self):
            for start in range(0, x.shape[0], batch_size):
                _, p, _, cls = self._analyse(to_float_images(x[start : start + batch_size]).to(dev))
                for name, v in p.items():
                    proj[name].append(v.float().cpu())
                classes.append(cls.cpu())
        k = {s.name: self._buf("unit", i).shape[0] for i, s in enumerate(self._sites)}
        return (
            {n: torch.cat(v) if v else torch.zeros(0, k[n]) for n, v in proj.items()},
            torch.cat(classes) if classes else torch.zeros(0, dtype=torch.int64),
        )

    @torch.no_grad()
    def score(self, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        """Per-input suspicion ``max_{layer, k} (π − μ_c) / σ_c`` (CPU float, higher = more suspicious)."""
        proj, cls = self.projections(x, batch_size=batch_size)
        best = torch.full((cls.shape[0],), -math.inf)
        for i, s in enumerate(self._sites):
            mu, sd = self._buf("mu", i).cpu(), self._buf("sd", i).cpu()
            z = (proj[s.name] - mu[:, cls].T) / sd[:, cls].T
            best = torch.maximum(best, z.max(dim=1).values)
        return torch.where(torch.isfinite(best), best, torch.zeros_like(best))

    # ------------------------------------------------------------------ clean statistics
    @torch.no_grad()
    def calibrate(
        self,
        clean: Images | torch.Tensor,
        *,
        quantile: float | None = None,
        batch_size: int = 256,
        max_samples: int = MAX_CALIBRATION,
        seed: int = 0,
    ) -> RepairedModel:
        """Compute the clean statistics (thresholds, means, standard deviations, reference projections).

        ``clean`` are clean images (an Images container or a float/uint8 NCHW tensor); at most
        ``max_samples`` of them (a seeded random subset) are used and kept in memory for :meth:`observe` and
        :meth:`set_quantile`. Only the model's predictions are used, never labels.
        """
        x = clean.tensors()[0] if isinstance(clean, Images) else to_float_images(clean)
        if x.dim() != 4 or x.shape[0] < 1:
            raise SpecError(f"calibration images must be a non-empty (N, C, H, W) batch, got {tuple(x.shape)}")
        if x.shape[0] > max_samples:
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            x = x[keep.sort().values]
        if quantile is not None:
            if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
                raise SpecError(f"quantile must be in (0, 1], got {quantile!r}")
            self.quantile = float(quantile)
        self._calib_x = x.cpu()
        self._calib_acts, _ = _collect(self.model, self._sites, x, batch_size, module_device(self))
        self._calib_batch = batch_size
        self._online = None
        self._refresh_stats(recompute_classes=True)
        return self

    @torch.no_grad()
    def _refresh_stats(self, recompute_classes: bool = True) -> None:
        if self._calib_acts is None or self._calib_x is None:
            raise SpecError("no clean calibration data: call wrapper.calibrate(clean) first")
        if recompute_classes or self._calib_proj is None or self._calib_cls is None:
            self._calib_proj = {}
            for i, s in enumerate(self._sites):
                proj = self._calib_acts[s.name].double() @ self._buf("unit", i).double().T
                self._calib_proj[s.name] = proj
                self._buf("ref", i).copy_(proj.mean(dim=0).float())
            self._changed()
            self._calib_cls = self._clean_classes()
        for i, s in enumerate(self._sites):
            tau, mu, sd = class_projection_stats(self._calib_proj[s.name], self._calib_cls, self.num_classes, self.quantile)
            self._buf("tau", i).copy_(tau.float())
            self._buf("mu", i).copy_(mu.float())
            self._buf("sd", i).copy_(sd.float())
        if self.per_source:
            self._source_stats()
        self._calibrated = True
        self._changed()

    def _source_stats(self) -> None:
        """Clean thresholds of the per-source stage: ``τ_flag`` = the ``quantile`` of ``π`` over all clean inputs,
        ``τ_{a→p}`` = the ``quantile`` of ``⟨x, û_{a→p}⟩`` over the clean inputs of (gate) class ``a``."""
        assert self._calib_acts is not None and self._calib_proj is not None and self._calib_cls is not None
        name = self.layers[0]
        acts = self._calib_acts[name].double()
        self._flagtau0.copy_(torch.quantile(self._calib_proj[name], self.quantile, dim=0).float())
        for k in range(self._srcunit0.shape[0]):
            proj = acts @ self._srcunit0[k].double().T  # (N, C): column a is ⟨x, û_{a→p}⟩
            tau, _, _ = class_projection_stats(proj, self._calib_cls, self.num_classes, self.quantile)
            self._srctau0[k].copy_(tau.diagonal().float())

    def _clean_classes(self) -> torch.Tensor:
        assert self._calib_x is not None and self._calib_acts is not None and self._calib_proj is not None
        dev = module_device(self)
        if self._single_head_site:
            name = self.layers[0]
            z = self._calib_acts[name].to(dev)
            return self._head_pass(z)[1].cpu()
        out = []
        with eval_mode(self.model):
            for start in range(0, self._calib_x.shape[0], self._calib_batch):
                xb = self._calib_x[start : start + self._calib_batch].to(dev)
                logits = self.model(xb) if self.gate == "predicted" else self._neutral_logits(xb)
                out.append(logits.argmax(dim=1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ online refinement
    @torch.no_grad()
    def observe(
        self,
        x: torch.Tensor,
        *,
        threshold: float = 3.0,
        decay: float | None = None,
        prior_weight: float = 32.0,
        batch_size: int = 512,
    ) -> int:
        """Refine the directions from run-time inputs; returns how many of ``x`` were flagged.

        Inputs whose :meth:`score` exceeds ``threshold`` are folded into a running mean of suspicious
        activations per layer (:class:`~latentguard.latent.directions.OnlineDirection`: bounded memory, the
        current direction as a prior worth ``prior_weight`` samples, optional forgetting ``decay``); the
        direction becomes ``mean(flagged) − mean(clean reference)`` and the clean statistics are recomputed
        from the calibration cache. ``α`` is kept (the gated rule only uses the unit direction).
        """
        if self._calib_acts is None:
            raise SpecError("online refinement needs clean reference data: call wrapper.calibrate(clean) first")
        if any(self._buf("beta", i).shape[0] != 1 for i in range(len(self._sites))):
            raise SpecError("online refinement supports one direction per layer: repair one target at a time")
        flagged = self.score(x, batch_size=batch_size) > threshold
        n = int(flagged.sum())
        if self._online is None:
            self._online = {
                s.name: OnlineDirection(
                    (self._calib_acts[s.name].shape[1],),
                    reference=self._calib_acts[s.name].double().mean(dim=0),
                    prior=self._buf("beta", i)[0].reshape(-1).double().cpu(),
                    prior_weight=prior_weight,
                    decay=decay,
                )
                for i, s in enumerate(self._sites)
            }
        if n == 0:
            return 0
        xs = to_float_images(x)[flagged.to(x.device)]
        acts, _ = _collect(self.model, self._sites, xs, batch_size, module_device(self))
        for i, s in enumerate(self._sites):
            online = self._online[s.name]
            online.update(acts[s.name])
            beta = self._buf("beta", i)
            beta.copy_(online.direction.float().reshape(beta.shape))
            self._buf("unit", i).copy_(unit_directions(beta.double()).float())
        self.set_alpha(self._alpha)
        self._refresh_stats(recompute_classes=True)
        self.info["observed_flagged"] = int(self.info.get("observed_flagged", 0)) + n
        return n

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the repair on the same model: tensors and plain metadata only."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "rule": self.rule,
            "gate": self.gate,
            "floor": self.floor,
            "source": self.source,
            "quantile": float(self.quantile),
            "head": self.head_name or "",
            "layers": list(self.layers),
            "alphas": [float(self._alpha[n]) for n in self.layers],
            "targets": list(self.targets),
            "num_classes": int(self.num_classes),
            "calibrated": bool(self._calibrated),
        }
        for i in range(len(self._sites)):
            for key, kind in _STATE_TENSORS:
                out[f"{key}.{i}"] = self._buf(kind, i).detach().cpu().clone()
        if self.per_source:
            out["per_source"] = True
            for key, kind in _SOURCE_TENSORS:
                out[key] = self._buf(kind, 0).detach().cpu().clone()
        return out


_STATE_TENSORS = (("beta", "beta"), ("thresholds", "tau"), ("proj_mean", "mu"), ("proj_std", "sd"), ("proj_ref", "ref"))
_SOURCE_TENSORS = (("source_beta", "srcbeta"), ("source_thresholds", "srctau"), ("flag_thresholds", "flagtau"))


@dataclass
class _HeadCache:
    key: tuple
    unit: torch.Tensor  # (K, d) unit directions
    weight: torch.Tensor  # (C, d) head weight
    bias: torch.Tensor  # (C,)
    neutral: torch.Tensor  # (K, C) = −β̂ Wᵀ
    ref: torch.Tensor  # (K,) clean mean projections
    tau_t: torch.Tensor  # (C, K) thresholds
    tau_min: torch.Tensor  # (K,) lowest threshold over classes
    mu_t: torch.Tensor  # (C, K) clean class means
    src_unit: torch.Tensor | None = None  # (K, C, d) unit per-source directions û_{a→p} (per_source)
    src_tau: torch.Tensor | None = None  # (K, C) their clean thresholds
    flag_tau: torch.Tensor | None = None  # (K,) flag thresholds on β̂


def _gate_shift(zf: torch.Tensor, unit: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Remove ``amount_k · β̂_k`` from the rows with an open gate; the other rows stay bit-identical."""
    rows = (amount > 0).any(dim=1, keepdim=True)
    shifted = zf - (amount @ unit).to(zf.dtype)
    return torch.where(rows, shifted, zf)
