"""Knowledge distillation methods: the losses and the feature taps; knows nothing of jobs.

- :mod:`~dtrain.distillation.losses`: Hinton et al.'s logit distillation loss (per example or per
  token), FitNets-style feature matching.
- :mod:`~dtrain.distillation.features`: intermediate outputs captured by name with forward hooks,
  the adapters that map a student's features to the teacher's shape.
"""

from dtrain.distillation.features import FeatureTaps, closest_name, make_adapter
from dtrain.distillation.losses import feature_loss, kd_loss, soft_loss

__all__ = [
    "FeatureTaps",
    "closest_name",
    "feature_loss",
    "kd_loss",
    "make_adapter",
    "soft_loss",
]
