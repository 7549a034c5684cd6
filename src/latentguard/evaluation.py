"""ACC / ASR / RA of a model against a clean test set and, optionally, an attack."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from latentguard import metrics
from latentguard.inference import predict


@dataclass
class Evaluation:
    acc: float
    asr: float | None = None
    ra: float | None = None
    n_clean: int = 0
    n_backdoor: int = 0
    class_acc: list[float | None] | None = None  # ACC per true class of the clean test set

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: nn.Module,
    test,
    attack=None,
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 512,
    backdoor_set: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Evaluation:
    """Evaluate ``model`` on the clean ``test`` Images and, with an attack, on its backdoor test set.

    ``backdoor_set`` (triggered images, attack labels, true labels) may be passed to avoid re-triggering the
    test set when many models are evaluated against one attack.
    """
    x, y = test.tensors()
    pred = predict(model, x, device=device, batch_size=batch_size)
    result = Evaluation(acc=metrics.accuracy(pred, y), n_clean=len(y),
                        class_acc=metrics.per_class_accuracy(pred, y, test.num_classes))
    if attack is not None or backdoor_set is not None:
        xb, y_attack, y_true = backdoor_set if backdoor_set is not None else attack.get_backdoor_test_set(test)
        pb = predict(model, xb, device=device, batch_size=batch_size)
        result.asr = metrics.attack_success_rate(pb, y_attack)
        result.ra = metrics.robust_accuracy(pb, y_true)
        result.n_backdoor = len(y_true)
    return result
