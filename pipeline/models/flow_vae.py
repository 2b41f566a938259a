"""Flow VAE: the frame VAE's architecture on 2-channel backward flow fields (pixels).

Flow is divided by a fixed `flow_scale` (stored in the config, hence in the checkpoint) before
encoding and multiplied back after decoding, so the network sees values of order 1 while the
public interface stays in pixels. The loss is EPE + beta*KL with the EPE weighted up on moving
pixels (see flow_vae_loss): with plain EPE the VAE learns to output ~zero flow, since ~95% of the
pixels are static background.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.losses import end_point_error
from pipeline.models.vae import VAE, VAEConfig, kl_divergence, kl_weight

MOVING_PX = 0.5  # pixels; a pixel counts as moving above this flow magnitude


@dataclass
class FlowVAEConfig(VAEConfig):
    in_channels: int = 2
    latent_channels: int = 4
    hidden: int = 32
    output: str = "linear"
    flow_scale: float = 0.5   # pixels; flow / flow_scale is what the network sees

    def __post_init__(self):
        super().__post_init__()
        if self.in_channels != 2:
            raise ValueError(f"FlowVAEConfig.in_channels must be 2 (x, y flow), got {self.in_channels}")
        if self.output != "linear":
            raise ValueError(f"FlowVAEConfig.output must be 'linear', got {self.output!r}")
        if not self.flow_scale > 0:
            raise ValueError(f"FlowVAEConfig.flow_scale must be > 0, got {self.flow_scale}")


class FlowVAE(VAE):
    """VAE over flow [B,2,H,W] in pixels; encode -> (mu, logvar), decode -> flow in pixels."""

    config: FlowVAEConfig

    def __init__(self, config: FlowVAEConfig):
        if not isinstance(config, FlowVAEConfig):
            raise TypeError(f"FlowVAE needs a FlowVAEConfig, got {type(config).__name__}")
        super().__init__(config)

    def encode(self, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flow [B,2,H,W] (pixels) -> (mu, logvar), each [B,C,H/d,W/d]."""
        return super().encode(flow / self.config.flow_scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] -> flow [B,2,h*d,w*d] in pixels."""
        return super().decode(z) * self.config.flow_scale


def moving_weights(flow: torch.Tensor, moving_weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B,H,W] for flow [B,2,H,W]: `moving_weight` where |flow| > MOVING_PX, else 1."""
    moving = flow.float().norm(dim=1) > MOVING_PX  # [B,H,W]
    return 1.0 + (moving_weight - 1.0) * moving.float()


def flow_vae_loss(model: FlowVAE, flow: torch.Tensor, *, beta: float, warmup: int = 0, step: int = 0,
                  moving_weight: float = 1.0) -> dict:
    """Flow VAE loss: EPE + kl_weight * KL, with EPE a weighted mean over pixels, divided by flow_scale.

    Weighting: pixels that move (|flow| > MOVING_PX) weigh `moving_weight`, static ones 1, so the few
    moving objects (~5% of the pixels on CLEVRER) are not drowned by the static background; 1 = plain
    EPE. The EPE term is divided by the fixed flow scale so that beta means the same as for the frame
    VAE (a reconstruction error of order 1); KL is the mean per latent element.
    Returns {'total', 'epe' (plain, pixels), 'epe_weighted' (pixels), 'kl', 'kl_weight'}.
    """
    recon, mu, logvar = model(flow)  # [B,2,H,W] pixels, [B,C,h,w] x2
    epe = end_point_error(recon, flow)
    weighted = epe if moving_weight == 1.0 else end_point_error(recon, flow, moving_weights(flow, moving_weight))
    kl = kl_divergence(mu.float(), logvar.float())
    w = kl_weight(step, beta=beta, warmup=warmup)
    scale = _config(model).flow_scale
    return {"total": weighted / scale + w * kl, "epe": epe, "epe_weighted": weighted, "kl": kl,
            "kl_weight": torch.tensor(w)}


def _config(model: torch.nn.Module) -> FlowVAEConfig:
    """The FlowVAEConfig of a model, looking through DDP wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def build_flow_vae(args: dict, arch: str | None = None) -> FlowVAE:
    """The flow VAE a checkpoint's model_args describe (untrained; load its weights after)."""
    return FlowVAE(FlowVAEConfig(**args))
