"""A Range-capable HTTP test server and a tiny CLEVRER in the official archive layout (not a test module).

Shared by tests/test_clevrer_download.py and tests/test_download_stage.py; the `clevrer` fixture of
tests/conftest.py is `make_clevrer`, built once per module.
"""
from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from pipeline.data import layout
from pipeline.data.video import encode_video

VIDEOS = "/videos/train/video_train.zip"
TRAIN_IDS = range(0, 24)
VAL_IDS = range(10000, 10004)


# ----------------------------------------------------------------------------- a Range-capable test server

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        fake: FakeServer = self.server.fake
        body = fake.files.get(self.path.split("?")[0])
        if not fake.head or body is None:
            self.send_error(501 if not fake.head else 404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", fake.etag)
        self.end_headers()

    def do_GET(self):
        fake: FakeServer = self.server.fake
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        fake.requests.append((path, rng))
        body = fake.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, end, status = 0, len(body) - 1, 200
        if rng and fake.ranges and not (fake.suffix_only and not rng.startswith("bytes=-")):
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng)
            if m[1] == "":
                start = max(0, len(body) - int(m[2]))
            else:
                start, end = int(m[1]), min(int(m[2]) if m[2] else len(body) - 1, len(body) - 1)
            if start >= len(body) or start > end:
                self.send_error(416, "Range Not Satisfiable")
                return
            status = 206
        payload = body[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", fake.etag)
        if fake.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.end_headers()
        cut = fake.take_cut(path, len(payload))
        if cut is not None:  # simulate a dropped connection: fewer bytes than Content-Length, then close
            payload = payload[:cut]
            self.close_connection = True
        self.wfile.write(payload)
        fake.sent[path] += len(payload)


class FakeServer:
    """HTTP on 127.0.0.1 (random port) serving in-memory files; honours Range unless ranges=False (or only a
    suffix range with suffix_only=True), HEAD unless head=False, and can cut the next long transfer of a path
    after a given number of bytes."""

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True, head: bool = True, suffix_only: bool = False):
        self.files, self.ranges, self.head, self.etag = dict(files), ranges, head, '"v1"'
        self.suffix_only = suffix_only
        self.sent: Counter = Counter()
        self.requests: list[tuple[str, str | None]] = []
        self._cuts: list[list] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def cut(self, path: str, after: int, times: int = 1) -> None:
        """Drop the next `times` responses for `path` longer than `after` bytes after `after` bytes."""
        self._cuts.append([path, after, times])

    def take_cut(self, path: str, length: int) -> int | None:
        with self._lock:
            for c in self._cuts:
                if c[0] == path and c[2] > 0 and length > c[1]:
                    c[2] -= 1
                    return c[1]
        return None

    def reset_counts(self) -> None:
        self.sent.clear()
        self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- a tiny CLEVRER

def annotation_json(video_id: int, frames: int = 8) -> bytes:
    """An annotation with CLEVRER's schema (README.txt of the dataset)."""
    objs = [{"object_id": k, "color": c, "material": m, "shape": s}
            for k, (c, m, s) in enumerate([("blue", "rubber", "sphere"), ("red", "metal", "cube")])]
    traj = [{"frame_id": t, "objects": [{"object_id": k, "location": [0.1 * t, k, 0.2], "orientation": [0, 0, 0.1],
                                          "velocity": [0.1, 0, 0], "angular_velocity": [0, 0, 0],
                                          "inside_camera_view": True} for k in range(2)]} for t in range(frames)]
    ann = {"scene_index": video_id, "video_filename": f"video_{video_id:05d}.mp4", "object_property": objs,
           "motion_trajectory": traj, "collision": [{"object_ids": [0, 1], "frame_id": 3, "location": [0, 0, 0.2]}]}
    return json.dumps(ann).encode()


def make_zip(members: dict[str, bytes], *, method: int, dirs: bool = True, force_zip64: bool = False) -> bytes:
    """A zip like `zip -r`: folder entries, then files in order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        seen = set()
        for name, blob in members.items():
            folder = name.rsplit("/", 1)[0] + "/" if "/" in name else None
            if dirs and folder and folder not in seen:
                seen.add(folder)
                zf.writestr(folder, b"")
            info = zipfile.ZipInfo(name, date_time=(2019, 9, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=force_zip64) as f:
                f.write(blob)
    return buf.getvalue()


def folder(prefix: str, i: int) -> str:
    lo = i // 1000 * 1000
    return f"{prefix}_{lo:05d}-{lo + 1000:05d}"


def make_clevrer(tmp: Path) -> dict:
    """A tiny CLEVRER: members (name -> bytes) of each archive and the archives themselves, in the official
    layout, with the videos (8 frames of incompressible noise, encoded under `tmp`) and annotations by id."""
    rng = np.random.default_rng(0)
    videos, anns = {}, {}
    for i in [*TRAIN_IDS, *VAL_IDS]:
        frames = rng.integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)  # [T,H,W,3] noise: incompressible
        encode_video(tmp / "v.mp4", frames, fps=25)
        videos[i] = (tmp / "v.mp4").read_bytes()
        anns[i] = annotation_json(i)
    members = {
        VIDEOS: {f"{folder('video', i)}/video_{i:05d}.mp4": videos[i] for i in TRAIN_IDS},
        "/videos/validation/video_validation.zip": {f"{folder('video', i)}/video_{i:05d}.mp4": videos[i]
                                                    for i in VAL_IDS},
        "/annotations/train/annotation_train.zip": {f"{folder('annotation', i)}/annotation_{i:05d}.json": anns[i]
                                                    for i in TRAIN_IDS},
        "/annotations/validation/annotation_validation.zip": {
            f"{folder('annotation', i)}/annotation_{i:05d}.json": anns[i] for i in VAL_IDS},
        "/derender_proposals.zip": {f"derender_proposals/proposal_{i:05d}.json": json.dumps({"id": i}).encode()
                                    for i in [*TRAIN_IDS, *VAL_IDS]},
    }
    archives = {path: make_zip(m, method=zipfile.ZIP_STORED if path.startswith("/videos") else zipfile.ZIP_DEFLATED)
                for path, m in members.items()}
    return {"members": members, "archives": archives, "videos": videos, "anns": anns}


def expected_files(train: int = 2, val: int = 1, test: int = 2, proposals: bool = False) -> dict[str, int]:
    """relpath -> CLEVRER id of every file the download must write."""
    out = {}
    for _split, (cs, ids) in layout.split_ids({"train": train, "val": val, "test": test}).items():
        for i in ids:
            out[layout.video_relpath(cs, i)] = i
            out[layout.annotation_relpath(cs, i)] = i
            if proposals:
                out[layout.proposal_relpath(i)] = i
    return out


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
