"""mp4 decode and encode with PyAV (torchvision 0.29 has no video reader)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np


class VideoError(ValueError):
    """A video file that cannot be decoded: names the file and the problem."""


def decode_video(path: str | Path) -> np.ndarray:
    """Decode every frame of an mp4 to uint8 RGB [T,H,W,3]."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: corrupt or truncated video ({type(e).__name__}: {e})") from None
    if not frames:
        raise VideoError(f"{path}: video has no decodable frames (corrupt or truncated)")
    return np.stack(frames)


def encode_video(path: str | Path, frames: np.ndarray, *, fps: int = 25) -> None:
    """Encode uint8 RGB [T,H,W,3] to a lossless H.264 mp4 (libx264 qp 0, yuv420p); H and W must be even.

    Lossless, so the decoded frames are a pure function of `frames` (their yuv420p conversion): this
    libx264 was measured to emit different bitstreams for equal input from run to run at crf 12 (36 of
    80 encodes of one 64x48 clip differed from the most common one, decoded pixels by up to 7 levels),
    which made the synthetic data irreproducible. The files are ~3x larger (75 vs 24 KB for a default 32-frame 192x128 video).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {h}x{w}")
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qp": "0", "preset": "medium"}
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
