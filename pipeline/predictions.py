"""The schema of data/predictions.h5: written by infer, read by evaluate (one module knows the layout).

    video_index                     int64 [N]          CLEVRER ids of the evaluated videos
    <method>/rollout                uint8 [N,horizon,H,W,3]  frames context..context+horizon-1, fed back
    <method>/step1                  uint8 [N,horizon,H,W,3]  the same frames, each from real history
    model/collision, model_ttt/collision   float32 [N,horizon]  collision logits of the rollout
    model/collision_teacher         float32 [N,T-model_context] logits of frames model_context..T-1, each
                                            predicted from the real frames before it (every frame with history)
    model_ttt/ttt_loss_before, ttt_loss_after   float32 [N]  context loss before / after adaptation
    model_ttt/ttt_best_step, ttt_steps          int32 [N];   model_ttt/ttt_diverged  uint8 [N]
    model_ttt/ttt_grad_norm                     float32 [N]  gradient norm of the first TTT step
    attrs: split, context, horizon, frames (T), model_context, arch, flow_backend, methods (JSON list),
           ttt (JSON), settings (JSON)

Methods: the model (`model`, `model_ttt`), the non-learned predictors of pipeline.baselines
(`copy_last`, `flow_extrap`, `flow_advect`) and the reference `vae_recon` (its rollout and step1 are the
same frames: the VAE's reconstruction of the truth). uint8 like the true frames, so metrics see what a
viewer sees. Datasets are gzip-compressed with one frame per chunk: equal predictions give equal bytes.
Nothing time- or machine-dependent is stored (timings go to the stage's log).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

__all__ = ["MODEL_METHODS", "BASELINES", "REFERENCES", "METHODS", "JSON_ATTRS", "KINDS", "to_uint8", "PredictionWriter",
           "read_attrs"]

MODEL_METHODS = ("model", "model_ttt")
BASELINES = ("copy_last", "flow_extrap", "flow_advect")
REFERENCES = ("vae_recon",)
METHODS = MODEL_METHODS + BASELINES + REFERENCES
JSON_ATTRS = ("methods", "ttt", "settings")
KINDS = ("rollout", "step1")


def to_uint8(frames: Tensor) -> np.ndarray:
    """Frames [...,3,H,W] in [0,1] -> uint8 [...,H,W,3] (rounded, clipped)."""
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"to_uint8: frames must be [...,3,H,W], got {tuple(frames.shape)}")
    x = frames.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().cpu().numpy()


class PredictionWriter:
    """Creates the datasets of an open predictions.h5 and fills them batch by batch."""

    def __init__(self, f: h5py.File, *, methods: list[str], videos: int, horizon: int, frame_shape: tuple[int, int],
                 teacher_frames: int, teacher_forced: bool = True):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown prediction methods {unknown}; known: {list(METHODS)}")
        H, W = frame_shape
        self.f, self.methods, self.horizon = f, list(methods), horizon
        self.dsets: dict[tuple[str, str], h5py.Dataset] = {}
        for m in methods:
            g = f.create_group(m)
            for kind in KINDS if teacher_forced else ("rollout",):
                self.dsets[m, kind] = g.create_dataset(kind, shape=(videos, horizon, H, W, 3), dtype="uint8",
                                                       chunks=(1, 1, H, W, 3), compression="gzip",
                                                       compression_opts=1, shuffle=False)
            if m in MODEL_METHODS:
                self.dsets[m, "collision"] = g.create_dataset("collision", shape=(videos, horizon), dtype="float32")
        if "model" in methods and teacher_forced:
            self.dsets["model", "collision_teacher"] = f["model"].create_dataset(
                "collision_teacher", shape=(videos, teacher_frames), dtype="float32")
        self.video_index = f.create_dataset("video_index", shape=(videos,), dtype="int64")

    def frames(self, method: str, kind: str, rows: slice, frames: Tensor) -> None:
        """Store predicted frames [b,horizon,3,H,W] of `method` (kind rollout or step1); non-finite ones are an error."""
        if not torch.isfinite(frames).all():
            raise FloatingPointError(f"{method} {kind} predictions contain NaN or inf (videos {rows.start}.."
                                     f"{rows.stop - 1})")
        self.dsets[method, kind][rows] = to_uint8(frames)

    def logits(self, method: str, key: str, rows: slice, logits: Tensor) -> None:
        """Store collision logits ([b,horizon] rollout or [b,T-model_context] teacher-forced)."""
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"{method} {key} logits contain NaN or inf (videos {rows.start}..{rows.stop - 1})")
        self.dsets[method, key][rows] = logits.detach().float().cpu().numpy()

    def ttt_stats(self, columns: dict[str, np.ndarray]) -> None:
        """Per-video TTT statistics under model_ttt/ (name -> [N] array)."""
        for name, values in columns.items():
            self.f["model_ttt"].create_dataset(name, data=values)

    def finish(self, **attrs) -> None:
        """Write the file's attrs (JSON-encoding the structured ones)."""
        for k, v in attrs.items():
            self.f.attrs[k] = json.dumps(v) if k in JSON_ATTRS else v


def read_attrs(f: h5py.File, path: str | Path) -> dict:
    """The attrs of an open predictions.h5, JSON decoded; a missing one names the file."""
    attrs = {k: (json.loads(v) if k in JSON_ATTRS else v) for k, v in f.attrs.items()}
    for key in ("methods", "context", "horizon", "split", "model_context", "frames"):
        if key not in attrs:
            raise ValueError(f"{path}: attribute {key!r} missing; was it written by the infer stage? (re-run infer)")
    return attrs
