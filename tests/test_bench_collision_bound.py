"""bench/bench_collision_bound.py: its track features, gap rule and AP intervals on hand-made boxes."""
import numpy as np
import pytest

from bench.bench_collision_bound import HISTORY, ap_interval, gap_rule, pair_features


def approaching_boxes(frames: int = 10, meet: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Two 0.1-wide boxes closing 0.05 per frame that touch at frame `meet`; a third far away and still."""
    boxes = np.zeros((1, frames, 3, 4), np.float32)
    t = np.arange(frames)
    for k, x in enumerate([0.5 - 0.1 - 0.025 * (meet - t), 0.5 + 0.025 * (meet - t)]):  # left edges
        boxes[0, :, k] = np.stack([x, np.full(frames, 0.4), x + 0.1, np.full(frames, 0.5)], -1)
    boxes[0, :, 2] = [0.0, 0.0, 0.05, 0.05]
    return boxes, np.ones((1, frames, 3), bool)


def test_pair_features_cover_every_pair_of_every_scored_frame():
    boxes, mask = approaching_boxes()
    feats, valid = pair_features(boxes, mask, HISTORY, with_frame_t=False)
    more, _ = pair_features(boxes, mask, HISTORY, with_frame_t=True)
    assert feats.shape[:3] == valid.shape == (1, 10 - HISTORY, 3) and more.shape[-1] == feats.shape[-1] + 3
    mask[0, 4, 1] = False  # object 1 unseen at frame 4: pairs with it are invalid for frames 5..7
    _, valid = pair_features(boxes, mask, HISTORY, with_frame_t=False)
    assert not valid[0, 5 - HISTORY:8 - HISTORY, 0].any() and valid[0, 8 - HISTORY:, 0].all()
    with pytest.raises(ValueError, match="history frames"):
        pair_features(boxes, mask, HISTORY - 1, with_frame_t=False)


def test_gap_rule_peaks_where_the_boxes_meet():
    boxes, mask = approaching_boxes(meet=6)
    scores = gap_rule(boxes, mask, HISTORY)[0]  # frames 3..9
    assert scores[6 - HISTORY] == pytest.approx(0.0, abs=1e-6)  # extrapolated gap 0 at the meeting frame
    assert np.all(np.diff(scores[:6 - HISTORY + 1]) > 0)  # the gap closes at constant speed up to it


def test_ap_interval_pairs_the_differences():
    labels = np.zeros((8, 5), bool)
    labels[:, 2] = True
    perfect, noise = labels.astype(float), np.random.default_rng(0).random(labels.shape)
    draws = np.random.default_rng(1).integers(0, 8, size=(200, 8))
    out = ap_interval({"perfect": perfect, "noise": noise}, labels, draws, 0.95, "noise")
    assert out["perfect"]["ap"] == out["perfect"]["ap_lo"] == out["perfect"]["ap_hi"] == 1.0
    diff = out["perfect"]["minus_noise"]
    assert diff["ap"] == pytest.approx(1.0 - out["noise"]["ap"], abs=1e-4) and 0 < diff["lo"] <= diff["ap"] <= diff["hi"]
    assert "minus_noise" not in out["noise"]
