"""Segmentation (SAT's Dice + BCE over valid queries) and distillation losses.

Logits and targets are (B, N, *spatial); ``query_mask`` (B, N) marks the real (non-padding) queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    mask = query_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """SAT's Dice: ``1 − (2Σpy + 1e-7)/(Σp² + Σy² + 1e-7)`` per (sample, query), mean over valid queries."""
    p = torch.sigmoid(logits.float()).flatten(2)
    y = target.float().flatten(2)
    dice = (2 * (p * y).sum(-1) + 1e-7) / (p.square().sum(-1) + y.square().sum(-1) + 1e-7)
    return _masked_mean(1 - dice, query_mask)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Voxel-mean binary cross-entropy per (sample, query), mean over valid queries."""
    per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return _masked_mean(per_voxel.flatten(2).mean(-1), query_mask)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, query_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    dice, bce = soft_dice_loss(logits, target, query_mask), bce_loss(logits, target, query_mask)
    return dice + bce, {"dice_loss": dice.detach(), "bce_loss": bce.detach()}


def deep_supervision_loss(
    logits: Sequence[torch.Tensor], target: torch.Tensor, query_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weights ∝ 1, ½, ¼, … (normalised) against nearest-downsampled targets; logs the full-resolution terms."""
    weights = torch.tensor([0.5**i for i in range(len(logits))])
    weights = weights / weights.sum()
    total, logs = None, {}
    for i, (w, out) in enumerate(zip(weights, logits)):
        y = target if out.shape[2:] == target.shape[2:] else F.interpolate(target.float(), size=out.shape[2:], mode="nearest")
        loss, parts = segmentation_loss(out, y, query_mask)
        total = w * loss if total is None else total + w * loss
        if i == 0:
            logs = parts
    assert total is not None
    return total, logs


def sigmoid_kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · mean KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))`` over valid queries and voxels (per-query distillation)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    log_ps, log_qs = F.logsigmoid(s), F.logsigmoid(-s)
    log_pt, log_qt = F.logsigmoid(t), F.logsigmoid(-t)
    kl = log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)
    return temperature**2 * _masked_mean(kl.flatten(2).mean(-1), query_mask)


def softmax_kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · mean_voxels KL(softmax_q(t/T) ‖ softmax_q(s/T))`` over each sample's valid queries."""
    invalid = ~query_mask.bool()
    shape = (*query_mask.shape, *([1] * (student.ndim - 2)))
    fill = torch.finfo(torch.float32).min
    s = (student.float() / temperature).masked_fill(invalid.view(shape), fill)
    t = (teacher.float() / temperature).masked_fill(invalid.view(shape), fill)
    log_s, log_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(invalid.view(shape), 0.0).sum(1)  # (B, *spatial)
    has_queries = query_mask.any(1).to(kl.dtype)
    per_sample = kl.flatten(1).mean(-1)
    return temperature**2 * (per_sample * has_queries).sum() / has_queries.sum().clamp_min(1.0)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, temperature: float = 1.0, mode: str = "sigmoid"
) -> torch.Tensor:
    if mode == "sigmoid":
        return sigmoid_kd_loss(student, teacher, query_mask, temperature)
    if mode == "softmax":
        return softmax_kd_loss(student, teacher, query_mask, temperature)
    raise ValueError(f"unknown distillation mode {mode!r}; expected 'sigmoid' or 'softmax'")


def hard_dice(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of the thresholded prediction per (sample, query): (B, N); both empty → 1."""
    pred = torch.sigmoid(logits.float()) > threshold
    ref = target > 0.5
    inter = (pred & ref).flatten(2).sum(-1).float()
    total = pred.flatten(2).sum(-1).float() + ref.flatten(2).sum(-1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1.0), torch.ones_like(total))
