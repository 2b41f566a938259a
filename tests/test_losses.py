"""Loss terms of the temporal models (pipeline/losses.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import box_l1, flow_epe, focal_loss, l1, occlusion_bce, weighted_total


def test_l1_and_shape_check():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert l1(a, b).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        l1(a, torch.zeros(3, 2))


def test_flow_epe_is_mean_vector_norm():
    pred = torch.zeros(2, 4, 2, 5, 6)  # [B,T,2,H,W]
    target = torch.zeros_like(pred)
    target[:, :, 0] = 3.0
    target[:, :, 1] = 4.0
    assert flow_epe(pred, target).item() == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="flows must be"):
        flow_epe(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))


def test_occlusion_bce_soft_targets():
    logits = torch.tensor([0.0, 2.0, -1.0])
    target = torch.tensor([0.5, 1.0, 0.2])
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert occlusion_bce(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_loss_matches_formula():
    logits = torch.tensor([2.0, -1.0, 0.3, -3.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(logits)
    p_t = torch.where(target == 1, p, 1 - p)
    a_t = torch.where(target == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    expected = (-a_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    assert focal_loss(logits, target, alpha=alpha, gamma=gamma).item() == pytest.approx(expected.item(), rel=1e-5)
    # gamma 0, alpha 0.5 is half the plain BCE
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert focal_loss(logits, target, alpha=0.5, gamma=0.0).item() == pytest.approx(0.5 * bce.item(), rel=1e-5)
    # confident correct predictions are down-weighted far more than wrong ones
    easy = focal_loss(torch.tensor([4.0]), torch.tensor([1.0]), alpha=alpha, gamma=gamma)
    hard = focal_loss(torch.tensor([-4.0]), torch.tensor([1.0]), alpha=alpha, gamma=gamma)
    assert hard > 1000 * easy
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, target, alpha=1.5, gamma=2.0)


def test_box_l1_ignores_hidden_objects():
    target = torch.rand(2, 3, 4)  # [B,K,4]
    pred = target.clone()
    pred[:, 2] += 10.0  # object 2 is out of view: its error must not count
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert box_l1(pred, target, mask).item() == pytest.approx(0.0)
    pred[0, 0, 0] += 0.8
    assert box_l1(pred, target, mask).item() == pytest.approx(0.8 / 16, rel=1e-5)
    assert box_l1(pred, target, torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        box_l1(pred, target, torch.ones(2, 4))


def test_weighted_total_uses_every_weight():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    assert weighted_total(terms, {"a": 0.5, "b": 2.0}).item() == pytest.approx(7.0)
    with pytest.raises(KeyError, match="b"):
        weighted_total(terms, {"a": 1.0})
    assert math.isclose(weighted_total({"a": torch.tensor(1.0)}, {"a": 0.0}).item(), 0.0)
