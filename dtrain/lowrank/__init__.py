"""Low-rank factorisation: truncated SVD of Linear layers and 1x1 convolutions into two smaller
layers; knows nothing of jobs (as :mod:`dtrain.comm` knows nothing of models)."""

from dtrain.lowrank.svd import (
    Factorized,
    LayerPlan,
    apply_ranks,
    choose_rank,
    eligible_layers,
    factorize,
    factorize_layer,
    factorize_weight,
    saves_parameters,
)

__all__ = [
    "Factorized",
    "LayerPlan",
    "apply_ranks",
    "choose_rank",
    "eligible_layers",
    "factorize",
    "factorize_layer",
    "factorize_weight",
    "saves_parameters",
]
