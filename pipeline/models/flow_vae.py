"""Flow VAE: the frame VAE's architecture on 2-channel backward flow fields (pixels).

Flow is divided by a fixed `flow_scale` (stored in the config, hence in the checkpoint) before
encoding and multiplied back after decoding, so the network sees values of order 1 while the
public interface stays in pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def end_point_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error: mean over pixels of the L2 norm of the flow difference (channel dim 1)."""
    if pred.shape != target.shape or pred.ndim < 2 or pred.shape[1] != 2:
        raise ValueError(f"expected two flows [B,2,...] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred.float() - target.float()
    return torch.sqrt(diff.pow(2).sum(1) + 1e-12).mean()


def flow_vae_loss(model: FlowVAE, flow: torch.Tensor, *, beta: float, warmup: int = 0, step: int = 0) -> dict:
    """Flow VAE loss: EPE (pixels, mean per pixel) / flow_scale + kl_weight * KL (mean per element).

    The EPE term is divided by the fixed flow scale so that beta means the same as for the frame VAE
    (a reconstruction error of order 1). Returns {'total', 'epe' (pixels), 'kl', 'kl_weight'}.
    """
    recon, mu, logvar = model(flow)  # [B,2,H,W] pixels, [B,C,h,w] x2
    epe = end_point_error(recon, flow)
    kl = kl_divergence(mu.float(), logvar.float())
    w = kl_weight(step, beta=beta, warmup=warmup)
    scale = _config(model).flow_scale
    return {"total": epe / scale + w * kl, "epe": epe, "kl": kl, "kl_weight": torch.tensor(w)}


def _config(model: torch.nn.Module) -> FlowVAEConfig:
    """The FlowVAEConfig of a model, looking through DDP wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config
