"""TAC detection wall time as a ratio to one forward pass over the clean reserve (goal ≤ 1.5×).

Both are measured side by side in one run, interleaved, best of ``--repeats``, on the same model and reserve.
Run: ``python benchmarks/tac_detection_speed.py --model ZOO_CELL_DIR --data SPEC [--reserve reserve_indices.json]``
or without arguments on a freshly initialised PreAct-ResNet18 (width 16) and 2,500 random CIFAR-sized images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from latentguard.data import Images, load_data
from latentguard.defenses.tac import SMOOTH_PROBE_SIGMA, detect
from latentguard.inference import predict_logits
from latentguard.latent import qp
from latentguard.models import build_model, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--reserve", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model:
        model = load_model(str(Path(args.model) / "model.json") if Path(args.model).is_dir() else args.model)
        train = load_data(args.data).train
        idx = json.loads(Path(args.reserve).read_text())["indices"] if args.reserve else np.arange(2500)
        reserve = train.subset(np.asarray(idx))
    else:
        model = build_model("preact_resnet18", 10, width=16).eval()
        rng = np.random.default_rng(0)
        reserve = Images(rng.integers(0, 256, (2500, 32, 32, 3), dtype=np.uint8), np.arange(2500) % 10,
                         [str(k) for k in range(10)])
    x, _ = reserve.tensors()
    # detection settings timed in the same interleaved run: no probe and no alignment, the default (white probe and
    # alignment), the default without the alignment (the previous default), both probes, and the default with the
    # pairwise QPs solved one at a time (the solver before the batched one)
    settings = {"no probe, no alignment": ({"noise_probe": 0.0, "smooth_probe": 0.0, "alignment": False}, True),
                "white probe and alignment (default)": ({}, True),
                "white probe, no alignment": ({"alignment": False}, True),
                "both probes and alignment": ({"smooth_probe": SMOOTH_PROBE_SIGMA}, True),
                "default, pairwise QPs one at a time": ({}, False)}
    batched_limit = qp._BATCHED_GRAM_ENTRIES
    fwd, det = [], {name: [] for name in settings}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predict_logits(model, x, device="cpu", batch_size=256)
        fwd.append(time.perf_counter() - t0)
        for name, (kwargs, batched) in settings.items():
            qp._BATCHED_GRAM_ENTRIES = batched_limit if batched else 0
            t0 = time.perf_counter()
            report = detect(model, reserve, device="cpu", **kwargs)
            det[name].append(time.perf_counter() - t0)
            if name == "white probe and alignment (default)":
                default_flags = report.target_classes
    qp._BATCHED_GRAM_ENTRIES = batched_limit
    print(f"reserve {len(reserve)} images; forward {min(fwd):.2f}s")
    for name in settings:
        print(f"  {name}: detection {min(det[name]):.2f}s, ratio {min(det[name]) / min(fwd):.2f}×")
    print(f"flagged with the default: {default_flags}")

if __name__ == "__main__":
    main()
