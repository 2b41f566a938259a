"""Cutting clip batches in time: the one place that knows which keys are per frame, per pair or per clip.

A clip batch (pipeline.data.datasets.ClipDataset, batched) holds `frames` [B,L,3,H,W] and, per frame,
latents `z` and the labels `collision`, `boxes`, `box_mask`; per consecutive pair (L-1 of them) the
flow `flow_bwd`, `flow_fwd`, the visibility `occ` and the flow latents `zf`; per clip `video_index`.
`clip_slice(batch, start, stop)` keeps frames start..stop-1 and the pairs between them; with
`observed=True` only what a predictor may read at test time (frames, flow, latents: no labels).
Unknown keys are refused rather than passed on, so nothing outside a window can leak into it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["FRAME_KEYS", "PAIR_KEYS", "META_KEYS", "LABEL_KEYS", "clip_slice", "window_indices", "stack_windows",
           "stack_frames", "history_windows"]

FRAME_KEYS = ("frames", "z", "collision", "boxes", "box_mask")
PAIR_KEYS = ("flow_bwd", "flow_fwd", "occ", "zf")
META_KEYS = ("video_index",)
LABEL_KEYS = ("collision", "boxes", "box_mask")


def clip_slice(batch: Mapping[str, Tensor], start: int, stop: int, *, observed: bool = False) -> dict[str, Tensor]:
    """Frames start..stop-1 of a clip batch and the stop-start-1 pairs between them.

    observed=True drops the labels and the metadata: what a rollout or TTT may look at.
    """
    unknown = sorted(set(batch) - set(FRAME_KEYS) - set(PAIR_KEYS) - set(META_KEYS))
    if unknown:
        raise ValueError(f"clip batch has keys {unknown} that clip_slice does not know how to cut in time; "
                         f"known: frame {FRAME_KEYS}, pair {PAIR_KEYS}, meta {META_KEYS}")
    if "frames" not in batch:
        raise ValueError(f"clip batch needs 'frames' [B,L,3,H,W]; got keys {sorted(batch)}")
    length = batch["frames"].shape[1]
    if not 0 <= start < stop <= length:
        raise ValueError(f"bad clip window [{start}, {stop}) for a batch of {length} frames")
    out = {}
    for key, value in batch.items():
        if observed and (key in LABEL_KEYS or key in META_KEYS):
            continue
        if key in FRAME_KEYS:
            out[key] = value[:, start:stop]
        elif key in PAIR_KEYS:
            out[key] = value[:, start:stop - 1]
        else:
            out[key] = value
    return out


def window_indices(target: int, length: int) -> list[int]:
    """Frame indices of the `length` frames before `target`, the first one repeated when too few."""
    return [max(0, target - length + i) for i in range(length)]


def stack_windows(seq: Tensor, targets: Sequence[int], length: int) -> Tensor:
    """seq [B,T,...] -> windows [n*B,length,...] of the frames before each target (targets major)."""
    return torch.cat([seq[:, window_indices(j, length)] for j in targets], dim=0)


def stack_frames(seq: Tensor, index: Sequence[int]) -> Tensor:
    """seq [B,T,...] -> [n*B,...] of the given frames (the order of stack_windows)."""
    return torch.cat([seq[:, j] for j in index], dim=0)


def history_windows(batch: Mapping[str, Tensor], targets: Sequence[int], length: int) -> dict[str, Tensor]:
    """The observed `length` real frames before each target frame, stacked: [n*B,length,...] (targets major).

    What a teacher-forced (1-step) prediction of each target may read; every target needs a full history.
    """
    if any(j < length for j in targets):
        raise ValueError(f"targets {list(targets)} need {length} real frames before them")
    windows = [clip_slice(batch, j - length, j, observed=True) for j in targets]
    return {k: torch.cat([w[k] for w in windows], dim=0) for k in windows[0]}
