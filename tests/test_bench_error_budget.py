"""bench_error_budget's per-video split of the rollout error: regions, shares and the perfect-fill bound."""
import math

import pytest
import torch

from bench.bench_error_budget import error_budget, horizon_events
from pipeline.metrics import PSNR_MAX_DB


def test_error_budget_puts_each_error_in_its_region():
    truth = torch.full((2, 3, 4, 4), 0.5)  # [Hz,3,H,W]
    last = truth[0].clone()
    truth[:, :, 1, 1] = 0.9  # changed vs the last context frame: only pixel (1, 1)
    pred = truth.clone()
    pred[:, 0, 0, 0] += 0.4  # an error where the mask shows the fill
    pred[:, 0, 1, 1] -= 0.2  # an error on the changed pixel, where the mask trusts the warp
    mask_logit = torch.full((2, 1, 4, 4), 6.0)
    mask_logit[:, :, 0, 0] = -6.0
    out = error_budget(pred, truth, last, mask_logit, threshold=0.05)
    assert out["fill_pixels"] == pytest.approx(1 / 16) and out["changed_pixels"] == pytest.approx(1 / 16)
    assert out["fill_error_share"] == pytest.approx(0.16 / 0.20) and out["changed_error_share"] == pytest.approx(0.04 / 0.20)
    mse_model, mse_oracle = 0.20 / (3 * 16), 0.04 / (3 * 16)
    assert out["psnr"] == pytest.approx(-10 * math.log10(mse_model), abs=1e-4)
    assert out["psnr_last_step"] == pytest.approx(out["psnr"], abs=1e-4)
    assert out["oracle_fill_psnr"] == pytest.approx(-10 * math.log10(mse_oracle), abs=1e-4)


def test_error_budget_of_a_perfect_rollout_and_bad_shapes():
    truth = torch.rand(3, 3, 4, 4)
    out = error_budget(truth, truth, truth[0], torch.zeros(3, 1, 4, 4), threshold=0.05)
    assert out["psnr"] == pytest.approx(PSNR_MAX_DB) and out["fill_error_share"] == 0.0
    with pytest.raises(ValueError, match=r"\[Hz,1,H,W\]"):
        error_budget(truth, truth, truth[0], torch.zeros(3, 4, 4), threshold=0.05)


def test_horizon_events_see_collisions_and_objects_entering_after_the_context():
    collision = torch.zeros(1, 10)
    box_mask = torch.zeros(1, 10, 3)
    box_mask[0, :, 0] = 1  # in view throughout
    box_mask[0, 7:, 1] = 1  # enters at frame 7
    box_mask[0, 2:4, 2] = 1  # seen in the context, then leaves
    video = {"collision": collision, "box_mask": box_mask}
    assert horizon_events(video, context=4, horizon=6) == {"collision": False, "enters": True, "neither": False}
    assert horizon_events(video, context=4, horizon=2) == {"collision": False, "enters": False, "neither": True}
    collision[0, 5] = 1
    assert horizon_events(video, context=4, horizon=2) == {"collision": True, "enters": False, "neither": False}
    assert horizon_events(video, context=6, horizon=1)["collision"] is False
