"""Extract: decode, resize, stride, HDF5 schema, and bad inputs named and skipped."""
import dataclasses
import json
import re

import h5py
import numpy as np
import pytest

from helpers import override, tiny_params_dict, section
from pipeline.config import params_from_dict
from pipeline.data import layout
from pipeline.data.datasets import ClipDataset, FrameDataset
from pipeline.data.extract import MAX_OBJECTS, ExtractError, compose_strided, extract
from pipeline.data.video import encode_video


def moving_square_video(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.full((frames, height, width, 3), 40, np.uint8)
    colour = rng.integers(80, 255, 3)
    for t in range(frames):
        x = 4 + 3 * t
        video[t, 10:26, x:x + 16] = colour
    return video


def annotation(video_id: int, frames: int, collisions=(3,)) -> dict:
    return {
        "scene_index": video_id,
        "video_filename": f"video_{video_id:05d}.mp4",
        "object_property": [{"object_id": 0, "color": "red", "material": "rubber", "shape": "cube"},
                            {"object_id": 1, "color": "blue", "material": "metal", "shape": "sphere"}],
        "motion_trajectory": [
            {"frame_id": t, "objects": [{"object_id": i, "location": [0.1 * t, float(i), 0.2],
                                         "orientation": [0.0, 0.0, 0.0], "velocity": [0.1, 0.0, 0.0],
                                         "angular_velocity": [0.0, 0.0, 0.0], "inside_camera_view": True}
                                        for i in (0, 1)]}
            for t in range(frames)],
        "collision": [{"object_ids": [0, 1], "frame_id": f, "location": [0.0, 0.0, 0.0]} for f in collisions],
    }


def make_raw(root, params, frames=None):
    """A CLEVRER-layout raw dir with real mp4s and annotations (no synthetic ground truth)."""
    frames = frames or (params.data.frames - 1) * params.data.stride + 1
    for split, (clevrer_split, ids) in layout.split_ids(params.data.splits).items():
        for vid in ids:
            path = layout.video_path(root, clevrer_split, vid)
            path.parent.mkdir(parents=True, exist_ok=True)
            encode_video(path, moving_square_video(frames, seed=vid), fps=25)
            ann = layout.annotation_path(root, clevrer_split, vid)
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(json.dumps(annotation(vid, frames)))
    return root


@pytest.fixture
def clevrer_params():
    return params_from_dict(override(tiny_params_dict(), {"data": {"source": "clevrer", "max_bad_fraction": 0.5},
                                                       "flow": {"backend": "dis"}}))


@pytest.mark.parametrize("workers", [1, 2])
def test_extract_schema(tmp_path, clevrer_params, workers):
    raw = make_raw(tmp_path / "raw", clevrer_params)
    data = dataclasses.replace(clevrer_params.data, workers=workers)
    report = extract(raw, tmp_path / "frames.h5", data=data)
    assert report["videos"] == {"train": 4, "val": 1, "test": 2} and report["bad_videos"] == 0
    with h5py.File(tmp_path / "frames.h5") as f:
        assert f.attrs["source"] == "clevrer" and list(f.attrs["resolution"]) == [32, 32]
        train = f["train"]
        assert train["video"].shape == (4, 8, 32, 32, 3) and train["video"].dtype == np.uint8
        assert train["video"].chunks == (1, 1, 32, 32, 3)
        assert train["collision"].shape == (4, 8)
        assert train["collision"][0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
        assert train["boxes"].shape == (4, 8, MAX_OBJECTS, 4) and train["box_mask"][:].sum() == 0
        assert f["test"]["video_index"][:].tolist() == [10000, 10001]
        assert f["val"]["video_index"][:].tolist() == [4]
        # the square is bright on a dark background and moves right by 3 native px (1.5 px at 32 px)
        frame = train["video"][0, 0].astype(float)
        assert frame.max() > 80 and np.median(frame) < 60
    assert len(FrameDataset(tmp_path / "frames.h5", "train")) == 32
    clip = ClipDataset(tmp_path / "frames.h5", "test", 5)[0]
    assert clip["frames"].shape == (5, 3, 32, 32) and clip["frames"].max() <= 1.0


def test_stride_keeps_every_other_frame(tmp_path, clevrer_params):
    params = params_from_dict(override(tiny_params_dict(), {"data": {"source": "clevrer", "stride": 2},
                                                         "flow": {"backend": "dis"}}))
    raw = make_raw(tmp_path / "raw", params)
    extract(raw, tmp_path / "frames.h5", data=params.data)
    with h5py.File(tmp_path / "frames.h5") as f:
        # collision at native frame 3 -> first kept frame at or after it is native 4 = index 2
        assert f["train"]["collision"][0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
        assert f.attrs["stride"] == 2


@pytest.mark.parametrize("damage, message", [
    ("zero", "empty"),
    ("truncate", "corrupt or truncated|no decodable frames"),
    ("garbage", "corrupt or truncated|no decodable frames|no video stream"),
    ("short", "has 4 frames, need 8"),
    ("no_annotation", "annotation"),
    ("bad_json", "annotation"),
])
def test_bad_video_is_skipped_and_named(tmp_path, clevrer_params, damage, message):
    raw = make_raw(tmp_path / "raw", clevrer_params)
    video = layout.video_path(raw, "train", 1)
    ann = layout.annotation_path(raw, "train", 1)
    if damage == "zero":
        video.write_bytes(b"")
    elif damage == "truncate":
        video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    elif damage == "garbage":
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    elif damage == "short":
        encode_video(video, moving_square_video(4), fps=25)
    elif damage == "no_annotation":
        ann.unlink()
    elif damage == "bad_json":
        ann.write_text('{"scene_index": 1, "motion_trajectory": [')
    report = extract(raw, tmp_path / "frames.h5", data=clevrer_params.data)
    assert report["bad_videos"] == 1 and report["videos"]["train"] == 3
    bad = report["bad"][0]
    assert bad["video_id"] == 1 and bad["split"] == "train"
    assert re.search(message, bad["error"]), bad["error"]
    assert str(video if "annotation" not in message else ann) in bad["error"]
    with h5py.File(tmp_path / "frames.h5") as f:
        assert f["train"]["video_index"][:].tolist() == [0, 2, 3]
        assert json.loads(f.attrs["bad_videos"])[0]["video_id"] == 1


def test_too_many_bad_videos_fail_and_leave_no_output(tmp_path):
    params = params_from_dict(override(tiny_params_dict(), {"data": {"source": "clevrer", "max_bad_fraction": 0.1},
                                                         "flow": {"backend": "dis"}}))
    raw = make_raw(tmp_path / "raw", params)
    layout.video_path(raw, "train", 0).write_bytes(b"")
    out = tmp_path / "frames.h5"
    with pytest.raises(ExtractError, match="max_bad_fraction"):
        extract(raw, out, data=params.data)
    assert not out.exists() and not list(tmp_path.glob(".frames.h5.tmp*"))


def test_missing_raw_dir(tmp_path, clevrer_params):
    with pytest.raises(ExtractError, match="raw data directory not found"):
        extract(tmp_path / "nope", tmp_path / "frames.h5", data=clevrer_params.data)


def test_compose_strided_chains_translations():
    # constant motion of +1 px/frame in x: two native steps chain into 2 px, visibility multiplies
    h, w, t = 12, 16, 5
    fwd = np.zeros((t - 1, 2, h, w), np.float32)
    fwd[:, 0] = 1.0
    bwd = -fwd
    vis = np.ones((t - 1, h, w), np.float32)
    vis[1, :, :3] = 0.0  # on frame 2's grid: a band not visible in frame 1
    f, b, v = compose_strided(fwd, bwd, vis, 2, 2)
    assert f.shape == (2, 2, h, w)
    assert np.allclose(f[:, 0, :, : w - 3], 2.0) and np.allclose(b[:, 0, :, 3:], -2.0)
    assert np.allclose(f[:, 1], 0.0)
    # pair 0 = native 0 -> 2 on frame 2's grid: hidden in frame 1 means hidden in frame 0 too
    assert np.allclose(v[0, :, :3], 0.0) and np.allclose(v[0, :, 5:], 1.0)


def test_encode_is_lossless_so_decoding_is_reproducible(tmp_path):
    """Equal frames decode to equal frames: exactly their yuv420p conversion, whatever bytes libx264 emits.

    At crf 12 this libx264 gave 5 different files in 60 encodes of this clip (decoded pixels off by
    up to 7 levels); DVC caches the download stage's output, so the synthetic data must be reproducible.
    """
    import av

    from pipeline.data.synthetic import render_video
    from pipeline.data.video import decode_video

    frames, _, _ = render_video(10000, seed=0, synthetic=section("synthetic", width=64, height=48, frames=8))
    yuv420 = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                       .reformat(format="rgb24").to_ndarray() for f in frames])  # [T,H,W,3] what yuv420p keeps
    for i in range(12):
        encode_video(tmp_path / f"{i}.mp4", frames)
        np.testing.assert_array_equal(decode_video(tmp_path / f"{i}.mp4"), yuv420)


def test_extract_workers_start_clean_in_a_process_that_ran_the_flow_backend():
    """Workers forked from a process that had run the DIS backend over control rollouts hung forever (the suite
    hung this way: test_control, then this file's 2-worker extract); extract spawns them. The same sequence runs
    in a subprocess, so a regression fails on the timeout instead of hanging the suite."""
    import subprocess
    import sys

    from helpers import REPO

    tests = ["tests/test_control.py::test_constant_flow_animates_the_still",
             "tests/test_extract.py::test_extract_schema[2]"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "2 passed" in result.stdout
