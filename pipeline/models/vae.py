"""Convolutional VAE with a spatial latent: frames [B,3,H,W] <-> latents [B,C,H/d,W/d].

The same module serves the flow VAE (pipeline/models/flow_vae.py) with 2 input channels and a
linear output. Pure nn.Module: no file I/O; checkpoints are handled by pipeline/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import heads

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 8
    hidden: int = 64          # channels at the latent resolution; halved at each finer level
    downsample: int = 4       # latent is [latent_channels, H/downsample, W/downsample]; a power of 2
    patch: int = 4            # pixel-(un)shuffle stem: the convs start at H/patch (cheap on CPU); divides downsample
    res_blocks: int = 1       # residual blocks per resolution level (encoder and decoder)
    min_channels: int = 16    # floor for the finer levels' channel count
    output: str = "sigmoid"   # sigmoid (frames in [0,1]) | linear (flow, any real value)

    def __post_init__(self):
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"VAEConfig.downsample must be a power of 2 (1, 2, 4, 8, ...), got {self.downsample}")
        for name in ("in_channels", "latent_channels", "hidden", "min_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch < 1 or self.patch & (self.patch - 1) or self.downsample % self.patch:
            raise ValueError(f"VAEConfig.patch must be a power of 2 dividing downsample={self.downsample}, got {self.patch}")
        if self.res_blocks < 0:
            raise ValueError(f"VAEConfig.res_blocks must be >= 0, got {self.res_blocks}")
        if self.output not in ("sigmoid", "linear"):
            raise ValueError(f"VAEConfig.output must be 'sigmoid' or 'linear', got {self.output!r}")

    @property
    def levels(self) -> int:
        """Number of stride-2 conv stages after the pixel-unshuffle stem: log2(downsample / patch)."""
        return int(math.log2(self.downsample // self.patch))

    def channels(self) -> list[int]:
        """Channel count per conv level, finest (H/patch) first, latent resolution last."""
        return [max(self.hidden >> (self.levels - i), min(self.min_channels, self.hidden))
                for i in range(self.levels + 1)]

    def to_dict(self) -> dict:
        """Plain dict of the constructor args (what checkpoints store as model_args)."""
        return dataclasses.asdict(self)


def ResBlock(cin: int, cout: int) -> nn.Module:  # noqa: N802 (a block constructor)
    """The shared residual block, each one starting as its skip path: faster, stabler early training."""
    return heads.ResBlock(cin, cout, zero_init=True)


class Encoder(nn.Module):
    """x [B,Cin,H,W] -> (mu, logvar) each [B,C,H/d,W/d]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels()
        self.stem = nn.PixelUnshuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch ** 2, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(cfg.levels):
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.res_blocks)]
            layers.append(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1))
        layers += [ResBlock(ch[-1], ch[-1]) for _ in range(max(cfg.res_blocks, 1))]
        self.body = nn.Sequential(*layers)
        self.norm_out = heads.group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.conv_in(self.stem(x)))
        mu, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z [B,C,h,w] -> x [B,Cout,h*d,w*d] (pre-activation output)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels()
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch[-1], ch[-1]) for _ in range(max(cfg.res_blocks, 1))]
        for i in reversed(range(cfg.levels)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1)]
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.res_blocks)]
        self.body = nn.Sequential(*layers)
        self.norm_out = heads.group_norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels * cfg.patch ** 2, 3, padding=1)
        self.unstem = nn.PixelShuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.unstem(self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z))))))


class VAE(nn.Module):
    """Spatial-latent VAE; encode -> (mu, logvar), decode -> x, forward -> (recon, mu, logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent shape [C,h,w] for an input of the given size (checked)."""
        d = self.config.downsample
        if height % d or width % d:
            raise ValueError(f"input size {height}x{width} is not divisible by the VAE downsample factor {d}")
        return self.config.latent_channels, height // d, width // d

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,Cin,H,W] -> (mu, logvar), each [B,C,H/d,W/d]."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input [B,{self.config.in_channels},H,W], got shape {tuple(x.shape)}")
        self.latent_shape(x.shape[2], x.shape[3])
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] -> x [B,Cin,h*d,w*d] (in [0,1] for output='sigmoid')."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latent [B,{self.config.latent_channels},h,w], got shape {tuple(z.shape)}")
        x = self.decoder(z)
        return torch.sigmoid(x) if self.config.output == "sigmoid" else x

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,Cin,H,W] -> (recon [B,Cin,H,W], mu, logvar); samples z in training, uses mu in eval."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form.

    reduction: 'mean' = mean over every latent element (batch included), so beta does not depend
    on the latent size and sits on the same per-element scale as the L1/EPE term (the default used
    by the losses here); 'sum' = sum over latent dims, mean over the batch (the textbook ELBO term);
    'none' = per element.
    """
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.flatten(1).sum(1).mean()
    if reduction == "none":
        return kl
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def kl_weight(step: int, *, beta: float, warmup: int) -> float:
    """Linear KL warm-up: 0 at step 0 up to beta at step `warmup` (beta at once when warmup=0)."""
    if warmup <= 0:
        return beta
    return beta * min(1.0, step / warmup)


def frame_vae_loss(model: VAE, x: torch.Tensor, *, beta: float, warmup: int = 0, step: int = 0) -> dict:
    """Frame VAE loss: L1 (mean per pixel) + kl_weight * KL (mean per latent element).

    Returns {'total', 'l1', 'kl', 'kl_weight'}.
    """
    recon, mu, logvar = model(x)  # [B,3,H,W], [B,C,h,w] x2
    l1 = (recon.float() - x.float()).abs().mean()
    kl = kl_divergence(mu.float(), logvar.float())
    w = kl_weight(step, beta=beta, warmup=warmup)
    return {"total": l1 + w * kl, "l1": l1, "kl": kl, "kl_weight": torch.tensor(w)}


def build_vae(args: dict, arch: str | None = None) -> VAE:
    """The frame VAE a checkpoint's model_args describe (untrained; load its weights after)."""
    return VAE(VAEConfig(**args))
