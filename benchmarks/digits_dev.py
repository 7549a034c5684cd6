"""The digits development models the TAC studies choose their settings on (never the zoo's models).

small_cnn on the embedded digits data, 30 epochs, lr 0.05, batch 64, target 0, 10 % poisoning; each model (and its
attack's learned tensors) is kept in a cache directory so a study can be re-rendered or resumed without training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentguard.attacks import AttackContext, make_attack
from latentguard.models import build_model
from latentguard.train import TrainConfig, fit


def dev_model(splits, attack_name: str, seed: int, params: dict, cache: Path, *, stem: str | None = None,
              clean_model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, object]:
    """The trained (or cached) model and its attack (None for ``attack_name == "clean"``), in eval mode.

    ``stem`` names the cache files (default: the attack's name); ``clean_model`` is handed to attacks that optimise
    their trigger against a clean model (else they train one of their own).
    """
    h, w, c = splits.train.image_shape
    cfg = TrainConfig(epochs=30, lr=0.05, batch_size=64, seed=seed)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("small_cnn", 10, in_channels=c, image_size=h)

    attack = None
    if attack_name != "clean":
        attack = make_attack(attack_name, num_classes=10, image_shape=(c, h, w), target=0, rate=0.1, seed=seed,
                             params=params)
    model = fresh()
    stem = stem or attack_name
    path, attack_path = cache / f"{stem}_{seed}.pt", cache / f"{stem}_{seed}.attack.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        if attack is not None and attack_path.exists():
            attack.load_tensors(torch.load(attack_path, weights_only=True))
        return model.eval(), attack
    cache.mkdir(parents=True, exist_ok=True)
    if attack is None:
        fit(model, splits.train, cfg, device="cpu")
    else:
        attack.train_model(model, AttackContext(splits.train, fresh, cfg, torch.device("cpu"), clean_model=clean_model))
        torch.save(attack.tensors(), attack_path)
    torch.save(model.state_dict(), path)
    return model.eval(), attack
