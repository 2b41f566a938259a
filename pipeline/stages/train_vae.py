"""Stage train_vae: frames.h5 train split -> models/vae.pt, reports/vae/ (test PSNR/SSIM, recon.png)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.config import Params, load_params, to_dict
from pipeline.data.datasets import FrameDataset
from pipeline.io import atomic_path, write_json
from pipeline.metrics import psnr, ssim
from pipeline.models.vae import VAE, VAEConfig, frame_vae_loss
from pipeline.training import TrainConfig, is_main_process, seed_everything, shutdown_distributed, train

FIGURE_FRAMES = 8


def vae_config(params: Params) -> VAEConfig:
    """The frame VAE's architecture from params.vae."""
    v = params.vae
    return VAEConfig(in_channels=3, latent_channels=v.latent_channels, hidden=v.hidden, downsample=v.downsample,
                     patch=v.patch, res_blocks=v.res_blocks, output="sigmoid")


def train_config(section) -> TrainConfig:
    """The loop's settings from a VAE params section (vae or flow_vae)."""
    return TrainConfig(steps=section.steps, batch=section.batch, lr=section.lr, seed=section.seed,
                       workers=section.workers, warmup=section.lr_warmup, clip_grad=section.clip_grad,
                       ckpt_every=section.ckpt_every, log_every=section.log_every)


def check_resolution(model: VAE, shape: tuple[int, ...], path: str | Path) -> tuple[int, int, int]:
    """Latent shape for the stored frames; a clear error naming the file when the size does not fit."""
    height, width = shape[-2:]
    try:
        return model.latent_shape(height, width)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


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
def save_recon_figure(model: VAE, dataset: FrameDataset, path: str | Path, *, device: torch.device) -> None:
    """PNG: originals (top row) vs reconstructions (middle) and 4x abs error (bottom), one column per video."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(FIGURE_FRAMES, dataset.num_videos)
    index = [v * dataset.num_frames + dataset.num_frames // 2 for v in range(n)]
    x = torch.stack([dataset[i] for i in index]).to(device)  # [n,3,H,W]
    recon = model.decode(model.encode(x)[0]).clamp(0, 1)
    rows = {"original": x, "reconstruction": recon, "|error| x4": ((recon - x).abs() * 4).clamp(0, 1)}
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 1:
                ax.set_xlabel(f"{psnr(recon[c], x[c]).item():.1f} dB", fontsize=7)
    fig.suptitle("frame VAE: test frames vs decode(encode(x).mu)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_vae(params: Params) -> dict:
    """Train the frame VAE on the train split; write models/vae.pt and reports/vae/; return the metrics."""
    frames = params.paths.frames
    cfg = vae_config(params)
    seed_everything(params.vae.seed)
    model = VAE(cfg)
    train_set = FrameDataset(frames, "train")
    test_set = FrameDataset(frames, "test")
    latent = check_resolution(model, train_set[0].shape, frames)
    report_dir = params.paths.report_dir("vae")
    v = params.vae

    def loss_fn(m, x, step):
        return frame_vae_loss(m, x, beta=v.beta, warmup=v.kl_warmup, step=step)

    result = train(model, train_set, loss_fn, config=train_config(v), checkpoint=params.paths.vae, kind="vae",
                   model_args=cfg.to_dict(), params={"vae": to_dict(v), "device": params.device},
                   report_dir=report_dir, device=params.device, extra={"latent_shape": list(latent)})
    if not is_main_process():
        return {}
    device = next(result.model.parameters()).device
    test = evaluate_reconstruction(result.model, test_set, device=device, batch=v.batch)
    save_recon_figure(result.model, test_set, report_dir / "figures" / "recon.png", device=device)
    metrics = _dvclive_summary(report_dir)
    metrics.update({"test": test, "latent_shape": list(latent), "train_seconds": round(result.seconds, 1),
                    "resumed_from": result.resumed_from, "device": str(device),
                    "parameters": sum(p.numel() for p in result.model.parameters())})
    write_json(report_dir / "metrics.json", metrics)
    return metrics


def _dvclive_summary(report_dir: Path) -> dict:
    """The summary dvclive wrote (last logged training metrics), to extend with evaluation results."""
    path = Path(report_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    params = load_params()
    try:
        metrics = train_vae(params)
        if metrics:
            print(f"train_vae: test PSNR {metrics['test']['psnr']:.2f} dB, SSIM {metrics['test']['ssim']:.4f}, "
                  f"latent {metrics['latent_shape']}, {metrics['train_seconds']:.0f}s on {metrics['device']} "
                  f"-> {params.paths.vae}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
