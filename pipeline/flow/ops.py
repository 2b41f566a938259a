"""Flow primitives shared by the whole project: backward warp, forward-backward occlusion, flow resize.

Conventions (DESIGN §4-5): flow is in pixels of the grid it lives on, channel 0 = x (right),
channel 1 = y (down). Warping is backward: `warp(x, flow)` samples x at p + flow(p).

Every function accepts any number of leading batch dims: x [*, C, H, W], flow [*, 2, H, W]
(e.g. [B, C, H, W] for frames, [B, T-1, 2, H, W] for a clip, or a single [C, H, W]); the leading
dims of the two arguments must be equal (no broadcasting) and are preserved in the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["warp", "splat", "ADVECT_IMPORTANCE", "compose_backward", "occlusion", "resize_flow", "base_grid"]


def _check_flow(flow: Tensor, name: str = "flow") -> None:
    if not isinstance(flow, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(flow).__name__}")
    if flow.dim() < 3 or flow.shape[-3] != 2:
        raise ValueError(f"{name} must have shape [*, 2, H, W], got {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {flow.dtype}")


def base_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Pixel coordinates [2, H, W] of a grid: channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys])  # [2,H,W]


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Backward bilinear warp: out(p) = x(p + flow(p)); x [*,C,H,W], flow [*,2,H,W] in pixels of x's grid."""
    _check_flow(flow)
    if not isinstance(x, Tensor) or x.dim() < 3:
        raise ValueError(f"x must have shape [*, C, H, W], got {tuple(getattr(x, 'shape', ()))}")
    if x.shape[:-3] != flow.shape[:-3] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x {tuple(x.shape)} and flow {tuple(flow.shape)} must share leading dims and H, W "
                         f"(x [*, C, H, W], flow [*, 2, H, W])")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {x.dtype}")
    lead = x.shape[:-3]
    C, H, W = x.shape[-3:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.reshape(-1, C, H, W).to(dtype)  # [B,C,H,W]
    ff = flow.reshape(-1, 2, H, W).to(dtype)  # [B,2,H,W]
    pos = base_grid(H, W, device=x.device, dtype=dtype) + ff  # [B,2,H,W] sampling positions in pixels
    # align_corners=True: pixel 0 -> -1, pixel W-1 -> +1
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], device=x.device, dtype=dtype)
    grid = (pos * scale.view(1, 2, 1, 1) - 1.0).permute(0, 2, 3, 1)  # [B,H,W,2] (x, y)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [B,C,H,W]
    return out.to(x.dtype).reshape(*lead, C, H, W)


# A source pixel takes part in the forward-backward check when it carries at least this share of the
# bilinear weight of the sample point (a sample exactly on a pixel centre has one source pixel).
SOURCE_MIN_WEIGHT = 0.1


def occlusion(bwd: Tensor, fwd: Tensor, *, alpha1: float = 0.01, alpha2: float = 0.5,
              sharpness: float = 2.0, out_of_frame: bool = True) -> tuple[Tensor, Tensor]:
    """Forward-backward check (UnFlow) on frame t+1's grid -> (soft, hard) [*,1,H,W], 1 = visible in frame t.

    bwd [*,2,H,W] is the flow t+1 -> t on frame t+1's grid, fwd [*,2,H,W] the flow t -> t+1 on frame
    t's grid. A pixel p of frame t+1 comes from the sub-pixel point q = p + bwd(p) of frame t; with
    f_s = fwd at a source pixel s of q (one of the up to four pixels around q carrying at least
    SOURCE_MIN_WEIGHT of its bilinear weight), p is visible (hard = 1) when for some s
    |bwd + f_s|^2 < alpha1 * (|bwd|^2 + |f_s|^2) + alpha2. With r_s = lhs / rhs, the soft score is
    max_s 1 / (1 + r_s^sharpness) = sigmoid(-sharpness * log r): 1 for a perfectly consistent pixel,
    0.5 exactly on the threshold, -> 0 for inconsistent ones.

    Checking each source pixel instead of fwd interpolated at q matters at motion boundaries: there
    the interpolated flow blends two motions that exist nowhere in the scene, and the blend fails
    the check although the pixel is visible (on the renderer's exact flows this alone lowered the
    occlusion F1 from 0.98 to 0.90). Where q is a pixel centre (static background) both agree.

    out_of_frame (default True): a pixel whose source q lies outside frame t (beyond its edge at
    -0.5 / W-0.5 px, the half-pixel convention of `resize_flow`) was not visible in frame t
    either; the border-padded check cannot see that (objects entering the view), so it is also
    marked occluded, with a 1 px soft ramp across the edge. soft = min(check, ramp), so always
    hard == (soft > 0.5).
    """
    _check_flow(bwd, "bwd")
    _check_flow(fwd, "fwd")
    if bwd.shape != fwd.shape:
        raise ValueError(f"bwd {tuple(bwd.shape)} and fwd {tuple(fwd.shape)} must have the same shape [*, 2, H, W]")
    if alpha1 < 0 or alpha2 <= 0:
        raise ValueError(f"need alpha1 >= 0 and alpha2 > 0, got alpha1={alpha1}, alpha2={alpha2}")
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    dtype = torch.promote_types(bwd.dtype, torch.float32)
    b = bwd.to(dtype)
    f = fwd.to(dtype)
    H, W = b.shape[-2:]
    grid = base_grid(H, W, device=b.device, dtype=dtype)  # [2,H,W]
    pos = grid + b  # [*,2,H,W] source point q in frame t, pixels
    corner0 = pos.floor()
    frac = pos - corner0  # [*,2,H,W] bilinear fractions (x, y)
    b_sq = b.square().sum(dim=-3, keepdim=True)  # [*,1,H,W]
    soft = torch.zeros_like(b_sq)
    for dx in (0, 1):
        for dy in (0, 1):
            offset = pos.new_tensor([dx, dy]).view(2, 1, 1)
            weight = (frac if dx else 1 - frac)[..., 0:1, :, :] * (frac if dy else 1 - frac)[..., 1:2, :, :]
            # warp at a pixel centre reads that pixel's forward flow exactly (border-clamped outside)
            f_s = warp(f, corner0 + offset - grid)  # [*,2,H,W]
            lhs = (b + f_s).square().sum(dim=-3, keepdim=True)  # [*,1,H,W]
            rhs = alpha1 * (b_sq + f_s.square().sum(dim=-3, keepdim=True)) + alpha2
            score = torch.reciprocal(1.0 + (lhs / rhs).pow(sharpness))  # > 0.5 where consistent
            soft = torch.maximum(soft, torch.where(weight >= SOURCE_MIN_WEIGHT, score, torch.zeros_like(score)))
    if out_of_frame:
        inside = torch.minimum(pos + 0.5, pos.new_tensor([W - 0.5, H - 0.5]).view(2, 1, 1) - pos)  # [*,2,H,W]
        inside = inside.amin(dim=-3, keepdim=True)  # [*,1,H,W] signed distance to the frame edge, px
        soft = torch.minimum(soft, (inside + 0.5).clamp(0.0, 1.0))
    hard = soft > 0.5
    return soft.to(bwd.dtype), hard.to(bwd.dtype)


SPLAT_EPS = 1e-6  # added to the softmax-splat normaliser; a target that only a sliver reaches tends to 0
# splat importance per pixel/frame of motion when advecting a flow field (flow_advect, pixel warp_occ): where
# moving content lands on static background the moving content wins (a 0.5 px motion outweighs a static pixel by e^5)
ADVECT_IMPORTANCE = 10.0


def splat(x: Tensor, flow: Tensor, *, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward (softmax) splatting: push each pixel p of x to p + flow(p) -> (out, coverage).

    x [*,C,H,W], flow [*,2,H,W] in pixels (the forward displacement of each source pixel),
    importance [*,1,H,W] or None. Every source pixel spreads its value over the (up to) four target
    pixels around p + flow(p) with bilinear weights w; where several land on one target they are
    mixed by softmax of their importance Z (Niklaus & Liu 2020): out(q) = sum w e^Z x / sum w e^Z.
    coverage(q) = sum w [*,1,H,W] says how much landed there: 0 in a hole (disoccluded, nothing
    moved in), 1 where one source covers it fully. Holes of `out` are 0. Differentiable in x and flow;
    on CUDA the scatter uses atomics, so sums may differ in the last bits from run to run.
    """
    _check_flow(flow)
    if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[:-3] != flow.shape[:-3] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x {tuple(getattr(x, 'shape', ()))} and flow {tuple(flow.shape)} must share leading dims "
                         f"and H, W (x [*, C, H, W], flow [*, 2, H, W])")
    lead, (C, H, W) = x.shape[:-3], x.shape[-3:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.reshape(-1, C, H * W).to(dtype)  # [B,C,HW]
    pos = (base_grid(H, W, device=x.device, dtype=dtype) + flow.reshape(-1, 2, H, W).to(dtype)).flatten(2)  # [B,2,HW]
    if not torch.isfinite(pos).all():
        raise ValueError(f"splat: flow {tuple(flow.shape)} holds NaN or inf")
    if importance is not None and importance.shape != (*lead, 1, H, W):
        raise ValueError(f"importance must be [*, 1, H, W] = {(*lead, 1, H, W)}, got {tuple(importance.shape)}")
    z = (importance.reshape(-1, 1, H * W).to(dtype) if importance is not None
         else xf.new_zeros(xf.shape[0], 1, H * W))  # [B,1,HW]
    corner = pos.floor()
    frac = pos - corner  # [B,2,HW]
    corners = []
    for dx in (0, 1):
        for dy in (0, 1):
            cx, cy = corner[:, 0:1] + dx, corner[:, 1:2] + dy  # [B,1,HW]
            w = (frac[:, 0:1] if dx else 1 - frac[:, 0:1]) * (frac[:, 1:2] if dy else 1 - frac[:, 1:2])
            inside = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
            w = torch.where(inside, w, torch.zeros_like(w))
            corners.append(((cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1)).long(), w))  # index [B,1,HW]
    # softmax is shift invariant per target: subtract each target's largest importance (a constant for
    # the gradient) so that exp() neither overflows nor underflows whatever the importance scale
    z_max = torch.full_like(z, -torch.inf)
    for index, w in corners:
        z_max = z_max.scatter_reduce(2, index, torch.where(w > 0, z, torch.full_like(z, -torch.inf)), "amax")
    z_max = torch.where(torch.isfinite(z_max), z_max, torch.zeros_like(z_max)).detach()
    num = xf.new_zeros(xf.shape)
    den = xf.new_zeros(xf.shape[0], 1, H * W)
    cov = xf.new_zeros(xf.shape[0], 1, H * W)
    for index, w in corners:
        # <= the bilinear weight; the clamp only bites where w = 0 (a corner outside the frame)
        weight = w * torch.exp((z - z_max.gather(2, index)).clamp(max=0.0))  # [B,1,HW]
        num = num.scatter_add(2, index.expand(-1, C, -1), xf * weight)
        den = den.scatter_add(2, index, weight)
        cov = cov.scatter_add(2, index, w)
    out = num / (den + SPLAT_EPS)
    return (out.to(x.dtype).reshape(*lead, C, H, W), cov.to(x.dtype).reshape(*lead, 1, H, W))


def compose_backward(flows: Tensor, visibility: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Chain one-step backward flows into flows back to the first frame: [*,K,2,H,W] -> [*,K,2,H,W].

    flows[..., k, :, :, :] maps frame k+1 -> k (on frame k+1's grid); the result's k maps frame k+1 -> 0:
    A_k(p) = b_k(p) + A_{k-1}(p + b_k(p)), each earlier step sampled where the later one lands (the one
    warp). visibility [*,K,1,H,W] (1 = visible in the frame before), when given, is chained the same way
    (visible in frame 0 = visible at every step along the path) and returned second.
    """
    if flows.dim() < 4:
        raise ValueError(f"flows must be [*, K, 2, H, W], got {tuple(flows.shape)}")
    _check_flow(flows, "flows")
    acc, vis, out, out_vis = None, None, [], []
    for k in range(flows.shape[-4]):
        b = flows[..., k, :, :, :]
        acc = b if acc is None else b + warp(acc, b)
        out.append(acc)
        if visibility is not None:
            v = visibility[..., k, :, :, :]
            vis = v if vis is None else v * warp(vis, b)
            out_vis.append(vis)
    return torch.stack(out, dim=-4), (torch.stack(out_vis, dim=-4) if visibility is not None else None)


def resize_flow(flow: Tensor, size: tuple[int, int], *, mode: str = "auto") -> Tensor:
    """Resize flow [*,2,H,W] to size=(h, w) and rescale its vectors: x by w/W, y by h/H.

    mode: "area" (average, for shrinking), "bilinear" (align_corners=False), or "auto" = area when
    neither side grows, else bilinear. Pixel centres follow the half-pixel convention, so a
    displacement of d pixels at width W is d * w / W pixels at width w.
    """
    _check_flow(flow)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (height, width) with both >= 1, got {size}")
    h, w = int(size[0]), int(size[1])
    H, W = flow.shape[-2:]
    if (h, w) == (H, W):
        return flow
    if mode == "auto":
        mode = "area" if h <= H and w <= W else "bilinear"
    if mode not in ("area", "bilinear"):
        raise ValueError(f"mode must be 'auto', 'area' or 'bilinear', got {mode!r}")
    lead = flow.shape[:-3]
    dtype = torch.promote_types(flow.dtype, torch.float32)
    ff = flow.reshape(-1, 2, H, W).to(dtype)  # [B,2,H,W]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(ff, size=(h, w), mode=mode, **kw)  # [B,2,h,w]
    scale = torch.tensor([w / W, h / H], device=flow.device, dtype=dtype).view(1, 2, 1, 1)
    return (out * scale).to(flow.dtype).reshape(*lead, 2, h, w)
