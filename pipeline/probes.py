"""Linear probes: how much of one quantity a representation carries linearly, as explained variance.

A leaf module (torch only). The control stage uses it to measure leakage between dual_vae's two latent
streams: a ridge regression fitted on train-split samples predicts, say, the flow at a latent cell from the
appearance latent around that cell; its explained variance on held-out samples says how much motion the
appearance stream carries (0 = nothing a linear read-out finds, 1 = all of it). Features are standardised
with the training statistics, so one ridge penalty fits streams of any scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearProbe", "fit_probe", "explained_variance", "cell_features", "cell_targets"]


@dataclass(frozen=True)
class LinearProbe:
    """y = ((x - mean) / std) @ weight + bias; x [N,F] -> y [N,D]."""

    mean: Tensor  # [F]
    std: Tensor  # [F]
    weight: Tensor  # [F,D]
    bias: Tensor  # [D]

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"probe expects features [N,{self.weight.shape[0]}], got {tuple(x.shape)}")
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias


def fit_probe(x: Tensor, y: Tensor, *, ridge: float) -> LinearProbe:
    """Ridge regression of y [N,D] on x [N,F] (features standardised, intercept unpenalised)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_probe needs x [N,F] and y [N,D] with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"fit_probe needs at least 2 samples, got {x.shape[0]}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)  # a constant feature stays 0 after standardising
    xs = (x - mean) / std  # [N,F]
    y_mean = y.mean(0)
    N, Fdim = xs.shape
    gram = xs.T @ xs + ridge * N * torch.eye(Fdim, dtype=xs.dtype)  # [F,F]
    weight = torch.linalg.solve(gram, xs.T @ (y - y_mean))  # [F,D]
    return LinearProbe(mean=mean, std=std, weight=weight, bias=y_mean)


def explained_variance(y: Tensor, y_hat: Tensor) -> float:
    """1 - SSE / SST over all target dims pooled (SST around y's own mean): 1 = perfect, 0 = the mean, < 0 = worse."""
    if y.shape != y_hat.shape or y.dim() != 2:
        raise ValueError(f"explained_variance needs y and y_hat [N,D] of one shape, got {tuple(y.shape)} and "
                         f"{tuple(y_hat.shape)}")
    y, y_hat = y.double(), y_hat.double()
    sst = (y - y.mean(0)).square().sum()
    if sst <= 0:
        raise ValueError("explained_variance: the targets are constant (no variance to explain)")
    return float(1.0 - (y - y_hat).square().sum() / sst)


def cell_features(latent: Tensor, *, neighbourhood: int = 3) -> Tensor:
    """Latents [N,C,h,w] -> one row per cell [N*h*w, C*k*k]: the cell and its k x k neighbours (edges replicated)."""
    if latent.dim() != 4:
        raise ValueError(f"cell_features expects latents [N,C,h,w], got {tuple(latent.shape)}")
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be odd and >= 1, got {neighbourhood}")
    r = neighbourhood // 2
    padded = F.pad(latent.float(), (r, r, r, r), mode="replicate") if r else latent.float()
    cols = F.unfold(padded, neighbourhood)  # [N,C*k*k,h*w]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def cell_targets(field: Tensor, grid: tuple[int, int]) -> Tensor:
    """A pixel field [N,D,H,W] averaged over each latent cell of `grid` (h, w) -> rows [N*h*w, D]."""
    if field.dim() != 4 or field.shape[-2] % grid[0] or field.shape[-1] % grid[1]:
        raise ValueError(f"cell_targets needs [N,D,H,W] with H, W multiples of the grid {grid}, got {tuple(field.shape)}")
    pooled = F.adaptive_avg_pool2d(field.float(), grid)  # [N,D,h,w]
    return pooled.flatten(2).transpose(1, 2).reshape(-1, field.shape[1])
