"""CLEVRER-format synthetic videos: a numpy ray caster over a ground plane with exact flow ground truth.

The scene follows CLEVRER: a static, tilted perspective camera over a gray floor; spheres, cubes and
cylinders in CLEVR's 8 colours and 2 materials (rubber = matte, metal = specular + reflective); an
area light gives soft cast shadows. Objects slide on the floor (2D disk physics, exact elastic
collisions found event by event, so they never interpenetrate); cubes also spin about the vertical
axis (a sphere's or cylinder's yaw is invisible, so they keep theirs); a share of the objects start
outside the view and slide in.

World frame: z up, the floor is z = 0, lengths in scene units (CLEVRER's). Image frame: pixel
(x=j, y=i) is the centre of column j, row i, so flow in pixels matches `pipeline.flow.ops.warp`.
Everything is a pure function of (data.seed, video id): same seed -> byte-identical JSON and npz
files and identical decoded frames, whatever data.workers is.

Ground truth is exact at pixel centres: each pixel's surface point is kept in its object's frame,
moved with the object's rigid pose and re-projected (fwd/bwd); visibility casts a ray to the moved
point. Frames are point-sampled (no anti-aliasing; extract's area downsampling smooths edges).

Modules: pipeline/data/render.py (camera, light, ray casting, exact flow), pipeline/data/scene.py (sampling,
physics, the annotation); this one renders videos and writes the files, in a process pool.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline.config import Data, Synthetic
from pipeline.data.layout import annotation_path, gt_path, split_ids, video_path
from pipeline.data.render import Camera, Renderer
from pipeline.data.scene import annotation, sample_scene
from pipeline.data.video import encode_video
from pipeline.io import atomic_path

__all__ = ["render_dataset", "render_video", "save_npz"]


def render_video(video_id: int, *, seed: int, synthetic: Synthetic) -> tuple[np.ndarray, dict, dict]:
    """Render one video: frames uint8 [T,H,W,3], CLEVRER annotation dict, ground-truth arrays dict."""
    rng = np.random.default_rng([int(seed), int(video_id)])
    cam = Camera(synthetic.width, synthetic.height)
    scene = sample_scene(rng, cam, synthetic)
    ren = Renderer(cam, scene)
    n_t, h, w, k = synthetic.frames, cam.height, cam.width, len(scene.shapes)
    frames = np.zeros((n_t, h, w, 3), dtype=np.uint8)
    fwd = np.zeros((n_t - 1, 2, h, w), dtype=np.float16)
    bwd = np.zeros((n_t - 1, 2, h, w), dtype=np.float16)
    vis = np.zeros((n_t - 1, h, w), dtype=np.uint8)
    boxes = np.zeros((n_t, k, 4), dtype=np.float32)
    box_mask = np.zeros((n_t, k), dtype=np.uint8)
    prev = None
    for t in range(n_t):
        cur = ren.render(t)
        frames[t] = np.round(cur.image * 255.0).astype(np.uint8)
        boxes[t], box_mask[t] = ren.boxes(t)
        if prev is not None:
            f, _ = ren.flow_and_vis(prev, t)
            b, v = ren.flow_and_vis(cur, t - 1)
            fwd[t - 1], bwd[t - 1], vis[t - 1] = f, b, v
        prev = cur
    gt = {"fwd": fwd, "bwd": bwd, "vis": vis, "boxes": boxes, "box_mask": box_mask}
    return frames, annotation(video_id, scene, box_mask, synthetic.fps), gt


# ----------------------------------------------------------------------------------------------
# files


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps, so equal arrays give byte-identical files."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, value in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=6)


def _render_one(task: tuple[str, str, int, int, Synthetic]) -> dict:
    """Worker: render one video and write its mp4, annotation and ground truth atomically."""
    raw, clevrer_split, video_id, seed, syn = task
    start = time.perf_counter()
    frames, ann, gt = render_video(video_id, seed=seed, synthetic=syn)
    with atomic_path(video_path(raw, clevrer_split, video_id)) as tmp:
        encode_video(tmp, frames, fps=syn.fps)
    with atomic_path(annotation_path(raw, clevrer_split, video_id)) as tmp:
        tmp.write_text(json.dumps(ann, separators=(",", ":")))
    save_npz(gt_path(raw, clevrer_split, video_id), gt)
    moving = gt["fwd"].astype(np.float32)
    speed = np.hypot(moving[:, 0], moving[:, 1])
    return {"id": video_id, "seconds": time.perf_counter() - start, "objects": len(ann["object_property"]),
            "collisions": len(ann["collision"]),
            "moving_px": float(speed[speed > 0.05].mean()) if (speed > 0.05).any() else 0.0}


def render_dataset(out_dir: Path, *, data: Data, synthetic: Synthetic) -> dict:
    """Render every split's videos into out_dir in CLEVRER's layout; returns a report dict (sizes: config.Synthetic)."""
    out_dir = Path(out_dir)
    splits = split_ids(data.splits)
    tasks = [(str(out_dir), cs, vid, data.seed, synthetic) for _, (cs, ids) in splits.items() for vid in ids]
    start = time.perf_counter()
    workers = max(1, min(data.workers, len(tasks), os.cpu_count() or 1))
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            results = list(pool.imap_unordered(_render_one, tasks, chunksize=1))
    else:
        results = [_render_one(task) for task in tasks]
    seconds = time.perf_counter() - start
    results.sort(key=lambda r: r["id"])
    n_frames = len(tasks) * synthetic.frames
    return {
        "source": "synthetic",
        "videos": {split: len(ids) for split, (_, ids) in splits.items()},
        "frames": n_frames,
        "frames_per_video": synthetic.frames,
        "size": [synthetic.height, synthetic.width],
        "fps": synthetic.fps,
        "objects": int(sum(r["objects"] for r in results)),
        "collisions": int(sum(r["collisions"] for r in results)),
        "videos_with_collision": int(sum(r["collisions"] > 0 for r in results)),
        "mean_object_motion_px": round(float(np.mean([r["moving_px"] for r in results])), 3),
        # what this run took: for the stage log and the benchmarks, never written into data/raw
        "run": {"seconds": round(seconds, 3), "seconds_per_frame": round(seconds / n_frames, 5),
                   "seconds_per_video": round(seconds / len(tasks), 4), "workers": workers},
    }
