"""Published video-prediction architectures, re-implemented small enough to train on 2 CPU cores.

Reference points for bench/bench_published.py, not pipeline archs: each predicts frames from frames alone
(no flow, no latents), as its paper does, and is trained with its paper's pixel MSE.
- `SimVP`: Gao et al., "SimVP: Simpler yet Better Video Prediction" (CVPR 2022), with the gated spatiotemporal
  attention translator of SimVPv2 (Tan et al., 2022), the default of the OpenSTL benchmark: a per-frame conv
  encoder, a translator over all context frames stacked in channels, a per-frame decoder with a skip from the
  first encoder layer. It maps T frames to the next T; longer horizons are predicted T at a time, fed back.
- `MVFN`: the multi-scale voxel flow network of Hu et al., "A Dynamic Multi-Scale Voxel Flow Network for Video
  Prediction" (DMVFN, CVPR 2023), without its routing module (which only skips blocks; every block runs here):
  from the last two frames, coarse-to-fine blocks refine two backward flows and a blend mask, and the next frame
  is the mask's blend of both frames warped to it (the voxel flow of Liu et al., ICCV 2017). Fed back per step.
- `ConvLSTM`: Shi et al., "Convolutional LSTM Network" (NeurIPS 2015), laid out as OpenSTL runs it: frames cut
  into patch x patch tiles stacked in channels, a stack of ConvLSTM cells, a 1x1 readout, one frame per step
  fed back, scheduled sampling while training.
Pure modules (no file I/O); configs are dataclasses stored with the numbers they produce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.flow.ops import warp

__all__ = ["SimVPConfig", "SimVP", "MVFNConfig", "MVFN", "ConvLSTMConfig", "ConvLSTM", "ARCHS"]


def _check_frames(name: str, frames: Tensor) -> None:
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"{name}: frames must be [B,T,3,H,W], got {tuple(frames.shape)}")


@dataclass(frozen=True)
class SimVPConfig:
    """SimVP with the gSTA translator; sizes scaled down from OpenSTL's Moving MNIST config (64/512/4/8)."""

    context: int = 6        # T: frames in, frames out per call
    hid_spatial: int = 32   # hid_S: encoder / decoder channels
    hid_temporal: int = 128  # hid_T: translator channels
    spatial_layers: int = 4  # N_S: encoder convs (every second one halves the size)
    temporal_layers: int = 4  # N_T: gSTA blocks
    kernel: int = 21        # receptive field of the large-kernel attention
    mlp_ratio: float = 4.0


class _ConvNormAct(nn.Module):
    """3x3 conv (stride 2, or x2 by pixel shuffle), GroupNorm(2), SiLU: SimVP's ConvSC."""

    def __init__(self, c_in: int, c_out: int, *, down: bool = False, up: bool = False):
        super().__init__()
        if up:
            self.conv = nn.Sequential(nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2))
        else:
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2 if down else 1, padding=1)
        self.norm = nn.GroupNorm(2, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.conv(x)))


class _LargeKernelGate(nn.Module):
    """Depthwise conv, dilated depthwise conv, 1x1 to value and gate: sigmoid(gate) * value."""

    def __init__(self, dim: int, kernel: int, dilation: int = 3):
        super().__init__()
        local = 2 * dilation - 1
        wide = kernel // dilation + ((kernel // dilation) % 2 - 1)  # odd
        self.local = nn.Conv2d(dim, dim, local, padding=local // 2, groups=dim)
        self.wide = nn.Conv2d(dim, dim, wide, padding=dilation * (wide - 1) // 2, groups=dim, dilation=dilation)
        self.value_gate = nn.Conv2d(dim, 2 * dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.value_gate(self.wide(self.local(x))).chunk(2, dim=1)
        return torch.sigmoid(gate) * value


class _GSTABlock(nn.Module):
    """gSTA: x + s1 * attention(BN(x)), then x + s2 * MLP(BN(x)), the MLP with a depthwise 3x3 inside."""

    def __init__(self, dim: int, *, kernel: int, mlp_ratio: float, layer_scale: float = 1e-2):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)
        self.attn_in, self.gate, self.attn_out = nn.Conv2d(dim, dim, 1), _LargeKernelGate(dim, kernel), nn.Conv2d(dim, dim, 1)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                                 nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.scale1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.scale2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.scale1 * (self.attn_out(self.gate(F.gelu(self.attn_in(y)))) + y)
        return x + self.scale2 * self.mlp(self.norm2(x))


class _Translator(nn.Module):
    """N_T gSTA blocks over [B, T*hid_S, h, w]; 1x1 convs in and out of hid_T channels."""

    def __init__(self, c_io: int, c_hid: int, layers: int, *, kernel: int, mlp_ratio: float):
        super().__init__()
        if layers < 2:
            raise ValueError(f"SimVP translator needs at least 2 blocks, got temporal_layers={layers}")
        dims = [c_io] + [c_hid] * (layers - 1) + [c_io]
        self.blocks = nn.ModuleList(_GSTABlock(dims[i], kernel=kernel, mlp_ratio=mlp_ratio) for i in range(layers))
        self.reduce = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 1) if dims[i] != dims[i + 1] else nn.Identity()
                                    for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block, reduce in zip(self.blocks, self.reduce):
            x = reduce(block(x))
        return x


class SimVP(nn.Module):
    """Frames [B,T,3,H,W] -> the next T frames; `rollout` chains calls for any horizon."""

    def __init__(self, config: SimVPConfig):
        super().__init__()
        self.config = c = config
        if c.spatial_layers < 2 or c.spatial_layers % 2:
            raise ValueError(f"SimVP: spatial_layers must be even and >= 2, got {c.spatial_layers}")
        downs = [bool(i % 2) for i in range(c.spatial_layers)]  # [False, True, False, True, ...]
        self.encoder = nn.ModuleList(_ConvNormAct(3 if i == 0 else c.hid_spatial, c.hid_spatial, down=d)
                                     for i, d in enumerate(downs))
        self.decoder = nn.ModuleList(_ConvNormAct(c.hid_spatial, c.hid_spatial, up=u) for u in reversed(downs))
        self.readout = nn.Conv2d(c.hid_spatial, 3, 1)
        self.translator = _Translator(c.context * c.hid_spatial, c.hid_temporal, c.temporal_layers, kernel=c.kernel,
                                      mlp_ratio=c.mlp_ratio)
        self.scale = 2 ** (c.spatial_layers // 2)

    def forward(self, frames: Tensor) -> Tensor:
        _check_frames("SimVP", frames)
        B, T, _, H, W = frames.shape
        if T != self.config.context or H % self.scale or W % self.scale:
            raise ValueError(f"SimVP: expected [B,{self.config.context},3,H,W] with H, W divisible by {self.scale}, "
                             f"got {tuple(frames.shape)}")
        x = frames.reshape(B * T, 3, H, W)
        skip = x = self.encoder[0](x)  # [B*T,hid_S,H,W]
        for layer in self.encoder[1:]:
            x = layer(x)  # [B*T,hid_S,h,w]
        h, w = x.shape[-2:]
        x = self.translator(x.reshape(B, T * x.shape[1], h, w)).reshape(B * T, -1, h, w)
        for layer in self.decoder[:-1]:
            x = layer(x)
        x = self.readout(self.decoder[-1](x + skip))  # [B*T,3,H,W]
        return x.reshape(B, T, 3, H, W)

    def rollout(self, context: Tensor, horizon: int, truth: Tensor | None = None, *, teacher_prob: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
        """The `horizon` frames after `context` [B,T,3,H,W], T at a time, each block fed the previous one.

        `truth`, `teacher_prob` and `generator` are ConvLSTM's scheduled sampling; SimVP feeds its own blocks back
        in training too (OpenSTL's recursive multi-step prediction), so it ignores them.
        """
        del truth, teacher_prob, generator
        out, x = [], context
        while sum(o.shape[1] for o in out) < horizon:
            x = self(x)
            out.append(x)
        return torch.cat(out, dim=1)[:, :horizon]  # [B,horizon,3,H,W]


@dataclass(frozen=True)
class MVFNConfig:
    """Blocks at these downscales with these widths; DMVFN has 9 (scales 4,4,4,2,2,2,1,1,1, widths 160-44)."""

    scales: tuple[int, ...] = (4, 2, 1)
    features: tuple[int, ...] = (64, 48, 32)


class _FlowBlock(nn.Module):
    """One refinement: [frames, warped frames, mask, flows] at 1/scale -> deltas of 2 flows and the mask logit."""

    IN = 4 * 3 + 1 + 4

    def __init__(self, features: int, scale: int):
        super().__init__()
        self.scale = scale
        self.down = nn.Sequential(nn.Conv2d(self.IN, features, 3, stride=2, padding=1), nn.PReLU(features))
        self.body = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(features, features, 3, padding=1),
                                                                  nn.PReLU(features))])
        self.up = nn.ConvTranspose2d(features, 5, 4, stride=2, padding=1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # starts as "no change": flows 0, mask 0.5

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=1 / self.scale, mode="bilinear", align_corners=False)
        y = self.up(self.body(self.down(x)))  # [B,5,H/s,W/s]
        if self.scale != 1:
            y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
        return torch.cat([y[:, :4] * self.scale, y[:, 4:]], dim=1)  # flows in full-resolution pixels


class MVFN(nn.Module):
    """Next frame from the last two: mask * warp(prev, f_prev) + (1 - mask) * warp(last, f_last)."""

    def __init__(self, config: MVFNConfig):
        super().__init__()
        self.config = c = config
        if len(c.scales) != len(c.features) or not c.scales:
            raise ValueError(f"MVFN: scales {c.scales} and features {c.features} must be non-empty and of one length")
        self.blocks = nn.ModuleList(_FlowBlock(f, s) for f, s in zip(c.features, c.scales))
        self.size = 2 * max(c.scales)

    def step(self, prev: Tensor, last: Tensor) -> Tensor:
        """Frames t-1, t [B,3,H,W] -> frame t+1."""
        B, _, H, W = last.shape
        if H % self.size or W % self.size:
            raise ValueError(f"MVFN: frame size {H}x{W} is not divisible by {self.size} (2 x the largest scale)")
        flow, mask = last.new_zeros(B, 4, H, W), last.new_zeros(B, 1, H, W)  # [B,4,H,W], [B,1,H,W] logit
        for block in self.blocks:
            warped = torch.cat([warp(prev, flow[:, :2]), warp(last, flow[:, 2:])], dim=1)  # [B,6,H,W]
            delta = block(torch.cat([prev, last, warped, mask, flow], dim=1))
            flow, mask = flow + delta[:, :4], mask + delta[:, 4:]
        m = torch.sigmoid(mask)
        return m * warp(prev, flow[:, :2]) + (1 - m) * warp(last, flow[:, 2:])

    def rollout(self, context: Tensor, horizon: int, truth: Tensor | None = None, *, teacher_prob: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
        """The `horizon` frames after `context` [B,T,3,H,W], each from the two before it (fed back, also in training).

        `truth`, `teacher_prob` and `generator` are ConvLSTM's scheduled sampling, unused here.
        """
        del truth, teacher_prob, generator
        _check_frames("MVFN", context)
        if context.shape[1] < 2:
            raise ValueError(f"MVFN needs 2 context frames, got {tuple(context.shape)}")
        prev, last, out = context[:, -2], context[:, -1], []
        for _ in range(horizon):
            prev, last = last, self.step(prev, last)
            out.append(last)
        return torch.stack(out, dim=1)  # [B,horizon,3,H,W]


@dataclass(frozen=True)
class ConvLSTMConfig:
    """Stacked ConvLSTM on patch-stacked frames; sizes scaled down from OpenSTL's (4 x 128 channels, 5x5)."""

    patch: int = 4          # frames enter as [3*patch^2, H/patch, W/patch]
    hidden: int = 64        # channels of every cell
    layers: int = 3
    kernel: int = 3


class _ConvLSTMCell(nn.Module):
    """One ConvLSTM cell: the four gates from one conv over [input, hidden]."""

    def __init__(self, c_in: int, hidden: int, kernel: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(c_in + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ConvLSTM(nn.Module):
    """Next-frame ConvLSTM: `rollout` reads the context, then feeds back its own (or, in training, true) frames."""

    def __init__(self, config: ConvLSTMConfig):
        super().__init__()
        self.config = c = config
        tile = 3 * c.patch ** 2
        self.cells = nn.ModuleList(_ConvLSTMCell(tile if i == 0 else c.hidden, c.hidden, c.kernel) for i in range(c.layers))
        self.readout = nn.Conv2d(c.hidden, tile, 1)

    def _tiles(self, frame: Tensor) -> Tensor:
        return F.pixel_unshuffle(frame, self.config.patch)  # [B,3*p^2,H/p,W/p]

    def rollout(self, context: Tensor, horizon: int, truth: Tensor | None = None, *,
                teacher_prob: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """The `horizon` frames after `context` [B,T,3,H,W].

        With `truth` [B,horizon,3,H,W] each fed-back frame is the true one with probability `teacher_prob`, per
        video and step (scheduled sampling); without it, always the prediction.
        """
        _check_frames("ConvLSTM", context)
        B, T, _, H, W = context.shape
        p = self.config.patch
        if H % p or W % p:
            raise ValueError(f"ConvLSTM: frame size {H}x{W} is not divisible by patch={p}")
        if truth is not None and truth.shape != (B, horizon, 3, H, W):
            raise ValueError(f"ConvLSTM: truth must be [B,{horizon},3,{H},{W}], got {tuple(truth.shape)}")
        zeros = context.new_zeros(B, self.config.hidden, H // p, W // p)
        states = [(zeros, zeros) for _ in self.cells]
        out, frame = [], context[:, 0]
        for t in range(T - 1 + horizon):
            x = self._tiles(frame)
            for i, cell in enumerate(self.cells):
                states[i] = cell(x, states[i])
                x = states[i][0]
            pred = F.pixel_shuffle(self.readout(x), p)  # [B,3,H,W]: frame t+1
            if t + 1 < T:
                frame = context[:, t + 1]
                continue
            out.append(pred)
            frame = pred
            k = len(out) - 1
            if truth is not None and teacher_prob > 0 and k + 1 < horizon:
                use = torch.rand(B, 1, 1, 1, generator=generator) < teacher_prob  # [B,1,1,1]
                frame = torch.where(use, truth[:, k], pred)
        return torch.stack(out, dim=1)  # [B,horizon,3,H,W]


ARCHS = {"simvp": (SimVPConfig, SimVP), "mvfn": (MVFNConfig, MVFN), "convlstm": (ConvLSTMConfig, ConvLSTM)}
