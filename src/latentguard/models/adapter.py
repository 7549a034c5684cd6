"""The any-model adapter: the latent representation of a classifier is the input of its final nn.Linear.

:func:`split_model` finds that head with one probe pass (forward hooks on every ``nn.Linear``), checks that the
logits really are ``head(z)``, and returns a :class:`FeatureModel` that captures ``z`` with a forward pre-hook,
so the user's model code is never edited.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from latentguard.device import module_device, resolve_device
from latentguard.errors import ModelError
from latentguard.inference import eval_mode


def named_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` (as in ``model.named_modules()``); ModelError listing valid names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if isinstance(name, str) and name in modules:
        return modules[name]
    names = list(modules)
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    shown = close or names[:8]
    more = "" if close or len(names) <= 8 else f" (+{len(names) - 8} more)"
    raise ModelError(f"the model has no layer {name!r}: use one of {', '.join(shown) or '(none)'}{more}")


def _as_logits(out: object, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"the model must return a logits tensor of shape N×classes but returned {shape}: "
            "wrap it so forward() returns only the logits"
        )
    return out


class FeatureModel(nn.Module):
    """Wraps any classifier; ``features(x)`` = z = input of the head; ``head`` = the final nn.Linear.

    ``forward`` is the wrapped model unchanged; ``features``/``features_and_logits`` capture the head's input
    with a forward pre-hook (flattened to N×d) and keep it in the autograd graph.
    """

    model: nn.Module
    head_name: str
    latent_dim: int
    num_classes: int

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        head = named_layer(model, head_name)
        if not isinstance(head, nn.Linear):
            raise ModelError(
                f"layer {head_name!r} is a {type(head).__name__}, not nn.Linear: pass the name of the output nn.Linear as --head"
            )
        self.model = model
        self.head_name = head_name
        self.latent_dim = int(head.in_features)
        self.num_classes = int(head.out_features)

    @property
    def head(self) -> nn.Linear:
        """The output layer (looked up in ``model`` so it is never registered twice in the state_dict)."""
        return self.model.get_submodule(self.head_name)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> None:
            captured.append(args[0])

        handle = self.head.register_forward_pre_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise ModelError(
                f"the head {self.head_name!r} did not run during the forward pass: pass the output nn.Linear as --head"
            )
        z = captured[-1]
        return z.reshape(z.shape[0], -1), logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def extra_repr(self) -> str:
        return f"head={self.head_name!r}, latent_dim={self.latent_dim}, num_classes={self.num_classes}"


def _probe(
    model: nn.Module, example_input: torch.Tensor
) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass recording the order in which nn.Linear layers ran and each one's (last) input."""
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            order.append(name)
            inputs[name] = args[0].detach()

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(example_input.to(module_device(model)))
    finally:
        for h in handles:
            h.remove()
    return order, inputs, out


def split_model(model: nn.Module, *, head: str | None = None, example_input: torch.Tensor) -> FeatureModel:
    """Wrap ``model`` as a :class:`FeatureModel` after finding and checking its head with one probe pass.

    The head is the last ``nn.Linear`` executed on ``example_input`` (a couple of samples suffice), or the layer
    named ``head``. The probe runs in eval mode without gradients; the model's state is left unchanged.
    """
    if isinstance(model, FeatureModel):
        model = model.model
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"expected a torch.nn.Module, got {type(model).__name__}: pass the classifier itself"
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
        raise ModelError(
            "example_input must be a batch tensor N×C×H×W with N ≥ 1: pass a couple of real images"
        )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            "the model has no nn.Linear layer, so it has no latent space: make its output layer an nn.Linear"
        )
    if head is not None:
        module = named_layer(model, head)
        if not isinstance(module, nn.Linear):
            raise ModelError(
                f"layer {head!r} is a {type(module).__name__}, not nn.Linear: pass one of {', '.join(linears[-5:])} as --head"
            )
    try:
        order, inputs, out = _probe(model, example_input)
    except ModelError:
        raise
    except Exception as exc:  # user model code: report its failure as a fixable error
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"the probe forward pass failed ({type(exc).__name__}: {msg}): check in_channels/image_size match the model"
        ) from exc
    logits = _as_logits(out, example_input.shape[0])
    if head is None:
        if not order:
            raise ModelError(
                "no nn.Linear ran during the forward pass: make the output layer an nn.Linear or pass --head NAME"
            )
        head = order[-1]
        hint = "the last nn.Linear is not the output layer: pass --head NAME"
    else:
        if head not in inputs:
            raise ModelError(
                f"layer {head!r} did not run during the forward pass: pass the output nn.Linear as --head"
            )
        hint = f"layer {head!r} is not the output layer (logits != {head}(z)): pass the right --head NAME"
    linear = named_layer(model, head)
    z = inputs[head]
    z = z.reshape(z.shape[0], -1)
    if (
        z.shape[0] != logits.shape[0]
        or z.shape[1] != linear.in_features
        or logits.shape[1] != linear.out_features
    ):
        raise ModelError(
            f"{hint} ({head!r} maps {linear.in_features}→{linear.out_features} but the logits have shape {tuple(logits.shape)})"
        )
    with torch.no_grad():
        recomputed = linear(z)
    tol = 1e-4 * (1.0 + float(logits.detach().abs().max()))
    if not torch.allclose(recomputed.float(), logits.detach().float(), rtol=1e-4, atol=tol):
        raise ModelError(hint)
    return FeatureModel(model, head)


@torch.no_grad()
def extract_features(
    fm: FeatureModel, x: torch.Tensor, *, batch_size: int = 256, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``z`` (N×d) and logits (N×classes) for images ``x``, batched, in eval mode, as CPU tensors.

    ``device`` None keeps the model where it is; otherwise the model is moved there (in place).
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be positive, got {batch_size}")
    if device is not None:
        fm.to(resolve_device(device))
    dev = module_device(fm)
    zs, ls = [], []
    with eval_mode(fm):
        for start in range(0, x.shape[0], batch_size):
            z, logits = fm.features_and_logits(x[start : start + batch_size].to(dev))
            zs.append(z.detach().float().cpu())
            ls.append(logits.detach().float().cpu())
    if not zs:
        return torch.zeros(0, fm.latent_dim), torch.zeros(0, fm.num_classes)
    return torch.cat(zs), torch.cat(ls)
