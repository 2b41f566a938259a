"""Optical flow backends: torchvision RAFT (pretrained, from the torch hub cache), OpenCV DIS, exact GT.

Every backend maps a batch of frame pairs to the forward and backward flow of each pair:
`backend(pairs) -> (fwd, bwd)`, fwd [B,2,H,W] (first -> second, on the first frame's grid) and
bwd [B,2,H,W] (second -> first, on the second frame's grid), float32 pixels on `backend.device`.

RAFT weights are never downloaded here: `build_backend` looks for the file torchvision would use in the
current torch hub dir (<hub>/checkpoints/<basename of weights.url>; the flow stage sets the hub dir to the
pretrained stage's models/pretrained/flow/hub) and, when it is missing or unreadable,
falls back to `flow.fallback` with a loud warning; the choice and the reason are returned in
`BackendInfo` for the stage report. Random RAFT weights are never used.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import Flow
from pipeline.flow.ops import resize_flow
from pipeline.pretrained import hub_path, torchvision_weights

log = logging.getLogger(__name__)

RAFT_BACKENDS = ("raft_large", "raft_small")
RAFT_MIN_SIDE = 128  # RAFT's 4-level correlation pyramid at 1/8 resolution needs >= 16 cells a side
DIS_PRESETS = {"ultrafast": "DISOPTICAL_FLOW_PRESET_ULTRAFAST", "fast": "DISOPTICAL_FLOW_PRESET_FAST",
               "medium": "DISOPTICAL_FLOW_PRESET_MEDIUM"}


class FlowBackendError(RuntimeError):
    """A backend that cannot run on the given input (e.g. `gt` without exact flow)."""


@dataclass(frozen=True)
class PairBatch:
    """A batch of frame pairs as indices into distinct frames, so a frame shared by pairs is stored once.

    Pair i is (frames[src[i]], frames[dst[i]]), frame t then frame t+1. gt fields are set when the
    data carries exact flow. Build with `from_clips` (consecutive frames) or `from_pairs`.
    """
    frames: np.ndarray  # uint8 [F,H,W,3]
    src: np.ndarray  # int64 [B], frame t of each pair
    dst: np.ndarray  # int64 [B], frame t+1 of each pair
    gt_fwd: np.ndarray | None = None  # float [B,2,H,W], t -> t+1 on frame t's grid
    gt_bwd: np.ndarray | None = None  # float [B,2,H,W], t+1 -> t on frame t+1's grid

    def __post_init__(self):
        f = self.frames
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F,H,W,3], got {f.dtype} {f.shape}")
        if self.src.shape != self.dst.shape or self.src.ndim != 1:
            raise ValueError(f"src and dst must be [B] index arrays, got {self.src.shape} and {self.dst.shape}")
        if len(self.src) and (min(self.src.min(), self.dst.min()) < 0 or max(self.src.max(), self.dst.max()) >= len(f)):
            raise ValueError(f"src/dst index outside the {len(f)} frames")
        want = (len(self.src), 2, *f.shape[1:3])
        for name in ("gt_fwd", "gt_bwd"):
            g = getattr(self, name)
            if g is not None and tuple(g.shape) != want:
                raise ValueError(f"{name} must be {list(want)} to match {len(self.src)} pairs of {f.shape[1:3]} "
                                 f"frames, got {tuple(g.shape)}")

    @classmethod
    def from_pairs(cls, first: np.ndarray, second: np.ndarray, **gt) -> "PairBatch":
        """Pairs (first[i], second[i]), uint8 [B,H,W,3] each."""
        if first.shape != second.shape:
            raise ValueError(f"first and second must have the same shape, got {first.shape} and {second.shape}")
        B = len(first)
        return cls(frames=np.concatenate([first, second]), src=np.arange(B), dst=np.arange(B, 2 * B), **gt)

    @classmethod
    def from_clips(cls, clips: list[np.ndarray], **gt) -> "PairBatch":
        """All consecutive pairs of each clip (uint8 [L+1,H,W,3]), in order."""
        src, start = [], 0
        for clip in clips:
            if len(clip) < 2:
                raise ValueError(f"a clip needs >= 2 frames to make a pair, got {clip.shape}")
            src.append(np.arange(start, start + len(clip) - 1))
            start += len(clip)
        src = np.concatenate(src)
        return cls(frames=np.concatenate(clips), src=src, dst=src + 1, **gt)

    @property
    def first(self) -> np.ndarray:
        return self.frames[self.src]  # [B,H,W,3]

    @property
    def second(self) -> np.ndarray:
        return self.frames[self.dst]  # [B,H,W,3]

    def __len__(self) -> int:
        return len(self.src)


@dataclass(frozen=True)
class BackendInfo:
    """What was asked for, what runs, and why they differ (recorded in flow.h5 attrs and the report)."""
    backend: str  # flow.backend as requested
    backend_used: str  # the backend that actually computes the flow
    fallback_reason: str | None  # why backend_used differs from a RAFT request (None when it doesn't)
    device: str
    num_updates: int | None = None  # RAFT iterations actually used
    weights: str | None = None  # RAFT weights file actually loaded
    note: str | None = None  # e.g. CPU substitution of the RAFT variant

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class FlowBackend:
    """Base class: `backend(pairs) -> (fwd, bwd)`; see the module docstring."""
    name = "base"
    needs_frames = True

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def __call__(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class GTBackend(FlowBackend):
    """The exact flow carried by synthetic data (frames.h5 `gt_fwd`/`gt_bwd`)."""
    name = "gt"
    needs_frames = False

    def __call__(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        if pairs.gt_fwd is None or pairs.gt_bwd is None:
            raise FlowBackendError("flow.backend=gt needs exact flow (frames.h5 datasets gt_fwd/gt_bwd), "
                                   "which only data.source=synthetic provides")
        fwd = torch.from_numpy(np.asarray(pairs.gt_fwd, dtype=np.float32)).to(self.device)  # [B,2,H,W]
        bwd = torch.from_numpy(np.asarray(pairs.gt_bwd, dtype=np.float32)).to(self.device)  # [B,2,H,W]
        return fwd, bwd


class DISBackend(FlowBackend):
    """OpenCV Dense Inverse Search on grayscale frames (CPU), optionally on frames upscaled by `scale`.

    DIS matches patches of a fixed pixel size (8 for `fast` and `medium`); at 64x64 an object is about
    one patch, so its flow bleeds into the floor around it. Upscaling the frames (bicubic) before DIS and
    area-averaging the flow back (vectors divided by the scale) makes the patches smaller than the objects.
    """
    name = "dis"

    def __init__(self, device: torch.device, *, preset: str, scale: int = 1):
        super().__init__(device)
        import cv2

        if preset not in DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; valid: {', '.join(DIS_PRESETS)}")
        if scale < 1:
            raise ValueError(f"DIS scale must be >= 1, got {scale}")
        self._cv2 = cv2
        self.preset, self.scale = preset, scale
        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, DIS_PRESETS[preset]))

    def _flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        flow = self._dis.calc(a, b, None)  # [H*s,W*s,2] float32, a -> b on a's grid
        if self.scale > 1:
            h, w = a.shape[0] // self.scale, a.shape[1] // self.scale
            flow = self._cv2.resize(flow, (w, h), interpolation=self._cv2.INTER_AREA) / self.scale
        return flow.transpose(2, 0, 1)  # [2,H,W]

    def __call__(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        cv2 = self._cv2
        gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in pairs.frames]
        if self.scale > 1:
            gray = [cv2.resize(g, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_CUBIC) for g in gray]
        fwd = np.stack([self._flow(gray[i], gray[j]) for i, j in zip(pairs.src, pairs.dst)])  # [B,2,H,W]
        bwd = np.stack([self._flow(gray[j], gray[i]) for i, j in zip(pairs.src, pairs.dst)])  # [B,2,H,W]
        return torch.from_numpy(fwd).to(self.device), torch.from_numpy(bwd).to(self.device)


def raft_input_size(height: int, width: int, *, min_side: int = RAFT_MIN_SIDE) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upsampled size, padded size) RAFT runs at: upsample so the short side is >= min_side, pad to /8."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    scale = max(1.0, min_side / min(height, width))
    up = (max(min_side, round(height * scale)), max(min_side, round(width * scale)))
    if scale == 1.0:
        up = (height, width)
    padded = (-(-up[0] // 8) * 8, -(-up[1] // 8) * 8)
    return up, padded


class RAFTBackend(FlowBackend):
    """torchvision RAFT (large or small) with pretrained weights loaded from a local file."""

    def __init__(self, device: torch.device, *, variant: str, weights_file: Path, num_updates: int):
        super().__init__(device)
        from torchvision.models import optical_flow

        if variant not in RAFT_BACKENDS:
            raise ValueError(f"unknown RAFT variant {variant!r}; valid: {', '.join(RAFT_BACKENDS)}")
        if num_updates < 1:
            raise ValueError(f"num_updates must be >= 1, got {num_updates}")
        self.name = variant
        self.num_updates = num_updates
        self.weights_file = Path(weights_file)
        model = getattr(optical_flow, variant)(weights=None, progress=False)
        # weights_only=True: a checkpoint is untrusted input (DESIGN §9); torchvision's own loader is not.
        state = torch.load(self.weights_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device)

    def _to_raft_input(self, frames: np.ndarray) -> Tensor:
        """uint8 [F,H,W,3] -> [F,3,h,w] in [-1,1] (weights.transforms()), upsampled and padded for RAFT."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)  # [F,H,W,3] uint8
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [F,3,H,W]
        up, padded = raft_input_size(*x.shape[-2:])
        if up != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=up, mode="bilinear", align_corners=False)
        pad = (0, padded[1] - up[1], 0, padded[0] - up[0])  # right, bottom
        return F.pad(x, pad, mode="replicate") if any(pad) else x

    @torch.inference_mode()
    def _raft(self, img1: Tensor, img2: Tensor) -> Tensor:
        """Flow img1 -> img2 [B,2,h,w] by torchvision's own RAFT.forward (reference for `_pairs`)."""
        return self.model(img1, img2, num_flow_updates=self.num_updates)[-1]

    @torch.inference_mode()
    def _pairs(self, x: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        """Flow x[src] -> x[dst] [B,2,h,w] for RAFT-ready frames x [F,3,h,w], each frame encoded once.

        The same computation as RAFT.forward (feature + context encoders are per-sample: instance
        norm, eval-mode batch norm), but a frame shared by several pairs or by both directions is
        encoded once, and only the final flow is upsampled.
        """
        from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow

        m = self.model
        fmaps = m.feature_encoder(x)  # [F,Cf,h/8,w/8]
        ctx = m.context_encoder(x)  # [F,Cc,h/8,w/8]
        hidden_size = m.update_block.hidden_state_size
        hidden, context = torch.split(ctx[src], [hidden_size, ctx.shape[1] - hidden_size], dim=1)
        hidden, context = torch.tanh(hidden), F.relu(context)
        m.corr_block.build_pyramid(fmaps[src], fmaps[dst])
        B, _, h8, w8 = hidden.shape
        coords0 = make_coords_grid(B, h8, w8).to(x.device)  # [B,2,h/8,w/8]
        coords1 = coords0.clone()
        for _ in range(self.num_updates):
            corr = m.corr_block.index_pyramid(centroids_coords=coords1)
            hidden, delta = m.update_block(hidden, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
        up_mask = None if m.mask_predictor is None else m.mask_predictor(hidden)
        return upsample_flow(flow=coords1 - coords0, up_mask=up_mask)  # [B,2,h,w]

    def __call__(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        H, W = pairs.frames.shape[1:3]
        up, _ = raft_input_size(H, W)
        x = self._to_raft_input(pairs.frames)  # [F,3,h,w]
        src = torch.as_tensor(pairs.src, device=self.device)
        dst = torch.as_tensor(pairs.dst, device=self.device)
        B = len(pairs)
        flow = self._pairs(x, torch.cat([src, dst]), torch.cat([dst, src]))  # [2B,2,h,w]: fwd then bwd
        flow = resize_flow(flow[..., : up[0], : up[1]].float(), (H, W))  # crop the padding, back to the frame grid
        return flow[:B], flow[B:]


def _fallback(flow: Flow, device: torch.device, requested: str, reason: str,
              **info) -> tuple[FlowBackend, BackendInfo]:
    msg = (f"FLOW BACKEND FALLBACK: flow.backend={requested} cannot run: {reason}. "
           f"Using flow.fallback={flow.fallback} instead; this is recorded as backend_used in the flow report.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    backend = _simple_backend(flow.fallback, flow, device)
    return backend, BackendInfo(backend=requested, backend_used=flow.fallback, fallback_reason=reason,
                                device=str(device), **info)


def _simple_backend(name: str, flow: Flow, device: torch.device) -> FlowBackend:
    if name == "dis":
        return DISBackend(device, preset=flow.dis_preset, scale=flow.dis_scale)
    if name == "gt":
        return GTBackend(device)
    raise ValueError(f"unknown non-RAFT backend {name!r}; valid: dis, gt")


def build_backend(flow: Flow, device: torch.device) -> tuple[FlowBackend, BackendInfo]:
    """The backend flow.* asks for on `device`, or the recorded fallback when RAFT weights are missing.

    On CPU a RAFT request runs as `flow.cpu_raft` with `flow.cpu_num_updates` iterations (the CPU
    time budget); on CUDA as requested with `flow.num_updates`. Both are recorded in BackendInfo.
    """
    device = torch.device(device)
    if flow.backend not in RAFT_BACKENDS:
        backend = _simple_backend(flow.backend, flow, device)
        return backend, BackendInfo(backend=flow.backend, backend_used=flow.backend, fallback_reason=None,
                                    device=str(device))
    variant, num_updates, note = flow.backend, flow.num_updates, None
    if device.type == "cpu":
        variant, num_updates = flow.cpu_raft, flow.cpu_num_updates
        note = (f"on CPU flow.backend={flow.backend} runs as flow.cpu_raft={flow.cpu_raft} with "
                f"flow.cpu_num_updates={flow.cpu_num_updates} RAFT iterations (CUDA: {flow.backend}, "
                f"{flow.num_updates} iterations)")
    path = hub_path(variant)
    if not path.is_file():
        reason = (f"pretrained {variant} weights not found at {path}; the pretrained stage provides them "
                  f"(its manifest says why it could not: no network, weights.download: false, a bad mirror); "
                  f"give it network access or a weights.url mirror, or put torchvision's "
                  f"{torchvision_weights(variant).url} in the torch hub cache, and re-run dvc repro")
        return _fallback(flow, device, flow.backend, reason, num_updates=None, note=note)
    try:
        backend = RAFTBackend(device, variant=variant, weights_file=path, num_updates=num_updates)
    except Exception as e:  # corrupt / wrong file: fall back loudly rather than run random weights
        reason = f"could not load {variant} weights from {path}: {type(e).__name__}: {e}"
        return _fallback(flow, device, flow.backend, reason, num_updates=None, note=note)
    info = BackendInfo(backend=flow.backend, backend_used=variant, fallback_reason=None, device=str(device),
                       num_updates=num_updates, weights=str(path), note=note)
    return backend, info
