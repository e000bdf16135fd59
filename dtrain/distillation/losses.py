"""Distillation losses, pure functions of tensors.

:func:`kd_loss` is Hinton et al. (2015): ``(1 − α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖
softmax(s/T))``, averaged over the examples (a language model's logits ``[B, L, V]``: over the
tokens). The T² keeps the soft term's gradients on the scale of the hard term's as T grows (the
soft targets' gradients shrink as 1/T²). :func:`feature_loss` is FitNets' hint loss: the mean
squared error between each adapted student feature and the teacher's, weighted and summed.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["feature_loss", "kd_loss", "soft_loss"]


def kd_loss(
    student: Tensor, teacher: Tensor, target: Tensor, *, temperature: float, alpha: float
) -> Tensor:
    """The logit distillation loss, a scalar.

    Args:
        student: the student's logits, ``[..., classes]`` (``[B, C]`` or ``[B, L, V]``).
        teacher: the teacher's logits, the same shape (no gradient flows into them).
        target: the labels, ``student.shape[:-1]``.
        temperature: T > 0; the soft targets are ``softmax(teacher / T)``.
        alpha: the weight of the soft term, in [0, 1] (0: plain cross-entropy; 1: only the
            teacher's soft targets).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} "
            f"differ in shape"
        )
    classes = student.shape[-1]
    s = student.reshape(-1, classes)
    loss = s.new_zeros(())
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(s.float(), target.reshape(-1))
    if alpha > 0.0:
        loss = loss + alpha * soft_loss(student, teacher, temperature=temperature)
    return loss


def soft_loss(student: Tensor, teacher: Tensor, *, temperature: float) -> Tensor:
    """The soft term of :func:`kd_loss` alone: ``T²·KL(softmax(t/T) ‖ softmax(s/T))``, the mean
    over examples (tokens); in float32 whatever the logits' precision."""
    classes = student.shape[-1]
    s = student.reshape(-1, classes).float()
    t = teacher.detach().reshape(-1, classes).float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return temperature**2 * kl


def feature_loss(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    pairs: list[tuple[str, str, float]],
    adapters: Mapping[str, nn.Module],
) -> Tensor:
    """Σ weight · MSE(adapter(student feature), teacher feature) over ``pairs`` of ``(student
    layer, teacher layer, weight)``; ``adapters[student layer]`` maps the student's feature to
    the teacher's shape (``nn.Identity`` where they already agree)."""
    total: Tensor | None = None
    for s_name, t_name, weight in pairs:
        mapped = adapters[s_name](student[s_name])
        target = teacher[t_name].detach()
        if mapped.shape != target.shape:
            raise ValueError(
                f"feature {s_name} adapted to {list(mapped.shape)}, teacher's {t_name} is "
                f"{list(target.shape)}"
            )
        term = weight * F.mse_loss(mapped.float(), target.float())
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
