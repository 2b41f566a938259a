"""Decode CLEVRER-layout videos, resize, subsample and stream them into frames.h5."""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Data, params_hash
from pipeline.data import layout
from pipeline.data.annotations import AnnotationError, collision_frames, load_annotation
from pipeline.data.video import VideoError, decode_video
from pipeline.flow.ops import resize_flow, warp
from pipeline.io import atomic_path

MAX_OBJECTS = 10  # box slots per frame; CLEVRER scenes hold at most 6 objects at once


class ExtractError(RuntimeError):
    """Too many bad videos, or nothing usable, in the raw data."""


class GroundTruthError(ValueError):
    """A synthetic ground-truth .npz that is missing or malformed."""


@dataclass(frozen=True)
class VideoJob:
    split: str
    clevrer_split: str
    video_id: int
    raw: str
    frames: int
    stride: int
    resolution: tuple[int, int]
    with_gt: bool


def resize_frames(video: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """uint8 [T,H,W,3] -> uint8 [T,h,w,3]; area filter when shrinking (antialiased), bilinear when growing."""
    h, w = resolution
    if video.shape[1:3] == (h, w):
        return video
    shrink = h <= video.shape[1] and w <= video.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in video])


def compose_strided(fwd: np.ndarray, bwd: np.ndarray, vis: np.ndarray, stride: int, count: int):
    """Chain native consecutive-frame flows into flows between every stride-th frame.

    fwd/bwd [T-1,2,H,W], vis [T-1,H,W] in [0,1] -> the same for `count` strided pairs. Backward flow
    t+s -> t at p is bwd_{t+s-1}(p) + bwd_{..}(p + bwd_{t+s-1}(p)) ..., i.e. each earlier step sampled
    where the later one lands (the one warp function does the sampling).
    """
    if stride == 1:
        return fwd[:count], bwd[:count], vis[:count]
    out_f, out_b, out_v = [], [], []
    for k in range(count):
        t0 = k * stride
        f = torch.from_numpy(fwd[t0].astype(np.float32))  # [2,H,W]
        b = torch.from_numpy(bwd[t0 + stride - 1].astype(np.float32))
        v = torch.from_numpy(vis[t0 + stride - 1].astype(np.float32))[None]  # [1,H,W]
        for step in range(1, stride):
            # forward: continue from where the chain has landed so far
            nxt_f = torch.from_numpy(fwd[t0 + step].astype(np.float32))
            f = f + warp(nxt_f[None], f[None])[0]
            # backward: from frame t0+stride back one more native step
            prev_b = torch.from_numpy(bwd[t0 + stride - 1 - step].astype(np.float32))
            prev_v = torch.from_numpy(vis[t0 + stride - 1 - step].astype(np.float32))[None]
            v = v * warp(prev_v[None], b[None])[0]
            b = b + warp(prev_b[None], b[None])[0]
        out_f.append(f.numpy()), out_b.append(b.numpy()), out_v.append(v[0].numpy())
    return np.stack(out_f), np.stack(out_b), np.stack(out_v)


def load_ground_truth(path: Path, *, native_frames: int) -> dict[str, np.ndarray]:
    """Read and check a synthetic gt_NNNNN.npz."""
    if not path.is_file():
        raise GroundTruthError(f"{path}: ground-truth file not found")
    try:
        with np.load(path) as npz:
            gt = {k: npz[k] for k in ("fwd", "bwd", "vis", "boxes", "box_mask")}
    except KeyError as e:
        raise GroundTruthError(f"{path}: missing array {e}") from None
    except Exception as e:  # truncated or foreign files fail in many ways (BadZipFile, zlib.error, EOFError, ...)
        raise GroundTruthError(f"{path}: unreadable ground truth ({type(e).__name__}: {e})") from None
    t = gt["boxes"].shape[0]
    if t < native_frames or gt["fwd"].shape[0] != t - 1 or gt["bwd"].shape != gt["fwd"].shape:
        raise GroundTruthError(f"{path}: ground truth covers {t} frames, fwd {gt['fwd'].shape}, bwd "
                               f"{gt['bwd'].shape}; need {native_frames} frames")
    return gt


def process_video(job: VideoJob) -> dict:
    """Decode and check one video (no torch: runs in forked workers); returns arrays or an `error`."""
    native_needed = (job.frames - 1) * job.stride + 1
    try:
        video_file = layout.video_path(job.raw, job.clevrer_split, job.video_id)
        ann_file = layout.annotation_path(job.raw, job.clevrer_split, job.video_id)
        annotation = load_annotation(ann_file)
        video = decode_video(video_file)
        if len(video) < native_needed:
            raise VideoError(f"{video_file}: has {len(video)} frames, need {native_needed} "
                             f"(data.frames={job.frames}, data.stride={job.stride})")
        kept = np.arange(job.frames) * job.stride  # native frame ids kept
        out = {"video": resize_frames(video[kept], job.resolution)}
        collision = np.zeros(job.frames, np.uint8)
        for frame_id in collision_frames(annotation):
            k = int(np.ceil(frame_id / job.stride))  # first kept frame at or after the collision
            if frame_id <= kept[-1] and k < job.frames:
                collision[k] = 1
        out["collision"] = collision
        boxes = np.zeros((job.frames, MAX_OBJECTS, 4), np.float32)
        box_mask = np.zeros((job.frames, MAX_OBJECTS), np.uint8)
        if job.with_gt:
            gt_file = layout.gt_path(job.raw, job.clevrer_split, job.video_id)
            gt = load_ground_truth(gt_file, native_frames=native_needed)
            if gt["fwd"].shape[-2:] != video.shape[1:3]:
                raise GroundTruthError(f"{gt_file}: flow is {gt['fwd'].shape[-2:]}, video {video_file} is "
                                       f"{video.shape[1:3]}")
            n_obj = min(gt["boxes"].shape[1], MAX_OBJECTS)
            boxes[:, :n_obj] = gt["boxes"][kept, :n_obj]
            box_mask[:, :n_obj] = gt["box_mask"][kept, :n_obj]
            out["native_gt"] = {k: gt[k][: native_needed - 1] for k in ("fwd", "bwd", "vis")}
        out.update(boxes=boxes, box_mask=box_mask)
        return {"ok": True, "split": job.split, "video_id": job.video_id, "arrays": out}
    except (VideoError, AnnotationError, GroundTruthError) as e:
        return {"ok": False, "split": job.split, "video_id": job.video_id, "error": str(e)}


def ground_truth_at_resolution(native_gt: dict[str, np.ndarray], job: VideoJob) -> dict[str, np.ndarray]:
    """Native consecutive-frame flow/visibility -> strided pairs at the stored resolution (vectors rescaled)."""
    fwd, bwd, vis = compose_strided(native_gt["fwd"], native_gt["bwd"], native_gt["vis"].astype(np.float32),
                                    job.stride, job.frames - 1)
    size = tuple(job.resolution)
    vis_small = np.stack([cv2.resize(v, (size[1], size[0]), interpolation=cv2.INTER_AREA) for v in vis])
    return {"gt_fwd": resize_flow(torch.from_numpy(fwd), size).numpy().astype(np.float16),
            "gt_bwd": resize_flow(torch.from_numpy(bwd), size).numpy().astype(np.float16),
            "gt_vis": np.clip(np.rint(vis_small * 255), 0, 255).astype(np.uint8)}


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _create_datasets(group: h5py.Group, n: int, job: VideoJob) -> None:
    h, w = job.resolution
    t = job.frames
    # gzip, not lzf: h5py's lzf filter does not give the same bytes for the same arrays
    packed = dict(compression="gzip", compression_opts=1)
    group.create_dataset("video", (n, t, h, w, 3), np.uint8, chunks=(1, 1, h, w, 3), maxshape=(None, t, h, w, 3),
                         **packed)
    group.create_dataset("collision", (n, t), np.uint8, maxshape=(None, t))
    group.create_dataset("boxes", (n, t, MAX_OBJECTS, 4), np.float32, maxshape=(None, t, MAX_OBJECTS, 4))
    group.create_dataset("box_mask", (n, t, MAX_OBJECTS), np.uint8, maxshape=(None, t, MAX_OBJECTS))
    group.create_dataset("video_index", (n,), np.int64, maxshape=(None,))
    if job.with_gt:
        for key in ("gt_fwd", "gt_bwd"):
            group.create_dataset(key, (n, t - 1, 2, h, w), np.float16, chunks=(1, 1, 2, h, w),
                                 maxshape=(None, t - 1, 2, h, w), **packed)
        group.create_dataset("gt_vis", (n, t - 1, h, w), np.uint8, chunks=(1, 1, h, w), maxshape=(None, t - 1, h, w),
                             **packed)


def extract(raw: str | Path, out_h5: str | Path, *, data: Data) -> dict:
    """Write frames.h5 from the raw CLEVRER-layout directory; returns the stage report."""
    raw, out_h5 = Path(raw), Path(out_h5)
    if not raw.is_dir():
        raise ExtractError(f"{raw}: raw data directory not found (run the download stage first)")
    with_gt = data.source == "synthetic"
    jobs = {split: [VideoJob(split, clevrer_split, vid, str(raw), data.frames, data.stride,
                             tuple(data.resolution), with_gt) for vid in ids]
            for split, (clevrer_split, ids) in layout.split_ids(data.splits).items()}
    total = sum(len(j) for j in jobs.values())
    start = time.perf_counter()
    bad: list[dict] = []
    counts: dict[str, int] = {}
    # spawned, not forked: a fork inherits the caller's OpenCV / OpenMP thread pools with their locks held, and
    # a worker that then calls cv2 waits forever (seen when extract ran in a process that had used cv2's DIS)
    pool = mp.get_context("spawn").Pool(data.workers, initializer=_init_worker) if data.workers > 1 else None
    results = pool.imap if pool else map
    with pool or contextlib.nullcontext(), atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f, \
            tqdm(total=total, desc="extract") as bar:
        f.attrs.update(source=data.source, resolution=list(data.resolution), stride=data.stride, frames=data.frames,
                       params_hash=params_hash(data), has_gt=with_gt, max_objects=MAX_OBJECTS)
        for split, split_jobs in jobs.items():
            group = f.create_group(split)
            _create_datasets(group, len(split_jobs), split_jobs[0])
            n = 0
            for result, job in zip(results(process_video, split_jobs), split_jobs):
                bar.update(1)
                if not result["ok"]:
                    bad.append({k: result[k] for k in ("split", "video_id", "error")})
                    tqdm.write(f"skipping video {result['video_id']} ({split}): {result['error']}")
                    if len(bad) > data.max_bad_fraction * total:
                        raise ExtractError(f"{len(bad)} of {total} videos are bad, more than data.max_bad_fraction="
                                           f"{data.max_bad_fraction}; first: {bad[0]['error']}; last: {bad[-1]['error']}")
                    continue
                arrays = result["arrays"]
                if job.with_gt:
                    arrays.update(ground_truth_at_resolution(arrays.pop("native_gt"), job))
                for key, value in arrays.items():
                    group[key][n] = value
                group["video_index"][n] = result["video_id"]
                n += 1
            if n == 0:
                raise ExtractError(f"{raw}: no usable video in split {split!r}")
            for key in group:
                group[key].resize(n, axis=0)
            counts[split] = n
        f.attrs["bad_videos"] = json.dumps(bad)
    seconds = time.perf_counter() - start
    return {"videos": counts, "bad_videos": len(bad), "bad_fraction": len(bad) / total, "bad": bad,
            "frames_written": sum(counts.values()) * data.frames,
            # what this run took: for the stage log and the benchmarks, never in the metrics file
            "run": {"seconds": round(seconds, 2),
                       "frames_per_second": round(sum(counts.values()) * data.frames / seconds, 1)}}
