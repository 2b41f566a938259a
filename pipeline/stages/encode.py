"""Stage encode: frames.h5 + flow.h5 + both VAEs -> data/latents.h5 (per split `z`, `zf`: the VAEs' mu)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.config import load_params
from pipeline.io import atomic_path, resolve_device
from pipeline.models.flow_vae import FlowVAE
from pipeline.models.vae import VAE

PIXELS_PER_BATCH = 2 ** 21  # frames (or flow fields) per forward pass = this / (H*W); 512 at 64x64


@torch.no_grad()
def encode_split(frames: h5py.Group, flow: h5py.Group, out: h5py.Group, *, vae: VAE, flow_vae: FlowVAE,
                 device: torch.device, frames_path: Path, flow_path: Path) -> dict:
    """Encode one split video-chunk by video-chunk into `out` (`z` [N,T,C,h,w], `zf` [N,T-1,Cf,h,w])."""
    if "video" not in frames:
        raise KeyError(f"{frames_path}: split {frames.name!r} has no 'video' dataset")
    if "bwd" not in flow:
        raise KeyError(f"{flow_path}: split {flow.name!r} has no 'bwd' dataset")
    N, T, H, W, _ = frames["video"].shape
    if flow["bwd"].shape != (N, T - 1, 2, H, W):
        raise ValueError(f"{flow_path}: {flow.name}/bwd has shape {flow['bwd'].shape}, expected {(N, T - 1, 2, H, W)} "
                         f"to match {frames_path} video {frames['video'].shape}")
    C, h, w = _latent_shape(vae, H, W, frames_path)
    Cf, hf, wf = _latent_shape(flow_vae, H, W, flow_path)
    z = out.create_dataset("z", shape=(N, T, C, h, w), dtype="float32", chunks=(1, T, C, h, w))
    zf = out.create_dataset("zf", shape=(N, T - 1, Cf, hf, wf), dtype="float32", chunks=(1, T - 1, Cf, hf, wf))
    videos_per_batch = max(1, PIXELS_PER_BATCH // (H * W * T))
    for v0 in range(0, N, videos_per_batch):
        v1 = min(N, v0 + videos_per_batch)
        video = torch.from_numpy(frames["video"][v0:v1]).to(device)  # uint8 [n,T,H,W,3]
        x = video.permute(0, 1, 4, 2, 3).flatten(0, 1).float().div_(255.0)  # [n*T,3,H,W]
        z[v0:v1] = vae.encode(x)[0].float().reshape(v1 - v0, T, C, h, w).cpu().numpy()
        bwd = torch.from_numpy(flow["bwd"][v0:v1].astype(np.float32)).to(device)  # [n,T-1,2,H,W]
        mu = flow_vae.encode(bwd.flatten(0, 1))[0]  # [n*(T-1),Cf,hf,wf]
        zf[v0:v1] = mu.float().reshape(v1 - v0, T - 1, Cf, hf, wf).cpu().numpy()
    return {"videos": N, "z": [N, T, C, h, w], "zf": [N, T - 1, Cf, hf, wf]}


def _latent_shape(model: VAE, H: int, W: int, path: Path) -> tuple[int, int, int]:
    try:
        return model.latent_shape(H, W)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def encode_latents(frames_h5: str | Path, flow_h5: str | Path, vae_path: str | Path, flow_vae_path: str | Path,
                   out_h5: str | Path, *, device: str = "auto") -> dict:
    """Write latents.h5: per split the frame VAE's mu of every frame and the flow VAE's mu of every `bwd` field."""
    frames_h5, flow_h5 = Path(frames_h5), Path(flow_h5)
    for path in (frames_h5, flow_h5):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input file not found")
    dev = resolve_device(device)
    vae_ckpt = load_checkpoint(vae_path, kind="vae", map_location=dev)
    flow_ckpt = load_checkpoint(flow_vae_path, kind="flow_vae", map_location=dev)
    vae = model_from_checkpoint(vae_ckpt, "vae", path=vae_path, map_location=dev)
    flow_vae = model_from_checkpoint(flow_ckpt, "flow_vae", path=flow_vae_path, map_location=dev)
    t0 = time.perf_counter()
    report = {"splits": {}}
    with h5py.File(frames_h5, "r") as frames, h5py.File(flow_h5, "r") as flow, atomic_path(out_h5) as tmp:
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
                                                       flow_path=flow_h5)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["device"] = str(dev)
    return report


def main() -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun one process encodes; it is cheap next to training
        return
    params = load_params()
    p = params.paths
    report = encode_latents(p.frames, p.flow, p.vae, p.flow_vae, p.latents, device=params.device)
    shapes = ", ".join(f"{s}: z{r['z']} zf{r['zf']}" for s, r in report["splits"].items())
    print(f"encode: {shapes} in {report['seconds']}s on {report['device']} -> {p.latents}")


if __name__ == "__main__":
    main()
