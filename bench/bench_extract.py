"""Extraction rate of the extract stage as a ratio to a bare PyAV decode of the same files (target >= 0.8).

Usage: python bench/bench_extract.py [--raw data/raw] [--params params.yaml]
Renders the default synthetic data first when --raw does not exist. Extract runs twice on the same files:
as configured (synthetic: frames plus the exact flow/visibility ground truth, which is most of the work at
192x128) and frames only (data.source=clevrer, what a real CLEVRER run does).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402

from bench.common import save  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import layout  # noqa: E402
from pipeline.data.extract import extract  # noqa: E402


def bare_decode(paths: list[Path]) -> tuple[int, float]:
    """Decode every frame to RGB with PyAV, nothing else: (frames, seconds)."""
    start, frames = time.perf_counter(), 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
    return frames, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(args.raw or params.paths.raw)
        if not raw.is_dir():
            from pipeline.data.synthetic import render_dataset
            raw = Path(tmp) / "raw"
            print(f"rendering default synthetic data into {raw} ...")
            render_dataset(raw, data=params.data, synthetic=params.synthetic)
        paths = [layout.video_path(raw, cs, vid) for cs, ids in layout.split_ids(params.data.splits).values()
                 for vid in ids]
        bare_decode(paths[:2])  # warm the page cache
        frames, bare_s = bare_decode(paths)
        timed = {}
        for name, data in (("extract", params.data), ("frames_only", dataclasses.replace(params.data, source="clevrer"))):
            start = time.perf_counter()
            report = extract(raw, Path(tmp) / f"{name}.h5", data=data)
            timed[name] = (time.perf_counter() - start, report)
    native_fps = frames / bare_s
    extract_s, report = timed["extract"]
    only_s, _ = timed["frames_only"]
    extract_fps = frames / extract_s  # native frames consumed per second, comparable with the bare decode
    result = {"videos": len(paths), "native_frames": frames, "bare_decode_s": round(bare_s, 3),
              "extract_s": round(extract_s, 3), "bare_decode_fps": round(native_fps, 1),
              "extract_fps": round(extract_fps, 1), "ratio": round(extract_fps / native_fps, 3), "target": 0.8,
              "source": params.data.source, "frames_only_s": round(only_s, 3),
              "frames_only_fps": round(frames / only_s, 1), "frames_only_ratio": round(bare_s / only_s, 3),
              "workers": params.data.workers, "frames_written": report["frames_written"]}
    print(f"bare PyAV decode: {native_fps:.0f} frames/s; extract ({params.data.source}): {extract_fps:.0f} frames/s, "
          f"ratio {result['ratio']:.2f}; frames only: {result['frames_only_fps']:.0f} frames/s, ratio "
          f"{result['frames_only_ratio']:.2f} (workers={params.data.workers}; target >= 0.8)")
    print(f"wrote {save('extract', result)}")


if __name__ == "__main__":
    main()
