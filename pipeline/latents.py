"""The encode stage's work: every frame and flow field of frames.h5 / flow.h5 to its VAE latent (latents.h5).

latents.h5 per split: `z` float32 [N,T,C,h,w] (frame VAE mu), `zf` float32 [N,T-1,Cf,h,w] (flow VAE mu of
`bwd`); root attrs with the two VAEs' model args. Streamed video-chunk by video-chunk; under torchrun each
rank encodes its shard of the videos (pipeline.sharding).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.io import atomic_path, open_h5, resolve_device
from pipeline.models.flow_vae import FlowVAE, build_flow_vae
from pipeline.models.vae import VAE, build_vae
from pipeline.sharding import Shard, write_rows
from pipeline.vae_training import check_resolution

PIXELS_PER_BATCH = 2 ** 21  # frames (or flow fields) per forward pass = this / (H*W); 512 at 64x64


@torch.no_grad()
def encode_split(frames: h5py.Group, flow: h5py.Group, out: h5py.Group, *, vae: VAE, flow_vae: FlowVAE,
                 device: torch.device, frames_path: Path, flow_path: Path, shard: Shard = Shard()) -> dict:
    """Encode one split video-chunk by video-chunk into `out` (`z` [n,T,C,h,w], `zf` [n,T-1,Cf,h,w]).

    n is the shard's share of the split's N videos (all of them by default, see pipeline.sharding).
    """
    if "video" not in frames:
        raise KeyError(f"{frames_path}: split {frames.name!r} has no 'video' dataset")
    if "bwd" not in flow:
        raise KeyError(f"{flow_path}: split {flow.name!r} has no 'bwd' dataset")
    N, T, H, W, _ = frames["video"].shape
    if flow["bwd"].shape != (N, T - 1, 2, H, W):
        raise ValueError(f"{flow_path}: {flow.name}/bwd has shape {flow['bwd'].shape}, expected {(N, T - 1, 2, H, W)} "
                         f"to match {frames_path} video {frames['video'].shape}")
    C, h, w = check_resolution(vae, (H, W), frames_path)
    Cf, hf, wf = check_resolution(flow_vae, (H, W), flow_path)
    rows = shard.videos(N)  # global video index of each output row
    n = len(rows)
    write_rows(out, shard, rows)
    z = out.create_dataset("z", shape=(n, T, C, h, w), dtype="float32", chunks=(1, T, C, h, w) if n else None)
    zf = out.create_dataset("zf", shape=(n, T - 1, Cf, hf, wf), dtype="float32",
                            chunks=(1, T - 1, Cf, hf, wf) if n else None)
    videos_per_batch = max(1, PIXELS_PER_BATCH // (H * W * T))
    for v0 in range(0, n, videos_per_batch):
        v1 = min(n, v0 + videos_per_batch)
        pick = slice(rows[v0], rows[v1 - 1] + 1, shard.world)  # this chunk's videos, global indices
        video = torch.from_numpy(frames["video"][pick]).to(device)  # uint8 [b,T,H,W,3]
        x = video.permute(0, 1, 4, 2, 3).flatten(0, 1).float().div_(255.0)  # [b*T,3,H,W]
        z[v0:v1] = vae.encode(x)[0].float().reshape(v1 - v0, T, C, h, w).cpu().numpy()
        bwd = torch.from_numpy(flow["bwd"][pick].astype(np.float32)).to(device)  # [b,T-1,2,H,W]
        mu = flow_vae.encode(bwd.flatten(0, 1))[0]  # [b*(T-1),Cf,hf,wf]
        zf[v0:v1] = mu.float().reshape(v1 - v0, T - 1, Cf, hf, wf).cpu().numpy()
    return {"videos": N, "z": [N, T, C, h, w], "zf": [N, T - 1, Cf, hf, wf]}


def encode_latents(frames_h5: str | Path, flow_h5: str | Path, vae_path: str | Path, flow_vae_path: str | Path,
                   out_h5: str | Path, *, device: str = "auto", shard: Shard = Shard()) -> dict:
    """Write latents.h5: per split the frame VAE's mu of every frame and the flow VAE's mu of every `bwd` field.

    `out_h5` is written atomically; with a `shard` of several, only its videos (pipeline.sharding).
    """
    frames_h5, flow_h5 = Path(frames_h5), Path(flow_h5)
    dev = resolve_device(device)
    vae_ckpt = load_checkpoint(vae_path, kind="vae", map_location=dev)
    flow_ckpt = load_checkpoint(flow_vae_path, kind="flow_vae", map_location=dev)
    vae = model_from_checkpoint(vae_ckpt, build_vae, path=vae_path, map_location=dev)
    flow_vae = model_from_checkpoint(flow_ckpt, build_flow_vae, path=flow_vae_path, map_location=dev)
    t0 = time.perf_counter()
    report = {"splits": {}}
    with open_h5(frames_h5, what="frames file") as frames, open_h5(flow_h5, what="flow file") as flow, \
            atomic_path(out_h5) as tmp:
        splits = [s for s in ("train", "val", "test") if s in frames]
        if not splits:
            raise KeyError(f"{frames_h5}: no split groups (train/val/test); found {sorted(frames.keys())}")
        missing = [s for s in splits if s not in flow]
        if missing:
            raise KeyError(f"{flow_h5}: splits {missing} present in {frames_h5} are missing; found {sorted(flow.keys())}")
        with h5py.File(tmp, "w") as out:
            out.attrs["vae_model_args"] = json.dumps(vae.config.to_dict(), sort_keys=True)
            out.attrs["flow_vae_model_args"] = json.dumps(flow_vae.config.to_dict(), sort_keys=True)
            out.attrs["vae_step"], out.attrs["flow_vae_step"] = vae_ckpt["step"], flow_ckpt["step"]
            out.attrs["latent"] = "mu"
            for split in splits:
                report["splits"][split] = encode_split(frames[split], flow[split], out.create_group(split), vae=vae,
                                                       flow_vae=flow_vae, device=dev, frames_path=frames_h5,
                                                       flow_path=flow_h5, shard=shard)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["device"] = str(dev)
    return report
