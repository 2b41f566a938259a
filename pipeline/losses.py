"""Loss terms of the temporal models (DESIGN §6): L1, flow end-point error, occlusion BCE, focal, boxes.

Every function returns a scalar mean over its elements so that the weights in params `loss.*`
keep the same meaning whatever the batch, clip or image size. A leaf: imports no model (the models import it).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["l1", "epe_map", "end_point_error", "flow_epe", "occlusion_bce", "focal_loss", "box_l1", "weighted_total"]


def _same_shape(pred: Tensor, target: Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over every element."""
    _same_shape(pred, target, "l1")
    return (pred.float() - target.float()).abs().mean()


def epe_map(pred: Tensor, target: Tensor, *, eps: float = 0.0) -> Tensor:
    """Per-pixel end-point error |pred - target|_2 over the flow channel (dim 1): [B,2,...] -> [B,...].

    eps inside the square root keeps the gradient finite where pred == target (the training losses).
    """
    if pred.shape != target.shape or pred.ndim < 2 or pred.shape[1] != 2:
        raise ValueError(f"expected two flows [B,2,...] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred.float() - target.float()
    return torch.sqrt(diff.pow(2).sum(1) + eps)


def end_point_error(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean end-point error: mean over pixels of the L2 norm of the flow difference (channel dim 1).

    weight [B,...] (the flow shape without the channel dim): a weighted mean over pixels instead.
    """
    epe = epe_map(pred, target, eps=1e-12)  # [B,...]
    if weight is None:
        return epe.mean()
    if weight.shape != epe.shape:
        raise ValueError(f"expected weight of shape {tuple(epe.shape)} for flows {tuple(pred.shape)}, "
                         f"got {tuple(weight.shape)}")
    return (epe * weight).sum() / weight.sum()


def flow_epe(pred: Tensor, target: Tensor) -> Tensor:
    """Mean end-point error of flows [*,2,H,W] (pixels of their grid): mean over pixels of |pred - target|_2."""
    _same_shape(pred, target, "flow_epe")
    if pred.dim() < 3 or pred.shape[-3] != 2:
        raise ValueError(f"flow_epe: flows must be [*,2,H,W], got {tuple(pred.shape)}")
    return end_point_error(pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:]))


def occlusion_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of mask logits against a soft visibility target in [0,1] (mean)."""
    _same_shape(logits, target, "occlusion_bce")
    return F.binary_cross_entropy_with_logits(logits.float(), target.float().clamp(0.0, 1.0))


def focal_loss(logits: Tensor, target: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over elements; target in {0,1} (soft values allowed).

    FL = -alpha_t (1 - p_t)^gamma log p_t, alpha_t = alpha for positives, 1 - alpha for negatives.
    """
    _same_shape(logits, target, "focal_loss")
    if not 0.0 <= alpha <= 1.0 or gamma < 0:
        raise ValueError(f"focal_loss needs alpha in [0,1] and gamma >= 0, got alpha={alpha}, gamma={gamma}")
    logits, target = logits.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t).pow(gamma) * ce).mean()


def box_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 of boxes [*,K,4] over the objects in view (mask [*,K] = 1); 0 when none is in view."""
    _same_shape(pred, target, "box_l1")
    if mask.shape != pred.shape[:-1]:
        raise ValueError(f"box_l1: mask {tuple(mask.shape)} must be boxes' shape without the last dim "
                         f"{tuple(pred.shape[:-1])}")
    m = mask.float().unsqueeze(-1)  # [*,K,1]
    err = (pred.float() - target.float()).abs() * m
    return err.sum() / (4.0 * m.sum()).clamp_min(1.0)


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Sum of weights[name] * terms[name] over the named terms; every term needs a weight."""
    missing = [k for k in terms if k not in weights]
    if missing:
        raise KeyError(f"no loss weight for terms {missing}; weights given for {sorted(weights)}")
    total = None
    for name, value in terms.items():
        part = float(weights[name]) * value
        total = part if total is None else total + part
    if total is None:
        raise ValueError("weighted_total needs at least one term")
    return total
