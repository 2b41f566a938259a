"""Control (pipeline.control, pipeline.probes): motion transfer and leakage probes on hand-built models whose
appearance and motion parts are separable, or identical, by construction."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import Square, moving_squares
from pipeline.control import (ControlSettings, background_mask, leakage, not_applicable, pair_indices, probe_samples,
                              run_control, summarize_control)
from pipeline.flow import warp
from pipeline.flow.backends import DISBackend
from pipeline.models.temporal.base import unroll
from pipeline.probes import cell_features, cell_targets, explained_variance, fit_probe

T, H, W = 8, 32, 32
CONTEXT, HORIZON = 4, 3


class SeparableModel(nn.Module):
    """Appearance = the frame itself, motion = the backward flow itself (pixel grid): the next appearance is
    the last one warped by the last motion, the next motion is the last one. Neither part reads the other's
    source, so nothing leaks by construction."""

    context = 2

    def encode_appearance(self, frames):  # [B,T,3,H,W] -> [B,T,3,H,W]
        return frames

    def encode_motion(self, flow):  # [B,T-1,2,H,W] -> itself
        return flow

    def decode_motion(self, zf):
        return zf

    def step(self, z_win, zf_win):
        zf = zf_win[:, -1]
        return {"z": warp(z_win[:, -1], zf), "zf": zf}

    def rollout_from(self, z_ctx, zf_ctx, *, last_frame, horizon):
        out = unroll(self.step, [z_ctx, zf_ctx], ["z", "zf"], horizon)
        return {**out, "frames": out["z"].clamp(0, 1)}


class IdenticalModel(SeparableModel):
    """Both parts hold the same thing, frame and flow together: each is a full copy of the other."""

    def encode_appearance(self, frames):
        return torch.cat([frames, torch.zeros_like(frames[:, :, :2])], dim=2)  # [B,T,5,H,W]

    def encode_motion(self, flow):
        return torch.cat([torch.zeros_like(flow[:, :, :1]).expand(-1, -1, 3, -1, -1), flow], dim=2)

    def decode_motion(self, zf):
        return zf[:, :, 3:]

    def step(self, z_win, zf_win):
        flow = zf_win[:, -1, 3:]
        both = torch.cat([warp(z_win[:, -1, :3], flow), flow], dim=1)  # [B,5,H,W]
        return {"z": both, "zf": both}

    def rollout_from(self, z_ctx, zf_ctx, *, last_frame, horizon):
        out = unroll(self.step, [z_ctx, zf_ctx], ["z", "zf"], horizon)
        return {**out, "frames": out["z"][:, :, :3].clamp(0, 1)}


def _items(scenes: dict) -> list[dict]:
    """moving_squares arrays -> ClipDataset-like items of whole videos."""
    return [{"frames": torch.from_numpy(scenes["video"][n]).permute(0, 3, 1, 2).float() / 255.0,
             "flow_bwd": torch.from_numpy(scenes["bwd"][n]), "boxes": torch.from_numpy(scenes["boxes"][n]),
             "box_mask": torch.from_numpy(scenes["box_mask"][n]).float(), "video_index": torch.tensor(n)}
            for n in range(len(scenes["video"]))]


def _windows(items: list[dict], length: int) -> list[dict]:
    """Every `length`-frame window of each video, one batch per video."""
    return [{"frames": torch.stack([it["frames"][t:t + length] for t in range(T - length + 1)]),
             "flow_bwd": torch.stack([it["flow_bwd"][t:t + length - 1] for t in range(T - length + 1)])}
            for it in items]


def _probe_data(seed: int, videos: int = 6) -> list[dict]:
    # squares and background from one texture range: where a square is says nothing about how it moves
    scenes = moving_squares(videos, T, H, W, count=2, size=8, seed=seed, foreground=(0.25, 0.75))
    return _windows(_items(scenes), SeparableModel.context + 1)


def _settings(**kw) -> ControlSettings:
    base = dict(split="test", context=CONTEXT, horizon=HORIZON, pairs=4, constant_flow=(1.0, 0.0), probe_videos=4,
                probe_ridge=1e-3, chroma=0.1, figures=1, bootstrap=200, confidence=0.95, seed=0)
    return ControlSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def transfer_videos() -> list[dict]:
    """Four videos, each one large square sliding over a static background; B = the next video's square moves
    (1, 0) or (0, 1) px per frame."""
    squares = [[Square((4, 2), (1, 0), 20)], [Square((2, 4), (0, 1), 20)], [Square((5, 3), (1, 0), 20)],
               [Square((3, 5), (0, 1), 20)]]
    return _items(moving_squares(4, T, H, W, squares=squares, seed=3))


@pytest.fixture(scope="module")
def dis():
    return DISBackend(torch.device("cpu"), preset="medium", scale=2)


def test_separable_model_transfers_b_motion_and_keeps_a_colours(transfer_videos, dis):
    report, figures = run_control(SeparableModel(), videos=transfer_videos, train_windows=_probe_data(0),
                                  test_windows=_probe_data(1), flow_fn=dis, settings=_settings())
    m = report["methods"]
    # the generated video moves as B does: far below doing nothing, near B's own frames
    assert m["transfer"]["epe_moving"]["mean"] < 0.4 * m["zero_flow"]["epe_moving"]["mean"], m
    assert m["transfer"]["epe_moving"]["mean"] < m["copy_b"]["epe_moving"]["mean"] + 0.3, m
    assert m["zero_flow"]["epe_moving"]["mean"] == pytest.approx(1.0, abs=1e-6)  # |v| = 1 px on B's moving pixels
    # the ideal dense transfer (A warped by exactly B's flows) is the floor: this model is near it
    assert m["warp_b"]["epe_moving"]["mean"] <= m["transfer"]["epe_moving"]["mean"] + 0.1, m
    # the model's own motion is B's last flow: exact where the square still is
    assert m["transfer"]["model_motion_epe"]["mean"] < m["zero_flow"]["epe"]["mean"]
    # it keeps A's colours (b_share near 0), B's own frames have B's (b_share 1)
    assert m["transfer"]["b_share"]["mean"] < 0.5 < m["copy_b"]["b_share"]["mean"], m
    assert m["copy_b"]["b_share"]["mean"] == pytest.approx(1.0)
    assert set(figures) >= {"a", "b", "transfer", "still", "constant", "ids"}
    assert figures["transfer"].shape == (4, HORIZON, 3, H, W)
    assert figures["ids"] == [(0, 1), (1, 2), (2, 3), (3, 0)]


def test_constant_flow_animates_the_still(transfer_videos, dis):
    report, _ = run_control(SeparableModel(), videos=transfer_videos, train_windows=_probe_data(0),
                            test_windows=_probe_data(1), flow_fn=dis, settings=_settings(constant_flow=(1.0, 0.0)))
    m = report["methods"]
    assert m["constant"]["model_motion_epe"]["mean"] == pytest.approx(0.0, abs=1e-6)  # it was asked for exactly -v
    assert m["constant"]["epe"]["mean"] < 0.5 * m["zero_flow_constant"]["epe"]["mean"], m


def test_probes_find_no_leakage_in_separable_parts():
    model = SeparableModel()
    result = leakage(probe_samples(model, _probe_data(0)), probe_samples(model, _probe_data(1)), ridge=1e-3)
    for source in ("input", "predicted"):
        assert result[source]["flow_from_appearance"] < 0.1, result
        assert result[source]["colour_from_motion"] < 0.1, result
        assert result[source]["flow_from_motion"] > 0.3, result  # each part carries its own quantity
        assert result[source]["colour_from_appearance"] > 0.8, result


def test_probes_find_leakage_in_identical_parts():
    model = IdenticalModel()
    result = leakage(probe_samples(model, _probe_data(0)), probe_samples(model, _probe_data(1)), ridge=1e-3)
    assert result["predicted"]["flow_from_appearance"] > 0.3, result
    assert result["predicted"]["colour_from_motion"] > 0.8, result
    # the inputs are encoded apart (zeros in the other's channels): no leakage there
    assert result["input"]["flow_from_appearance"] < 0.1 and result["input"]["colour_from_motion"] < 0.1, result


def test_probe_recovers_a_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(2000, 5, generator=g), torch.randn(500, 5, generator=g)
    A = torch.randn(5, 2, generator=g)
    probe = fit_probe(x, x @ A + 3.0, ridge=1e-6)
    assert explained_variance(x_test @ A + 3.0, probe(x_test)) == pytest.approx(1.0, abs=1e-6)
    unrelated = fit_probe(x, torch.randn(2000, 2, generator=g), ridge=1e-3)
    assert abs(explained_variance(torch.randn(500, 2, generator=g), unrelated(x_test))) < 0.05
    with pytest.raises(ValueError, match="constant"):
        explained_variance(torch.ones(4, 2), torch.zeros(4, 2))


def test_cell_rows_follow_the_latent_grid():
    z = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rows = cell_features(z, neighbourhood=1)
    assert rows.shape == (2 * 16, 3) and torch.equal(rows[5], z[0, :, 1, 1])
    assert cell_features(z).shape == (32, 27)
    field = torch.ones(2, 2, 8, 8)
    field[:, :, :2, :2] = 5.0
    t = cell_targets(field, (4, 4))
    assert t.shape == (32, 2) and t[0].tolist() == [5.0, 5.0] and t[1].tolist() == [1.0, 1.0]


def test_background_mask_leaves_out_both_videos_boxes():
    boxes_a = torch.tensor([[[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]]])  # [1,2,4]
    mask_a = torch.tensor([[1.0, 0.0]])  # the second box is not in view
    boxes_b = torch.tensor([[[[0.75, 0.0, 1.0, 0.25]]]])  # [1,1,1,4]
    bg = background_mask(boxes_a, mask_a, boxes_b, torch.ones(1, 1, 1), (16, 16), margin=0)
    assert bg.shape == (1, 16, 16)
    assert not bg[0, :4, :4].any() and not bg[0, :4, 12:].any() and bg[0, 8:, 8:].all()


def test_pairs_and_summary():
    assert pair_indices(5, 3) == [(0, 1), (1, 2), (2, 0)]
    with pytest.raises(ValueError, match="at least 2"):
        pair_indices(1, 4)
    s = summarize_control({"m": {"x": np.array([1.0, np.nan, 3.0]), "y": np.array([np.nan])}}, resamples=200,
                          level=0.9, seed=0)
    assert s["m"]["x"]["mean"] == 2.0 and s["m"]["x"]["n"] == 2 and s["m"]["y"] is None


def test_other_archs_get_a_report_saying_control_does_not_apply():
    report = not_applicable("warp_occ")
    assert report["applies"] is False and "dual_vae" in report["reason"]


def test_the_same_inputs_give_the_same_report(transfer_videos, dis):
    """The control report is a pure function of its inputs (DVC caches it): two runs, identical JSON."""
    import json

    runs = [run_control(SeparableModel(), videos=transfer_videos, train_windows=_probe_data(0),
                        test_windows=_probe_data(1), flow_fn=dis, settings=_settings())[0] for _ in range(2)]
    assert json.dumps(runs[0], sort_keys=True) == json.dumps(runs[1], sort_keys=True)
