"""Shared test helpers (not a test module): a small real temporal model and synthetic scenes with exact flow.

`tiny_params_dict` is params.yaml with the `tests` profile of pipeline/profiles.yaml; `override` merges a
test's changes into a params mapping (unknown keys too, for the tests that check they are refused).
`ToyTemporal` implements the temporal contract (rollout, ttt_parameters, ttt_loss) and records what it was
shown; `make_batch` is a clip batch with a square moving right.

The one synthetic-data factory of the suite: `moving_squares` makes N videos of textured squares moving at
integer velocities over a static textured background, with their exact forward/backward flow, visibility,
boxes and collision labels; `squares_splits` makes them per split (with the extract stage's video ids);
`write_frames_h5` / `write_flow_h5` write them in the layouts of docs/ARCHITECTURE.md ("HDF5 files");
`write_clip_files` is the frames.h5 + flow.h5 pair the infer / evaluate / fault tests use.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import h5py
import numpy as np
import torch
import yaml
from torch import nn

from pipeline.data import layout
from pipeline.flow import warp
from pipeline.profiles import apply_profile

REPO = Path(__file__).resolve().parents[1]


def tiny_params_dict(profile: str = "tests") -> dict:
    """The repo's params.yaml with a profile of pipeline/profiles.yaml applied (default: the suite's tiny one)."""
    merged, _ = apply_profile(yaml.safe_load((REPO / "params.yaml").read_text()), profile)
    return merged


def override(base: dict, over: dict) -> dict:
    """A deep copy of a params mapping with `over` merged in (keys it lacks are added)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = override(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ToyTemporal(nn.Module):
    """A small real model implementing the temporal contract (rollout, ttt_parameters, ttt_loss).

    Next frame = warp(last frame, flow_head(last two frames)) + residual(last frame); collision logit from
    pooled features. It records every frame count and whether any input was non-finite, so tests can prove
    what TTT and the rollout were shown.
    """

    def __init__(self, context: int = 2, hidden: int = 8, flow_head: bool = True):
        super().__init__()
        self.context = context
        self.flow_head = nn.Sequential(nn.Conv2d(6, hidden, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(hidden, 2, 3, padding=1)) if flow_head else None
        self.residual = nn.Conv2d(3, 3, 3, padding=1)
        self.collision_head = nn.Linear(3, 1)
        self.seen_lengths: list[int] = []
        self.saw_nonfinite = False

    def _record(self, batch):
        frames = batch["frames"]
        self.seen_lengths.append(frames.shape[1])
        for v in batch.values():
            if v.is_floating_point() and not torch.isfinite(v).all():
                self.saw_nonfinite = True

    def step(self, prev, cur):
        """Predict the next frame from frames prev, cur [B,3,H,W] -> (frame, collision logit [B])."""
        nxt = cur
        if self.flow_head is not None:
            nxt = warp(cur, self.flow_head(torch.cat([prev, cur], dim=1)))
        nxt = (nxt + 0.1 * self.residual(cur)).clamp(0, 1)
        return nxt, self.collision_head(nxt.mean(dim=(-2, -1))).squeeze(-1)

    def rollout(self, batch, horizon):
        self._record(batch)
        frames = batch["frames"][:, : self.context]  # [B,context,3,H,W]
        prev, cur = frames[:, -2] if frames.shape[1] > 1 else frames[:, -1], frames[:, -1]
        out, logits = [], []
        for _ in range(horizon):
            nxt, logit = self.step(prev, cur)
            out.append(nxt)
            logits.append(logit)
            prev, cur = cur, nxt
        return {"frames": torch.stack(out, 1), "collision": torch.stack(logits, 1)}

    def ttt_parameters(self, which):
        if which == "all":
            return list(self.parameters())
        return None if self.flow_head is None else list(self.flow_head.parameters())

    def ttt_loss(self, batch, kind):
        self._record(batch)
        frames = batch["frames"]  # [B,T,3,H,W]
        preds = [self.step(frames[:, t - 2], frames[:, t - 1])[0] for t in range(2, frames.shape[1])]
        return (torch.stack(preds, 1) - frames[:, 2:]).abs().mean()


def make_batch(B=2, L=7, H=16, W=16, seed=0):
    """A clip batch with a square moving one pixel right per frame (keys as ClipDataset)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, L, 3, H, W, generator=g) * 0.1
    for t in range(L):
        frames[:, t, :, 4:9, 2 + t:7 + t] = 0.9
    return {"frames": frames, "collision": torch.zeros(B, L), "boxes": torch.zeros(B, L, 1, 4),
            "box_mask": torch.ones(B, L, 1), "flow_bwd": torch.zeros(B, L - 1, 2, H, W),
            "flow_fwd": torch.zeros(B, L - 1, 2, H, W), "occ": torch.ones(B, L - 1, 1, H, W),
            "video_index": torch.arange(B)}


# ---- synthetic scenes: textured squares at integer velocities over a static textured background ------------

@dataclass(frozen=True)
class Square:
    """A square of `size` px with its top-left corner at `top_left` (y, x) in frame 0, moving `velocity`
    (vx, vy) px per frame; squares listed later are drawn on top."""
    top_left: tuple[int, int]
    velocity: tuple[int, int]
    size: int


def smooth_texture(rng: np.random.Generator, H: int, W: int, sigma: float = 1.5) -> np.ndarray:
    """Blurred RGB noise in [0,1], [H,W,3]: the structure optical flow needs (pure noise is untrackable)."""
    img = cv2.GaussianBlur(rng.random((H, W, 3)).astype(np.float32), (0, 0), sigma)
    return (img - img.min()) / max(float(img.max() - img.min()), 1e-6)


def random_squares(rng: np.random.Generator, T: int, H: int, W: int, *, count: int = 2, size: int | None = None,
                   max_speed: int = 2) -> list[Square]:
    """`count` squares with a non-zero integer velocity (|vx|, |vy| <= max_speed) that stay inside the frame
    for all T frames."""
    size = size or max(4, min(H, W) // 4)
    if T > 1 and (T - 1) > max(W, H) - size:
        raise ValueError(f"random_squares: a {size} px square cannot move for {T} frames inside {H}x{W}")
    out = []
    for _ in range(count):
        v = np.zeros(2, int)
        while not v.any():
            v = rng.integers(-max_speed, max_speed + 1, 2)
            for axis, extent in enumerate((W, H)):  # slow down until the whole path fits in the frame
                while abs(v[axis]) * (T - 1) > extent - size:
                    v[axis] -= np.sign(v[axis])
        vx, vy = int(v[0]), int(v[1])
        x0 = int(rng.integers(max(0, -vx * (T - 1)), W - size - max(0, vx * (T - 1)) + 1))
        y0 = int(rng.integers(max(0, -vy * (T - 1)), H - size - max(0, vy * (T - 1)) + 1))
        out.append(Square((y0, x0), (vx, vy), size))
    return out


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ya, xa, sa), (yb, xb, sb) = a, b
    return xa < xb + sb and xb < xa + sa and ya < yb + sb and yb < ya + sa


def moving_squares(N: int, T: int, H: int, W: int, *, squares: Sequence[Sequence[Square]] | None = None,
                   count: int = 2, size: int | None = None, max_speed: int = 2, num_boxes: int | None = None,
                   seed: int = 0, background: tuple[float, float] = (0.25, 0.75),
                   foreground: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    """N videos of textured squares sliding over a static textured background, with exact ground truth.

    `squares[n]` lists video n's squares (default: `random_squares(count, size, max_speed)` per video); every
    square must stay inside the frame. Textures are smooth noise scaled to `background` / `foreground`
    (fractions of 255). Returns
      video     uint8   [N,T,H,W,3]
      fwd       float32 [N,T-1,2,H,W]  flow t -> t+1 on frame t's grid (pixels, x then y)
      bwd       float32 [N,T-1,2,H,W]  flow t+1 -> t on frame t+1's grid
      vis       bool    [N,T-1,H,W]    on frame t+1's grid: the pixel's content was visible in frame t
      boxes     float32 [N,T,K,4]      normalised xyxy of square k (K = num_boxes, default the most squares)
      box_mask  uint8   [N,T,K]        1 where box k is a square of the video
      collision uint8   [N,T]          1 at a frame where two squares start to overlap (contact onset)
    """
    rng = np.random.default_rng(seed)
    if squares is None:
        squares = [random_squares(rng, T, H, W, count=count, size=size, max_speed=max_speed) for _ in range(N)]
    if len(squares) != N:
        raise ValueError(f"moving_squares: {len(squares)} square lists for {N} videos")
    K = num_boxes if num_boxes is not None else max((len(s) for s in squares), default=0)
    out = {"video": np.empty((N, T, H, W, 3), np.uint8), "fwd": np.zeros((N, T - 1, 2, H, W), np.float32),
           "bwd": np.zeros((N, T - 1, 2, H, W), np.float32), "vis": np.ones((N, T - 1, H, W), bool),
           "boxes": np.zeros((N, T, K, 4), np.float32), "box_mask": np.zeros((N, T, K), np.uint8),
           "collision": np.zeros((N, T), np.uint8)}
    lo, hi = background
    for n, scene in enumerate(squares):
        if len(scene) > K:
            raise ValueError(f"moving_squares: video {n} has {len(scene)} squares, more than num_boxes={K}")
        bg = ((lo + (hi - lo) * smooth_texture(rng, H, W)) * 255).round().astype(np.uint8)
        fg = [((foreground[0] + (foreground[1] - foreground[0]) * smooth_texture(rng, q.size, q.size)) * 255)
              .round().astype(np.uint8) for q in scene]
        layer = np.full((T, H, W), -1)  # which square is on top at each pixel (-1: background)
        for t in range(T):
            frame = bg.copy()
            for k, q in enumerate(scene):
                y, x = q.top_left[0] + q.velocity[1] * t, q.top_left[1] + q.velocity[0] * t
                if not (0 <= y <= H - q.size and 0 <= x <= W - q.size):
                    raise ValueError(f"moving_squares: video {n} square {k} leaves the {H}x{W} frame at t={t}")
                frame[y:y + q.size, x:x + q.size] = fg[k]
                layer[t, y:y + q.size, x:x + q.size] = k
                out["boxes"][n, t, k] = [x / W, y / H, (x + q.size) / W, (y + q.size) / H]
                out["box_mask"][n, t, k] = 1
            out["video"][n, t] = frame
            if t > 0:
                now = [(q.top_left[0] + q.velocity[1] * t, q.top_left[1] + q.velocity[0] * t, q.size) for q in scene]
                before = [(y - q.velocity[1], x - q.velocity[0], s) for (y, x, s), q in zip(now, scene)]
                out["collision"][n, t] = any(_overlap(now[i], now[j]) and not _overlap(before[i], before[j])
                                             for i in range(len(scene)) for j in range(i + 1, len(scene)))
        vel = np.array([(0, 0)] + [q.velocity for q in scene], np.float32)  # row k + 1: square k (x, y)
        ys, xs = np.mgrid[0:H, 0:W]
        for t in range(T - 1):
            out["fwd"][n, t] = vel[layer[t] + 1].transpose(2, 0, 1)
            out["bwd"][n, t] = -vel[layer[t + 1] + 1].transpose(2, 0, 1)
            # the source of a pixel of t+1 (its layer moved by v) shows that same layer at t
            v = vel[layer[t + 1] + 1].astype(int)  # [H,W,2]
            out["vis"][n, t] = layer[t, ys - v[..., 1], xs - v[..., 0]] == layer[t + 1]
    return out


def video_ids(counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Each split's CLEVRER video ids as the extract stage stores them (pipeline.data.layout.split_ids):
    train 0.., val right after train, test 10000.."""
    ids = layout.split_ids({k: v for k, v in counts.items() if k in ("train", "val", "test")})
    return {split: np.asarray(ids.get(split, ("", []))[1], np.int64) for split in counts}


def squares_splits(counts: Mapping[str, int], *, T: int = 8, H: int = 32, W: int = 32, seed: int = 0,
                   **kw) -> dict[str, dict[str, np.ndarray]]:
    """`moving_squares` for each split (split i drawn with seed + i) with its `video_index` (`video_ids`)."""
    ids = video_ids(counts)
    return {split: {**moving_squares(n, T, H, W, seed=seed + i, **kw), "video_index": ids[split]}
            for i, (split, n) in enumerate(counts.items())}


ENCODE_SPLITS = {"train": 3, "val": 1, "test": 2}  # the `encode_inputs` fixture's videos per split


def write_frames_h5(path, scenes: Mapping[str, Mapping[str, np.ndarray]], *, with_gt: bool = True,
                    source: str | None = None) -> Path:
    """frames.h5 (docs/ARCHITECTURE.md) of scenes {split: moving_squares(...)}; `gt_*` only with_gt (synthetic).

    Root attrs as the extract stage sets them; `video_index` from the scene, else `video_ids`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = video_ids({split: len(s["video"]) for split, s in scenes.items()})
    with h5py.File(path, "w") as f:
        first = next(iter(scenes.values()))["video"]
        _, T, H, W, _ = first.shape
        f.attrs.update(source=source or ("synthetic" if with_gt else "clevrer"), resolution=[H, W], stride=1,
                       frames=T, params_hash="test", has_gt=with_gt)
        for split, s in scenes.items():
            g = f.create_group(split)
            g.create_dataset("video", data=s["video"], chunks=(1, 1, H, W, 3))
            g.create_dataset("collision", data=s["collision"].astype(np.uint8))
            g.create_dataset("boxes", data=s["boxes"].astype(np.float32))
            g.create_dataset("box_mask", data=s["box_mask"].astype(np.uint8))
            g.create_dataset("video_index", data=np.asarray(s.get("video_index", ids[split]), np.int64))
            if with_gt:
                g.create_dataset("gt_fwd", data=s["fwd"].astype(np.float16))
                g.create_dataset("gt_bwd", data=s["bwd"].astype(np.float16))
                g.create_dataset("gt_vis", data=s["vis"].astype(np.uint8) * 255)
    return path


def write_flow_h5(path, scenes: Mapping[str, Mapping[str, np.ndarray]], *, backend: str = "gt") -> Path:
    """flow.h5 (docs/ARCHITECTURE.md) of scenes {split: moving_squares(...)}: their exact flow and visibility,
    as the flow stage's `backend` would write it (float16 flow, occ = visibility x255)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(backend=backend, backend_used=backend, fallback_reason="")
        for split, s in scenes.items():
            g = f.create_group(split)
            g.create_dataset("fwd", data=s["fwd"].astype(np.float16))
            g.create_dataset("bwd", data=s["bwd"].astype(np.float16))
            g.create_dataset("occ", data=s["vis"].astype(np.uint8) * 255)
    return path


def clip_squares(n: int, T: int, W: int, speed: int) -> list[Square]:
    """write_clip_files' video n: an 8 px square at (8 + n, 2) moving `speed` px right; in video 0 it runs
    into a resting square at frame min(5, T - 1) (the collision label)."""
    scene = [Square((8 + n, 2), (speed, 0), 8)]
    if n == 0:
        hit = min(5, T - 1)  # first frame where the boxes overlap: 2 + speed * hit + 8 > x0, not at hit - 1
        scene.insert(0, Square((8, 2 + speed * hit + 7), (0, 0), 8))  # drawn first: the mover passes over it
        if scene[0].top_left[1] + 8 > W:
            raise ValueError(f"write_clip_files: W={W} is too narrow for the collision at frame {hit}")
    return scene


def write_clip_files(tmp_path, *, splits=("test",), N=3, T=8, H=32, W=32, speed=2):
    """frames.h5 and flow.h5 with N videos per split: a square per video moving `speed` px right per frame.

    Returns (frames_h5, flow_h5, {split: video uint8 [N,T,H,W,3]}). Video 0 of every split has one collision
    label, at frame 5 (its square hits a resting one); the flow is exact (flow.h5 backend "gt"); video ids as
    `video_ids` (test: 10000..).
    """
    ids = video_ids({split: N for split in splits})
    scenes = {split: {**moving_squares(N, T, H, W, squares=[clip_squares(n, T, W, speed) for n in range(N)],
                                       num_boxes=2, seed=s), "video_index": ids[split]}
              for s, split in enumerate(splits)}
    frames_h5 = write_frames_h5(Path(tmp_path) / "frames.h5", scenes, with_gt=True)
    flow_h5 = write_flow_h5(Path(tmp_path) / "flow.h5", scenes)
    return frames_h5, flow_h5, {split: s["video"] for split, s in scenes.items()}


def section(name: str, **changes):
    """A params section (pipeline.config dataclass) as params.yaml has it, with `changes` applied."""
    import dataclasses

    from pipeline.config import params_from_dict

    params = params_from_dict(yaml.safe_load((REPO / "params.yaml").read_text()))
    return dataclasses.replace(getattr(params, name), **changes)


TINY_VAE = dict(hidden=16, latent_channels=4, patch=2)


def tiny_vae_data(seed: int = 0, n: int = 24, size: int = 16):
    """A TensorDataset of smooth random frames (item: (frame [3,H,W],)); other seeds, other content, same size."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return TensorDataset(x)


def train_tiny_vae(tmp, *, steps: int = 10, data_seed: int = 0, stop_at: int | None = None, callback=None,
                   seed_model: int = 0, device: str = "cpu", **cfg):
    """The shared training loop on a tiny VAE, checkpoints under tmp/models; stop_at simulates a kill there."""
    import hashlib

    from pipeline.models.vae import VAE, VAEConfig, frame_vae_loss
    from pipeline.training import TrainConfig, seed_everything, train

    def stop(step, model):
        if callback is not None:
            callback(step, model)
        if step == stop_at:
            raise KeyboardInterrupt(f"simulated kill after step {step}")

    data = tiny_vae_data(data_seed)
    seed_everything(seed_model)
    model = VAE(VAEConfig(**TINY_VAE))
    config = TrainConfig(**{"steps": steps, "batch": 6, "lr": 2e-3, "warmup": 3, "ckpt_every": 3, "log_every": 2,
                            **cfg})
    identity = {"frames": hashlib.md5(data.tensors[0].numpy().tobytes()).hexdigest()}
    return train(model, data, lambda m, b, step: frame_vae_loss(m, b[0], beta=1e-3, warmup=4, step=step),
                 config=config, checkpoint=tmp / "models" / "vae.pt", kind="vae", model_args=model.config.to_dict(),
                 params={"vae": {"steps": steps}}, report_dir=tmp / "reports" / "vae", device=device,
                 callback=stop if (stop_at is not None or callback is not None) else None, data_identity=identity)
