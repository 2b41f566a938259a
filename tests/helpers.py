"""Shared test helpers (not a test module): a small real temporal model and synthetic clip data.

`tiny_params_dict` is params.yaml with the `tests` profile of pipeline/profiles.yaml; `override` merges a
test's changes into a params mapping (unknown keys too, for the tests that check they are refused).
`ToyTemporal` implements the temporal contract (rollout, ttt_parameters, ttt_loss) and records what it was
shown; `make_batch` is a clip batch with a square moving right; `write_clip_files` writes frames.h5 and
flow.h5 (the layouts of docs/ARCHITECTURE.md) of moving squares with their exact flow.
"""
from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from torch import nn

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


def write_clip_files(tmp_path, *, splits=("test",), N=3, T=8, H=32, W=32, speed=2):
    """frames.h5 and flow.h5 with N videos per split: a square per video moving `speed` px right per frame.

    Returns (frames_h5, flow_h5, {split: video uint8 [N,T,H,W,3]}). Video n of every split has a collision
    label at frame 5 when n == 0.
    """
    rng = np.random.default_rng(0)
    frames_h5, flow_h5 = tmp_path / "frames.h5", tmp_path / "flow.h5"
    videos = {}
    with h5py.File(frames_h5, "w") as f, h5py.File(flow_h5, "w") as fl:
        for s, split in enumerate(splits):
            video = (rng.random((N, T, H, W, 3)) * 40).astype(np.uint8)
            bwd = np.zeros((N, T - 1, 2, H, W), np.float16)
            for n in range(N):
                for t in range(T):
                    video[n, t, 8 + n:16 + n, 2 + speed * t:10 + speed * t] = (220, 60 + 40 * n, 30)
                bwd[n, :, 0] = -speed  # frame t+1 samples frame t at x - speed
            collision = np.zeros((N, T), np.uint8)
            collision[0, min(5, T - 1)] = 1
            g = f.create_group(split)
            g["video"] = video
            g["collision"] = collision
            g["boxes"] = np.zeros((N, T, 2, 4), np.float32)
            g["box_mask"] = np.zeros((N, T, 2), np.uint8)
            g["video_index"] = np.arange(N, dtype=np.int64) + (10000 if split == "test" else 1000 * s)
            h = fl.create_group(split)
            h["bwd"], h["fwd"] = bwd, -bwd
            h["occ"] = np.full((N, T - 1, H, W), 255, np.uint8)
            videos[split] = video
        fl.attrs["backend"] = fl.attrs["backend_used"] = "gt"
    return frames_h5, flow_h5, videos


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
                   seed_model: int = 0, **cfg):
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
                 params={"vae": {"steps": steps}}, report_dir=tmp / "reports" / "vae", device="cpu",
                 callback=stop if (stop_at is not None or callback is not None) else None, data_identity=identity)
