"""Pruning methods: which weights or channels to remove, and proof that every rank agrees.

Knows nothing of jobs or configs (as :mod:`dtrain.comm` knows nothing of models): it takes
modules and tensors and returns masks, schedules and measurements.

- :mod:`~dtrain.pruning.unstructured`: magnitude masks, layer-wise or global (the same masks as
  ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` on the same weights).
- :mod:`~dtrain.pruning.schedule`: Zhu & Gupta's cubic sparsity schedule, prune → fine-tune
  rounds.
- :mod:`~dtrain.pruning.masks`: :class:`MaskSet`, the masks kept through training (weights and
  optimizer state zero after every step), saved as plain tensors.
- :mod:`~dtrain.pruning.agree`: a digest of each mask compared across ranks with an all-reduce;
  all-reduced scores for data-dependent criteria.
- :mod:`~dtrain.pruning.structured`: channel plans on Torch-Pruning's dependency graph (all,
  stage-level or inside-block groups), their removal, the zeroed-channel check, rebuilding from
  the pruning history, where each remaining entry was.
- :mod:`~dtrain.pruning.apoz`: the average percentage of zeros after each ReLU.
- :mod:`~dtrain.pruning.recalibrate`: batch-norm statistics re-estimated after a removal.
- :mod:`~dtrain.pruning.measure`: parameters, MACs (PyTorch's flop counter), CPU latency.
"""

from dtrain.pruning.agree import Disagreement, digest, verify_identical
from dtrain.pruning.masks import MaskSet
from dtrain.pruning.schedule import cubic_sparsity, round_sparsity
from dtrain.pruning.unstructured import PRUNABLE, magnitude_masks, prunable_weights

__all__ = [
    "PRUNABLE",
    "Disagreement",
    "MaskSet",
    "cubic_sparsity",
    "digest",
    "magnitude_masks",
    "prunable_weights",
    "round_sparsity",
    "verify_identical",
]
