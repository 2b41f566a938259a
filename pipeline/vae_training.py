"""Frame VAE and flow VAE training with their evaluation reports (stages train_vae, train_flow_vae).

Both VAEs go through one loop (pipeline/training.py) and one report shape (reports/<kind>/metrics.json =
the dvclive summary of the last logged training metrics + `val` and `test` reconstruction metrics).
Encoding the data set to latents is pipeline/latents.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import Params, to_dict
from pipeline.data.datasets import FlowFieldDataset, FrameDataset, has_split
from pipeline.distributed import is_main_process
from pipeline.io import atomic_path, file_digest, write_json
from pipeline.metrics import psnr, ssim
from pipeline.losses import end_point_error, epe_map
from pipeline.models.flow_vae import MOVING_PX, FlowVAE, FlowVAEConfig, flow_vae_loss
from pipeline.models.vae import VAE, VAEConfig, frame_vae_loss
from pipeline.training import TrainConfig, seed_everything, train

FIGURE_COLUMNS = 8        # test videos shown in a reconstruction figure (middle frame / flow field of each)


# --- configs ---------------------------------------------------------------------------------------

def vae_config(params: Params) -> VAEConfig:
    """The frame VAE's architecture from params.vae."""
    v = params.vae
    return VAEConfig(in_channels=3, latent_channels=v.latent_channels, hidden=v.hidden, downsample=v.downsample,
                     patch=v.patch, res_blocks=v.res_blocks, output="sigmoid")


def flow_vae_config(params: Params) -> FlowVAEConfig:
    """The flow VAE's architecture from params.flow_vae."""
    v = params.flow_vae
    return FlowVAEConfig(latent_channels=v.latent_channels, hidden=v.hidden, downsample=v.downsample,
                         patch=v.patch, res_blocks=v.res_blocks, flow_scale=v.flow_scale)


def train_config(section) -> TrainConfig:
    """The loop's settings from a VAE params section (params.vae or params.flow_vae)."""
    return TrainConfig(steps=section.steps, batch=section.batch, lr=section.lr, seed=section.seed,
                       workers=section.workers, warmup=section.lr_warmup, clip_grad=section.clip_grad,
                       ckpt_every=section.ckpt_every, log_every=section.log_every)


def check_resolution(model: VAE, shape: tuple[int, ...], path: str | Path) -> tuple[int, int, int]:
    """Latent shape [C,h,w] for inputs of `shape` (size last); a clear error naming the file when it does not fit."""
    height, width = shape[-2:]
    try:
        return model.latent_shape(height, width)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_reconstruction(model: VAE, dataset: FrameDataset, *, device: torch.device, batch: int) -> dict:
    """Mean PSNR/SSIM of decode(mu) vs the frame over a whole split (the latent models' ceiling)."""
    model.eval()
    psnrs, ssims = [], []
    for x in DataLoader(dataset, batch_size=batch, shuffle=False):
        x = x.to(device)  # [B,3,H,W]
        recon = model.decode(model.encode(x)[0]).clamp(0, 1)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
    p, s = torch.cat(psnrs), torch.cat(ssims)
    return {"psnr": round(p.mean().item(), 4), "ssim": round(s.mean().item(), 5),
            "psnr_min": round(p.min().item(), 4), "frames": len(p)}


@torch.no_grad()
def evaluate_flow_reconstruction(model: FlowVAE, dataset: FlowFieldDataset, *, device: torch.device,
                                 batch: int) -> dict:
    """Plain EPE (pixels) of decode(mu) vs the flow over a split, and on moving pixels only, each vs zero flow.

    Flow is sparse (static background), so `epe_moving` (pixels with |flow| > MOVING_PX) and its
    zero-flow baseline (the mean motion there) show whether the VAE captures the motion at all.
    """
    model.eval()
    sums = dict.fromkeys(("epe", "zero", "epe_moving", "zero_moving"), 0.0)
    pixels = moving = 0
    for flow in DataLoader(dataset, batch_size=batch, shuffle=False):
        flow = flow.to(device).float()  # [B,2,H,W]
        err = epe_map(model.decode(model.encode(flow)[0]), flow)  # [B,H,W]
        mag = epe_map(torch.zeros_like(flow), flow)  # [B,H,W]: the EPE of predicting zero flow
        mask = mag > MOVING_PX
        sums["epe"] += err.sum().item()
        sums["zero"] += mag.sum().item()
        sums["epe_moving"] += err[mask].sum().item()
        sums["zero_moving"] += mag[mask].sum().item()
        pixels, moving = pixels + err.numel(), moving + int(mask.sum())
    epe, zero = sums["epe"] / pixels, sums["zero"] / pixels
    return {"epe": round(epe, 5), "epe_zero_flow": round(zero, 5),
            "epe_relative": round(epe / zero, 5) if zero > 0 else None,
            "epe_moving": round(sums["epe_moving"] / moving, 5) if moving else None,
            "epe_moving_zero_flow": round(sums["zero_moving"] / moving, 5) if moving else None,
            "moving_fraction": round(moving / pixels, 5), "fields": len(dataset)}


# --- figures ---------------------------------------------------------------------------------------

def _middle_items(dataset: FrameDataset | FlowFieldDataset, per_video: int, device: torch.device) -> torch.Tensor:
    """The middle item of each of the first FIGURE_COLUMNS videos, stacked: [n,C,H,W]."""
    n = min(FIGURE_COLUMNS, dataset.num_videos)
    return torch.stack([dataset[v * per_video + per_video // 2] for v in range(n)]).to(device)


def _save_grid(rows: dict[str, torch.Tensor], labels: list[str], title: str, path: str | Path) -> None:
    """PNG atomically at `path`: one row per entry of `rows` (images [n,3,H,W], float in [0,1] or uint8),
    `labels[c]` under column c of the last row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 0.6 + 1.5 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel(labels[c], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def save_recon_figure(model: VAE, dataset: FrameDataset, path: str | Path, *, device: torch.device) -> None:
    """PNG: test frames (top), decode(mu) (middle) and 4x abs error (bottom, PSNR under it), one column per video."""
    x = _middle_items(dataset, dataset.num_frames, device)  # [n,3,H,W]
    recon = model.decode(model.encode(x)[0]).clamp(0, 1)
    rows = {"original": x, "reconstruction": recon, "|error| x4": ((recon - x).abs() * 4).clamp(0, 1)}
    labels = [f"{psnr(recon[c], x[c]).item():.1f} dB" for c in range(len(x))]
    _save_grid(rows, labels, "frame VAE: test frames vs decode(encode(x).mu)", path)


@torch.no_grad()
def save_flow_figure(model: FlowVAE, dataset: FlowFieldDataset, path: str | Path, *, device: torch.device) -> None:
    """PNG: test backward flow (top) vs decode(mu) (bottom, EPE under it), colour-coded with one scale."""
    from torchvision.utils import flow_to_image

    flow = _middle_items(dataset, dataset.num_pairs, device).float()  # [n,2,H,W]
    recon = model.decode(model.encode(flow)[0]).float()
    n = len(flow)
    images = flow_to_image(torch.cat([flow, recon]))  # uint8 [2n,3,H,W]; one colour scale for the batch
    labels = [f"EPE {end_point_error(recon[c:c + 1], flow[c:c + 1]).item():.3f}px" for c in range(n)]
    _save_grid({"flow (bwd)": images[:n], "reconstruction": images[n:]}, labels,
               "flow VAE: test backward flow vs decode(encode(flow).mu)", path)


# --- training stages -------------------------------------------------------------------------------

def read_dvclive_summary(report_dir: str | Path) -> dict:
    """The summary dvclive wrote to report_dir/metrics.json (last logged training metrics); {} if none."""
    path = Path(report_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _train_and_report(params: Params, *, kind: str, section, model: VAE, data_path: Path, train_set: Dataset,
                      test_set: Dataset, loss_fn: Callable, checkpoint: str | Path,
                      evaluate: Callable, save_figure: Callable, val_set: Dataset | None = None) -> dict:
    """Train `model` with the shared loop, then evaluate on val (for choosing) and test and write reports/<kind>/."""
    latent = check_resolution(model, train_set[0].shape, data_path)
    report_dir = params.paths.report_dir(kind)
    result = train(model, train_set, loss_fn, config=train_config(section), checkpoint=checkpoint, kind=kind,
                   model_args=model.config.to_dict(), params={kind: to_dict(section), "device": params.device},
                   report_dir=report_dir, device=params.device, extra={"latent_shape": list(latent)},
                   data_identity={str(data_path): file_digest(data_path)})
    if not is_main_process():
        return {}
    device = next(result.model.parameters()).device
    test = evaluate(result.model, test_set, device=device, batch=section.batch)
    save_figure(result.model, test_set, report_dir / "figures" / "recon.png", device=device)
    metrics = read_dvclive_summary(report_dir)
    if val_set is not None:
        metrics["val"] = evaluate(result.model, val_set, device=device, batch=section.batch)
    metrics.update({"test": test, "latent_shape": list(latent), "device": str(device),
                    "parameters": sum(p.numel() for p in result.model.parameters())})
    write_json(report_dir / "metrics.json", metrics)
    return {**metrics, "run": {"train_seconds": round(result.seconds, 1), "resumed_from": result.resumed_from}}


def train_vae(params: Params) -> dict:
    """Train the frame VAE on frames.h5 train; write models/vae.pt and reports/vae/; return the metrics."""
    v = params.vae
    seed_everything(v.seed)
    model = VAE(vae_config(params))

    def loss_fn(m, x, step):
        return frame_vae_loss(m, x, beta=v.beta, warmup=v.kl_warmup, step=step)

    frames = Path(params.paths.frames)
    return _train_and_report(params, kind="vae", section=v, model=model, data_path=frames,
                             train_set=FrameDataset(frames, "train"), test_set=FrameDataset(frames, "test"),
                             val_set=FrameDataset(frames, "val") if has_split(frames, "val") else None,
                             loss_fn=loss_fn, checkpoint=params.paths.vae, evaluate=evaluate_reconstruction,
                             save_figure=save_recon_figure)


def train_flow_vae(params: Params) -> dict:
    """Train the flow VAE on flow.h5 train `bwd`; write models/flow_vae.pt and reports/flow_vae/; return the metrics."""
    v = params.flow_vae
    seed_everything(v.seed)
    model = FlowVAE(flow_vae_config(params))

    def loss_fn(m, flow, step):
        return flow_vae_loss(m, flow, beta=v.beta, warmup=v.kl_warmup, step=step,
                             moving_weight=v.moving_weight)

    flow_h5 = Path(params.paths.flow)
    return _train_and_report(params, kind="flow_vae", section=v, model=model, data_path=flow_h5,
                             train_set=FlowFieldDataset(flow_h5, "train"), test_set=FlowFieldDataset(flow_h5, "test"),
                             val_set=FlowFieldDataset(flow_h5, "val") if has_split(flow_h5, "val") else None,
                             loss_fn=loss_fn, checkpoint=params.paths.flow_vae, evaluate=evaluate_flow_reconstruction,
                             save_figure=save_flow_figure)
