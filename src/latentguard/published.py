"""Published reference figures shown beside ours in the zoo and benchmark tables (data only, no logic).

BackdoorBench, CIFAR-10, PreAct-ResNet18 (width 64, 100 epochs), 10 % poisoning, all-to-one with target 0;
post-training defenses with 5 % clean data. Values are (clean ACC %, ASR %) as printed on BackdoorBench's public
CIFAR-10 leaderboard (tab "Poisoning Ratio=10%", rows PreAct-ResNet18), which repeats the v1 paper's evaluations
(Wu et al., NeurIPS 2022 Datasets and Benchmarks, arXiv 2206.12654); the TrojanNN column appears only in the
later leaderboard. Cells the leaderboard leaves empty (CLP and I-BAU on BadNets, FP on TrojanNN) are absent here;
FT-SAM, SAU, FST, ShrinkPad and STRIP have no column there.
"""

from __future__ import annotations

BACKDOORBENCH_SOURCE = ("BackdoorBench public CIFAR-10 leaderboard, 10 % poisoning, PreAct-ResNet18 "
                        "(v1 evaluations, arXiv 2206.12654)")

# attack -> (ACC %, ASR %) of the undefended model
BACKDOORBENCH_CIFAR10: dict[str, tuple[float, float]] = {
    "badnets": (91.3, 95.0),
    "blend": (93.5, 99.9),
    "sig": (84.5, 98.3),
    "wanet": (91.2, 89.7),
    "inputaware": (90.7, 98.3),
    "lf": (93.2, 99.3),
    "trojannn": (93.4, 100.0),
}

# defense -> attack -> (ACC %, ASR %) after the defense
BACKDOORBENCH_CIFAR10_DEFENSES: dict[str, dict[str, tuple[float, float]]] = {
    "ft": {"badnets": (89.96, 1.48), "blend": (92.78, 96.11), "sig": (90.8, 2.37), "lf": (92.37, 78.44),
           "wanet": (93.48, 17.1), "inputaware": (93.12, 1.72), "trojannn": (92.42, 5.99)},
    "fp": {"badnets": (91.31, 57.13), "blend": (93.17, 99.26), "sig": (89.1, 26.2), "lf": (92.9, 98.97),
           "wanet": (91.46, 1.09), "inputaware": (91.74, 0.04)},
    "nad": {"badnets": (89.87, 2.14), "blend": (92.17, 97.69), "sig": (90.02, 10.66), "lf": (92.37, 47.83),
            "wanet": (93.17, 22.98), "inputaware": (93.18, 1.68), "trojannn": (91.88, 3.73)},
    "nc": {"badnets": (89.05, 1.27), "blend": (93.47, 99.92), "sig": (84.48, 98.27), "lf": (91.62, 1.41),
           "wanet": (91.8, 7.53), "inputaware": (92.61, 0.76), "trojannn": (91.76, 8.22)},
    "anp": {"badnets": (84.17, 0.73), "blend": (86.58, 2.19), "sig": (77.97, 0.01), "lf": (85.15, 0.6),
            "wanet": (85.73, 0.43), "inputaware": (90.36, 1.64), "trojannn": (86.87, 0.2)},
    "ibau": {"blend": (87.0, 50.53), "sig": (85.67, 3.68), "lf": (84.36, 44.96), "wanet": (89.49, 5.21),
             "inputaware": (89.17, 27.08), "trojannn": (90.37, 2.91)},
    "clp": {"blend": (91.32, 99.74), "sig": (83.8, 98.91), "lf": (92.84, 99.18), "wanet": (81.91, 78.42),
            "inputaware": (90.3, 2.17), "trojannn": (92.98, 100.0)},
}
