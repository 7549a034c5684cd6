"""Pure latent-space math: the TAC flip QP and outlier statistics."""

from latentguard.latent.alignment import class_mean_latents, flip_alignment, orthogonal_flip_perturbations
from latentguard.latent.outliers import anomaly_index, flag_low_outliers
from latentguard.latent.qp import (
    FlipSolution,
    PairwiseFlipSolution,
    constraint_system,
    kkt_residual,
    minimal_flip_perturbations,
    pairwise_flip_perturbations,
)

__all__ = [
    "FlipSolution",
    "PairwiseFlipSolution",
    "anomaly_index",
    "class_mean_latents",
    "constraint_system",
    "flag_low_outliers",
    "flip_alignment",
    "kkt_residual",
    "minimal_flip_perturbations",
    "orthogonal_flip_perturbations",
    "pairwise_flip_perturbations",
]
