"""Synthetic renderer speed at the repo's params: `python bench/bench_render.py [--params params.yaml]`.

Renders the whole default dataset (all splits, data.workers processes) into a temporary folder, then
one video in this process split into its phases; prints seconds per frame and per video and writes
bench/results/render.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params, to_dict  # noqa: E402
from pipeline.data.synthetic import render_video, save_npz  # noqa: E402
from pipeline.data.video import encode_video  # noqa: E402
from bench.common import machine  # noqa: E402
from pipeline.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "render.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    params = load_params(args.params)
    syn, data = params.synthetic, params.data
    from pipeline.data.synthetic import render_dataset

    def cpu() -> float:  # this process and its finished children (the render workers)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    cpu0 = cpu()
    with tempfile.TemporaryDirectory() as tmp:
        report = render_dataset(Path(tmp) / "raw", data=data, synthetic=syn)
        run = report["run"]  # the timings (render_dataset keeps them apart from what it writes)
        dataset_cpu = cpu() - cpu0
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2 ** 20
        # one video in this process, by phase
        t0, c0 = time.perf_counter(), time.process_time()
        frames, ann, gt = render_video(0, seed=data.seed, synthetic=syn)
        t1, c1 = time.perf_counter(), time.process_time()
        encode_video(Path(tmp) / "one.mp4", frames, fps=syn.fps)
        t2 = time.perf_counter()
        save_npz(Path(tmp) / "one.npz", gt)
        t3, c3 = time.perf_counter(), time.process_time()
    result = {
        "benchmark": "render", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
        "params": {"synthetic": to_dict(syn), "videos": to_dict(data.videos), "workers": data.workers},
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "dataset": report,
        "dataset_mb": round(size_mb, 2),
        "dataset_cpu_seconds": round(dataset_cpu, 2),
        "dataset_cpu_ms_per_frame": round(1000 * dataset_cpu / report["frames"], 2),
        # wall time this machine would take with every core free for the render
        "dataset_ideal_wall_s": round(dataset_cpu / max(1, min(run["workers"], os.cpu_count() or 1)), 1),
        "one_video": {"render_s": round(t1 - t0, 4), "encode_s": round(t2 - t1, 4), "gt_npz_s": round(t3 - t2, 4),
                      "render_ms_per_frame": round(1000 * (t1 - t0) / syn.frames, 2),
                      "total_ms_per_frame": round(1000 * (t3 - t0) / syn.frames, 2),
                      "render_cpu_ms_per_frame": round(1000 * (c1 - c0) / syn.frames, 2),
                      "total_cpu_ms_per_frame": round(1000 * (c3 - c0) / syn.frames, 2),
                      "objects": len(ann["object_property"]), "collisions": len(ann["collision"]),
                      "visible_fraction": round(float(np.mean(gt["vis"])), 4)},
    }
    write_json(args.out, result)
    print(f"dataset: {report['frames']} frames ({sum(report['videos'].values())} videos, {syn.width}x{syn.height}) "
          f"in {run['seconds']:.1f} s with {run['workers']} workers -> "
          f"{1000 * run['seconds_per_frame']:.1f} ms/frame, {run['seconds_per_video']:.2f} s/video "
          f"(load avg {result['load_avg_1min']} on {result['cpus']} CPUs)")
    print(f"dataset CPU time {result['dataset_cpu_seconds']:.1f} s = {result['dataset_cpu_ms_per_frame']:.1f} "
          f"CPU-ms/frame -> {result['dataset_ideal_wall_s']:.0f} s wall with {run['workers']} free cores")
    ov = result["one_video"]
    print(f"one video, one process: render {ov['render_ms_per_frame']:.1f} ms/frame "
          f"({ov['render_cpu_ms_per_frame']:.1f} CPU-ms), render+encode+gt {ov['total_ms_per_frame']:.1f} ms/frame "
          f"({ov['total_cpu_ms_per_frame']:.1f} CPU-ms) "
          f"(encode {ov['encode_s']:.2f} s, npz {ov['gt_npz_s']:.2f} s)")
    print(f"collisions {report['collisions']} in {report['videos_with_collision']} videos; "
          f"mean object motion {report['mean_object_motion_px']:.2f} px/frame native; {size_mb:.1f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
