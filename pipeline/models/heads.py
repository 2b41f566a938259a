"""Building blocks shared by the temporal architectures: conv blocks, a small U-Net, ConvLSTM, heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["group_norm", "unet_depth", "ResBlock", "UNet", "ConvLSTMCell", "CollisionHead", "StateHead", "zero_init_",
           "PRIOR_COLLISION"]

PRIOR_COLLISION = 0.01  # initial collision probability (RetinaNet-style prior for the focal loss)


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide `ch`."""
    return nn.GroupNorm(math.gcd(8, ch), ch)


def zero_init_(module: nn.Module, *, bias: float = 0.0) -> nn.Module:
    """Zero a layer's weight and set its bias to a constant (heads that start as 'no change')."""
    nn.init.zeros_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)
    return module


def unet_depth(h: int, w: int, most: int = 2) -> int:
    """Stride-2 levels a h x w map allows (each side stays >= 2 and even), at most `most`."""
    depth = 0
    while depth < most and h % 2 == 0 and w % 2 == 0 and h >= 4 and w >= 4:
        h, w, depth = h // 2, w // 2, depth + 1
    return depth


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) x 2 with a 1x1 skip when widths differ.

    zero_init: the second conv starts at zero, so the block starts as its skip path (the VAEs use this).
    """

    def __init__(self, cin: int, cout: int, *, zero_init: bool = False):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        if zero_init:
            zero_init_(self.conv2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """x [B,cin,h,w] -> features [B,hidden,h,w]; `depth` stride-2 levels (h, w divisible by 2^depth)."""

    def __init__(self, cin: int, hidden: int, *, depth: int = 2):
        super().__init__()
        self.depth = depth
        widths = [hidden * min(2 ** i, 2) for i in range(depth + 1)]  # [hidden, 2h, 2h, ...]
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(depth):
            self.down.append(nn.ModuleList([ResBlock(widths[i], widths[i]),
                                             nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]))
        self.mid = ResBlock(widths[-1], widths[-1])
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(ResBlock(widths[i + 1] + widths[i], widths[i]))
        self.norm_out = group_norm(widths[0])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % (2 ** self.depth) or w % (2 ** self.depth):
            raise ValueError(f"UNet input {tuple(x.shape)}: height and width must be divisible by {2 ** self.depth}")
        x = self.conv_in(x)
        skips = []
        for block, down in self.down:
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.mid(x)
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return F.silu(self.norm_out(x))


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015): (x [B,cin,h,w], (h, c)) -> (h, c), each [B,hidden,h,w]."""

    def __init__(self, cin: int, hidden: int, *, kernel: int = 3):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(cin + hidden, 4 * hidden, kernel, padding=kernel // 2)
        self.norm = nn.GroupNorm(4, 4 * hidden)
        with torch.no_grad():  # forget-gate bias 1: remember by default
            self.norm.bias[hidden:2 * hidden].fill_(1.0)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Zero (h, c) matching input x [B,cin,h,w]."""
        zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[-2:])
        return zeros, zeros

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        h, c = self.init_state(x) if state is None else state
        i, f, g, o = self.norm(self.gates(torch.cat([x, h], dim=1))).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class CollisionHead(nn.Module):
    """features [B,C,h,w] -> collision logit [B] (average and max pooled, MLP; starts at a 1% prior)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.mlp[-1].bias, math.log(PRIOR_COLLISION / (1 - PRIOR_COLLISION)))

    def forward(self, feats: Tensor) -> Tensor:
        pooled = torch.cat([feats.mean(dim=(-2, -1)), feats.amax(dim=(-2, -1))], dim=1)  # [B,2C]
        return self.mlp(pooled).squeeze(1)  # [B]


class StateHead(nn.Module):
    """features [B,C,h,w] -> boxes [B,K,4] normalised xyxy (a 4x4 pooled map keeps where things are)."""

    def __init__(self, channels: int, num_boxes: int, hidden: int = 128, grid: int = 4):
        super().__init__()
        if num_boxes < 1:
            raise ValueError(f"StateHead needs num_boxes >= 1, got {num_boxes}")
        self.num_boxes, self.grid = num_boxes, grid
        self.mlp = nn.Sequential(nn.Linear(channels * grid * grid, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_boxes * 4))

    def forward(self, feats: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(feats, self.grid).flatten(1)  # [B,C*g*g]
        cxcywh = torch.sigmoid(self.mlp(pooled)).view(-1, self.num_boxes, 4)  # [B,K,4]
        centre, size = cxcywh[..., :2], cxcywh[..., 2:]
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1)  # [B,K,4] xyxy
