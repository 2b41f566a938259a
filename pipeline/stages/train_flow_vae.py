"""Stage train_flow_vae: flow.h5 `bwd` train split -> models/flow_vae.pt, reports/flow_vae/ (test EPE, figure)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.config import Params, load_params, to_dict
from pipeline.data.datasets import FlowFieldDataset
from pipeline.io import atomic_path, write_json
from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig, end_point_error, flow_vae_loss
from pipeline.stages.train_vae import _dvclive_summary, check_resolution, train_config
from pipeline.training import is_main_process, seed_everything, shutdown_distributed, train

FIGURE_FIELDS = 6
MOVING_PX = 0.5  # a pixel counts as moving above this flow magnitude (pixels)


def flow_vae_config(params: Params) -> FlowVAEConfig:
    """The flow VAE's architecture from params.flow_vae."""
    v = params.flow_vae
    return FlowVAEConfig(latent_channels=v.latent_channels, hidden=v.hidden, downsample=v.downsample,
                         patch=v.patch, res_blocks=v.res_blocks, flow_scale=v.flow_scale)


@torch.no_grad()
def evaluate_flow_reconstruction(model: FlowVAE, dataset: FlowFieldDataset, *, device: torch.device,
                                 batch: int) -> dict:
    """EPE (pixels) of decode(mu) vs the flow over a split: all pixels and moving pixels, vs zero flow.

    Flow is sparse (static background), so `epe_moving` (pixels with |flow| > MOVING_PX) and its
    zero-flow baseline (the mean motion there) show whether the VAE captures the motion at all.
    """
    model.eval()
    sums = dict.fromkeys(("epe", "zero", "epe_moving", "zero_moving"), 0.0)
    pixels = moving = 0
    for flow in DataLoader(dataset, batch_size=batch, shuffle=False):
        flow = flow.to(device)  # [B,2,H,W]
        recon = model.decode(model.encode(flow)[0])
        err = (recon - flow).float().norm(dim=1)  # [B,H,W]
        mag = flow.float().norm(dim=1)  # [B,H,W] = EPE of predicting zero
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


@torch.no_grad()
def save_flow_figure(model: FlowVAE, dataset: FlowFieldDataset, path: str | Path, *, device: torch.device) -> None:
    """PNG: ground-truth backward flow (top) vs reconstruction (bottom), colour-coded with one scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import flow_to_image

    n = min(FIGURE_FIELDS, dataset.num_videos)
    index = [v * dataset.num_pairs + dataset.num_pairs // 2 for v in range(n)]
    flow = torch.stack([dataset[i] for i in index]).to(device)  # [n,2,H,W]
    recon = model.decode(model.encode(flow)[0])
    images = flow_to_image(torch.cat([flow, recon])).cpu()  # uint8 [2n,3,H,W]; one colour scale for the batch
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for r, name in enumerate(("flow (bwd)", "reconstruction")):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[r * n + c].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 1:
                ax.set_xlabel(f"EPE {end_point_error(recon[c:c + 1], flow[c:c + 1]).item():.3f}px", fontsize=7)
    fig.suptitle("flow VAE: test backward flow vs decode(encode(flow).mu)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_flow_vae(params: Params) -> dict:
    """Train the flow VAE on the train split's backward flow; write models/flow_vae.pt and reports/flow_vae/."""
    flow_h5 = params.paths.flow
    cfg = flow_vae_config(params)
    seed_everything(params.flow_vae.seed)
    model = FlowVAE(cfg)
    train_set = FlowFieldDataset(flow_h5, "train")
    test_set = FlowFieldDataset(flow_h5, "test")
    latent = check_resolution(model, train_set[0].shape, flow_h5)
    report_dir = params.paths.report_dir("flow_vae")
    v = params.flow_vae

    def loss_fn(m, flow, step):
        return flow_vae_loss(m, flow, beta=v.beta, warmup=v.kl_warmup, step=step)

    result = train(model, train_set, loss_fn, config=train_config(v), checkpoint=params.paths.flow_vae,
                   kind="flow_vae", model_args=cfg.to_dict(), params={"flow_vae": to_dict(v), "device": params.device},
                   report_dir=report_dir, device=params.device, extra={"latent_shape": list(latent)})
    if not is_main_process():
        return {}
    device = next(result.model.parameters()).device
    test = evaluate_flow_reconstruction(result.model, test_set, device=device, batch=v.batch)
    save_flow_figure(result.model, test_set, report_dir / "figures" / "recon.png", device=device)
    metrics = _dvclive_summary(report_dir)
    metrics.update({"test": test, "latent_shape": list(latent), "train_seconds": round(result.seconds, 1),
                    "resumed_from": result.resumed_from, "device": str(device),
                    "parameters": sum(p.numel() for p in result.model.parameters())})
    write_json(report_dir / "metrics.json", metrics)
    return metrics


def main() -> None:
    params = load_params()
    try:
        metrics = train_flow_vae(params)
        if metrics:
            t = metrics["test"]
            print(f"train_flow_vae: test EPE {t['epe']:.4f}px (zero flow {t['epe_zero_flow']:.4f}px), "
                  f"latent {metrics['latent_shape']}, {metrics['train_seconds']:.0f}s -> {params.paths.flow_vae}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
