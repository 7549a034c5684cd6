"""I-BAU (Zeng et al., ICLR 2022): adversarial unlearning of backdoors via the implicit hypergradient.

The minimax  min_θ max_{‖δ‖₂ ≤ C}  (1/n) Σ_i CE(f_θ(x_i + δ), y_i)  over one universal perturbation δ is
solved in rounds. Each round first maximises δ with one pass of SGD over the clean reserve (labels = the
model's own predictions, objective −CE + ``pert_reg``·‖δ‖², the result projected on the L2 ball of radius
``norm_bound``), then takes one outer step per batch on θ with the implicit hypergradient

    dH/dθ = ∂_θ L₁(δ, θ) + (∂_θ Φ(δ, θ))ᵀ v,    v = Σ_{j<K} (∂_δ Φ)ᵀʲ ∂_δ L₁(δ, θ)

where L₁ is the outer loss (CE on the batch with δ added to a ``portion`` of its images), Φ(δ, θ) = δ − η ∇_δ L₂
is one gradient step (η = ``inner_lr``) on the inner loss L₂ = −CE(f_θ(x + δ), y) + ``pert_reg``·‖δ‖², and v
comes from K fixed-point iterations (the paper's fixed-point / Neumann approximation of the inverse Hessian
product, as in its reference implementation). The hypergradient reaches :func:`latentguard.train.fit` as the
gradient of ``L₁ + ⟨Φ, v⟩ − ⟨Φ, v⟩.detach()`` (value L₁, gradient dH/dθ), so the outer update is the usual
optimiser step of the one training loop. Deviation from the reference: L₂ is evaluated on the current batch
(the reference uses its first batch for every step). BatchNorm statistics stay frozen (the reference runs the
model in eval mode throughout). Attention layers run the math SDPA kernel inside the hypergradient (the fused
kernels have no double backward), so transformers work too.

Defaults (reference implementation YiZeng623/I-BAU, ``defense.py`` and ``hypergrad.py``; BackdoorBench uses
the same n_rounds and K): outer Adam lr 1e-3, batch 100, ``n_rounds`` 5, K 5, inner fixed-point step 0.1,
δ optimised by SGD lr 10 with regulariser 1e-3·‖δ‖², L2 bound 10 (the paper's C_δ in the reference's
notebooks), ``portion`` 0.01 of each batch perturbed in the outer loss (at least one image). No CPU reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentguard.data import Images
from latentguard.defenses.base import Defense, DefenseResult, register_defense
from latentguard.defenses.params import check, is_int, is_real
from latentguard.inference import eval_mode
from latentguard.train import TrainConfig, fit


@dataclass
class IBAUParams:
    n_rounds: int = 5  # rounds of (maximise δ, unlearn one pass)
    fixed_point_steps: int = 5  # K
    lr: float = 1e-3  # outer Adam learning rate
    batch_size: int = 100
    inner_lr: float = 0.1  # step of the fixed-point map Φ
    pert_lr: float = 10.0  # SGD learning rate of the δ maximisation
    pert_reg: float = 1e-3  # weight of ‖δ‖² in the inner objective
    norm_bound: float = 10.0  # L2 radius C_δ of the universal perturbation
    portion: float = 0.01  # share of each outer batch carrying δ (at least one image)

    def __post_init__(self) -> None:
        for name in ("n_rounds", "fixed_point_steps", "batch_size"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, "ibau", name, "an integer >= 1", v)
        for name in ("lr", "inner_lr", "pert_lr", "norm_bound"):
            v = getattr(self, name)
            check(is_real(v) and v > 0, "ibau", name, "a positive number", v)
        check(is_real(self.pert_reg) and self.pert_reg >= 0, "ibau", "pert_reg", "a number >= 0", self.pert_reg)
        check(is_real(self.portion) and 0 < self.portion <= 1, "ibau", "portion", "in (0, 1]", self.portion)


def maximise_perturbation(model: nn.Module, x: torch.Tensor, p: IBAUParams, device: torch.device,
                          generator: torch.Generator) -> torch.Tensor:
    """One SGD pass over ``x`` for the universal δ (1×C×H×W) that most changes the model's own predictions,
    projected on the L2 ball of radius ``norm_bound``. The model's parameters get no gradient."""
    delta = torch.zeros(1, *x.shape[1:], device=device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=p.pert_lr)
    order = torch.randperm(x.shape[0], generator=generator)
    for s in range(0, x.shape[0], p.batch_size):
        xb = x[order[s:s + p.batch_size]].to(device)
        with torch.no_grad():
            own = model(xb).argmax(1)
        loss = -F.cross_entropy(model(xb + delta), own) + p.pert_reg * delta.pow(2).sum()
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
    with torch.no_grad():
        norm = float(delta.norm())
        if norm > p.norm_bound:
            delta.mul_(p.norm_bound / norm)
    return delta.detach()


def hypergradient_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, p: IBAUParams,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate loss, logits): the surrogate's value is the outer loss L₁ and its gradient w.r.t. the
    model parameters is I-BAU's implicit hypergradient (see the module docstring)."""
    d = delta.detach().requires_grad_(True)
    n = x.shape[0]
    k = max(1, int(n * p.portion))
    carried = torch.zeros(n, 1, 1, 1, device=x.device)
    carried[torch.randperm(n, generator=generator)[:k].to(x.device)] = 1.0
    # second-order terms: attention must use the math kernel (the fused ones have no double backward)
    with sdpa_kernel([SDPBackend.MATH]):
        logits = model(x + carried * d)
        outer = F.cross_entropy(logits, y)
        # fixed-point map Φ(δ, θ) = δ − η ∇_δ L₂(δ, θ), differentiable in δ and θ
        inner = -F.cross_entropy(model(x + d), y) + p.pert_reg * d.pow(2).sum()
    (g_inner,) = torch.autograd.grad(inner, [d], create_graph=True)
    phi = d - p.inner_lr * g_inner
    (g_outer_d,) = torch.autograd.grad(outer, [d], retain_graph=True)
    v = torch.zeros_like(d)
    for _ in range(p.fixed_point_steps):
        (jv,) = torch.autograd.grad(phi, [d], grad_outputs=v, retain_graph=True)
        v_next = jv + g_outer_d
        converged = float((v_next - v).norm()) < 1e-10
        v = v_next
        if converged:
            break
    coupling = (phi * v.detach()).sum()
    surrogate = outer + (coupling - coupling.detach())
    return surrogate, logits


@register_defense
class IBAU(Defense):
    """Minimax unlearning of a universal adversarial perturbation with the implicit hypergradient."""

    name = "ibau"
    kind = "removal"
    Params = IBAUParams

    def _run(self, model: nn.Module, clean: Images, device: torch.device, seed: int) -> DefenseResult:
        p = self.params
        x, _ = clean.tensors()
        gen = torch.Generator().manual_seed(seed)
        model.eval()
        state = {"delta": maximise_perturbation(model, x, p, device, gen)}
        norms = [float(state["delta"].norm())]

        def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            return hypergradient_loss(m, xb, yb, state["delta"], p, gen)

        def epoch_hook(epoch: int, m: nn.Module) -> None:
            if epoch + 1 < p.n_rounds:  # the δ of the next round
                with eval_mode(m):
                    state["delta"] = maximise_perturbation(m, x, p, device, gen)
                norms.append(float(state["delta"].norm()))

        cfg = TrainConfig(epochs=p.n_rounds, batch_size=p.batch_size, lr=p.lr, optimizer="adam",
                          weight_decay=0.0, schedule="constant", augment=False, freeze_bn=True, seed=seed)
        history = fit(model, clean, cfg, device=device, loss_fn=loss_fn, epoch_hook=epoch_hook)
        return self._result(model, extra={"perturbation_l2": norms, "history": history.to_dict()})
