"""Torch datasets that stream frames, flow and latents from the pipeline's HDF5 files."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.io import open_h5


class _H5Files:
    """HDF5 handles opened lazily, once per process (safe with DataLoader workers)."""

    def __init__(self, **paths: str | Path | None):
        self.paths = {k: Path(v) for k, v in paths.items() if v is not None}
        self._pid, self._files, self._datasets = None, {}, {}

    def __getitem__(self, key: str) -> h5py.File:
        if self._pid != os.getpid():
            self._pid, self._files, self._datasets = os.getpid(), {}, {}
        if key not in self._files:
            self._files[key] = open_h5(self.paths[key])
        return self._files[key]

    def dataset(self, key: str, split: str, name: str) -> h5py.Dataset:
        """`<split>/<name>` of file `key`, looked up once per process (a group lookup costs as much as a frame read)."""
        if self._pid != os.getpid() or (key, split, name) not in self._datasets:
            self[key]  # (re)opens the file in this process, resetting the lookups after a fork
            self._datasets[key, split, name] = self._files[key][split][name]
        return self._datasets[key, split, name]

    def __getstate__(self):
        return {"paths": self.paths, "_pid": None, "_files": {}, "_datasets": {}}


def has_split(path: str | Path, split: str) -> bool:
    """Whether a frames.h5 / flow.h5 / latents.h5 holds a (non-empty) group for `split`."""
    with open_h5(path) as f:
        return split in f and len(f[split]) > 0


def split_group(path: str | Path, split: str) -> tuple[int, ...]:
    """Shape of `<split>/video` in a frames.h5 (or `<split>/bwd` in a flow.h5); clear error when absent."""
    with open_h5(path) as f:
        if split not in f:
            raise KeyError(f"{path}: no split {split!r}; found {sorted(f.keys())}")
        group = f[split]
        key = "video" if "video" in group else "bwd" if "bwd" in group else "z"
        return tuple(group[key].shape)


def flow_backend(flow_h5: str | Path) -> str:
    """The backend that really produced a flow.h5 (`backend_used`, with the one it replaced after a fallback)."""
    with open_h5(flow_h5, what="flow file") as f:
        used, asked = str(f.attrs.get("backend_used", "")), str(f.attrs.get("backend", ""))
    if not used:
        raise ValueError(f"{flow_h5}: no backend_used attribute; was it written by the flow stage?")
    return used if used == asked or not asked else f"{used} (fallback from {asked})"


def frames_to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [...,H,W,3] -> float [...,3,H,W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(video, -1, -3))).float().div_(255.0)


class FrameDataset(Dataset):
    """Every frame of a split: item = frame [3,H,W] float in [0,1]."""

    def __init__(self, frames_h5: str | Path, split: str):
        self.files, self.split = _H5Files(frames=frames_h5), split
        self.num_videos, self.num_frames = split_group(frames_h5, split)[:2]

    def __len__(self) -> int:
        return self.num_videos * self.num_frames

    def __getitem__(self, index: int) -> torch.Tensor:
        v, t = divmod(int(index), self.num_frames)
        return frames_to_tensor(self.files.dataset("frames", self.split, "video")[v, t])  # [3,H,W]


class FlowFieldDataset(Dataset):
    """Every backward flow field of a split: item = flow [2,H,W] in pixels."""

    def __init__(self, flow_h5: str | Path, split: str):
        self.files, self.split = _H5Files(flow=flow_h5), split
        self.num_videos, self.num_pairs = split_group(flow_h5, split)[:2]

    def __len__(self) -> int:
        return self.num_videos * self.num_pairs

    def __getitem__(self, index: int) -> torch.Tensor:
        v, t = divmod(int(index), self.num_pairs)
        return torch.from_numpy(self.files.dataset("flow", self.split, "bwd")[v, t].astype(np.float32))  # [2,H,W]


class ClipDataset(Dataset):
    """Windows of `length` consecutive frames with their flow, occlusion and latents.

    Item keys: frames [L,3,H,W], collision [L], boxes [L,K,4], box_mask [L,K], video_index [];
    with flow_h5: flow_bwd, flow_fwd [L-1,2,H,W], occ [L-1,1,H,W]; with latents_h5: z [L,C,h,w],
    zf [L-1,Cf,h,w]. `first_window_only` keeps one window per video starting at frame 0 (evaluation).
    """

    def __init__(self, frames_h5: str | Path, split: str, length: int, *, flow_h5: str | Path | None = None,
                 latents_h5: str | Path | None = None, first_window_only: bool = False):
        self.files = _H5Files(frames=frames_h5, flow=flow_h5, latents=latents_h5)
        self.split, self.length = split, length
        self.num_videos, self.num_frames = split_group(frames_h5, split)[:2]
        if length < 2 or length > self.num_frames:
            raise ValueError(f"{frames_h5}: clip length {length} must be in [2, {self.num_frames}] (frames per video)")
        for key, path in (("flow", flow_h5), ("latents", latents_h5)):
            if path is not None:
                shape = split_group(path, split)
                if shape[0] != self.num_videos:
                    raise ValueError(f"{path}: split {split!r} has {shape[0]} videos, {frames_h5} has {self.num_videos}")
        self.windows_per_video = 1 if first_window_only else self.num_frames - length + 1

    def __len__(self) -> int:
        return self.num_videos * self.windows_per_video

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        v, t0 = divmod(int(index), self.windows_per_video)
        t1 = t0 + self.length
        frames = functools.partial(self.files.dataset, "frames", self.split)
        item = {
            "frames": frames_to_tensor(frames("video")[v, t0:t1]),  # [L,3,H,W]
            "collision": torch.from_numpy(frames("collision")[v, t0:t1].astype(np.float32)),  # [L]
            "boxes": torch.from_numpy(frames("boxes")[v, t0:t1].astype(np.float32)),  # [L,K,4]
            "box_mask": torch.from_numpy(frames("box_mask")[v, t0:t1].astype(np.float32)),  # [L,K]
            "video_index": torch.tensor(int(frames("video_index")[v])),
        }
        if "flow" in self.files.paths:
            flow = functools.partial(self.files.dataset, "flow", self.split)
            item["flow_bwd"] = torch.from_numpy(flow("bwd")[v, t0:t1 - 1].astype(np.float32))  # [L-1,2,H,W]
            item["flow_fwd"] = torch.from_numpy(flow("fwd")[v, t0:t1 - 1].astype(np.float32))  # [L-1,2,H,W]
            item["occ"] = torch.from_numpy(flow("occ")[v, t0:t1 - 1].astype(np.float32) / 255.0)[:, None]  # [L-1,1,H,W]
        if "latents" in self.files.paths:
            latents = functools.partial(self.files.dataset, "latents", self.split)
            item["z"] = torch.from_numpy(latents("z")[v, t0:t1].astype(np.float32))  # [L,C,h,w]
            item["zf"] = torch.from_numpy(latents("zf")[v, t0:t1 - 1].astype(np.float32))  # [L-1,Cf,h,w]
        return item
