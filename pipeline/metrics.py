"""The project's one metrics module: PSNR, skimage-compatible SSIM, LPIPS, and collision AP / F1.

Images are torch tensors [..., 3, H, W] with values in [0, 1]; every image metric returns one value per
image, shape [...] (the leading dims of the input), so callers average however they like.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.pretrained import hub_path, torchvision_weights

__all__ = [
    "psnr", "ssim", "ssim_map", "region_psnr", "region_ssim", "hue_histogram", "histogram_distance", "gaussian_window", "LPIPSUnavailable", "lpips_backbone_path", "load_lpips",
    "lpips_distance", "average_precision", "f1_score", "best_f1", "event_recall", "confusion_scores", "finite_mean", "PSNR_MAX_DB",
]

# PSNR of identical images is +inf; it is capped here so that averages and JSON stay finite.
PSNR_MAX_DB = 100.0
# images per float64 block inside SSIM (speed only: every image is scored on its own)
SSIM_CHUNK = 32


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"pred and target must be torch.Tensors, got {type(pred).__name__}, {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dim() < 3:
        raise ValueError(f"images must have shape [..., C, H, W], got {tuple(pred.shape)}")


def psnr(pred: Tensor, target: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: [..., C, H, W] -> [...] (capped at PSNR_MAX_DB)."""
    _check_pair(pred, target)
    diff = pred.to(torch.float64) - target.to(torch.float64)
    mse = diff.square().mean(dim=(-3, -2, -1))  # [...]
    floor = data_range ** 2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    return (10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))).to(torch.float32)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5, *, dtype=torch.float64, device=None) -> Tensor:
    """1-D Gaussian taps as scipy.ndimage builds them: radius int(truncate * sigma + 0.5), sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()  # [2r+1]


def ssim(pred: Tensor, target: Tensor, *, data_range: float = 1.0, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM per image, [..., C, H, W] -> [...], equal to skimage's structural_similarity.

    Matches `structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=-1)`: an 11-tap Gaussian (truncate 3.5), population covariances, and the
    SSIM map averaged after cropping the filter radius from each border. Inside that crop skimage's
    reflect-padded filter never reaches the padding, so a 'valid' convolution gives the same numbers.
    The per-channel means are averaged, as skimage does with channel_axis.
    """
    s = _ssim_channels(pred, target, data_range=data_range, sigma=sigma, k1=k1, k2=k2)  # [...,C,h,w]
    return s.mean(dim=(-2, -1)).mean(dim=-1).to(torch.float32)  # [...]


def ssim_map(pred: Tensor, target: Tensor, *, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """The SSIM map behind `ssim`, averaged over channels: [..., C, H, W] -> [..., H-2r, W-2r] (r = 5, the
    Gaussian radius cropped from each border), for scores over a region (e.g. a static background mask)."""
    return _ssim_channels(pred, target, data_range=data_range, sigma=sigma).mean(dim=-3).to(torch.float32)


def _valid_blur_matrix(win: Tensor, n: int) -> Tensor:
    """[n-K+1, n] matrix whose row i holds the K taps at columns i..i+K-1: a 'valid' 1-D convolution as a matmul."""
    K = win.numel()
    cols = torch.arange(n - K + 1, device=win.device)[:, None] + torch.arange(K, device=win.device)  # [n-K+1,K]
    return torch.zeros(n - K + 1, n, dtype=win.dtype, device=win.device).scatter_(1, cols, win.expand(n - K + 1, K))


def _ssim_channels(pred: Tensor, target: Tensor, *, data_range: float, sigma: float, k1: float = 0.01,
                   k2: float = 0.03) -> Tensor:
    """Per-channel SSIM maps on the valid crop, float64: [..., C, H, W] -> [..., C, H-K+1, W-K+1]."""
    _check_pair(pred, target)
    lead, (C, H, W) = pred.shape[:-3], pred.shape[-3:]
    win = gaussian_window(sigma, dtype=torch.float64, device=pred.device)  # [K]
    K = win.numel()
    if H < K or W < K:
        raise ValueError(f"ssim needs images of at least {K}x{K} pixels (the Gaussian window), got {H}x{W}")
    x = pred.reshape(-1, H, W)  # [B*C,H,W]
    y = target.reshape(-1, H, W)
    rows, cols = _valid_blur_matrix(win, H), _valid_blur_matrix(win, W)  # [H-K+1,H], [W-K+1,W]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def blur(img: Tensor) -> Tensor:  # separable valid Gaussian: [n,H,W] -> [n,H-K+1,W-K+1]
        return rows @ img @ cols.T  # float64 matmuls: ~3.5x faster on CPU than float64 conv2d (bench_eval_kernels)

    maps = []
    for i in range(0, x.shape[0], SSIM_CHUNK):  # chunks keep the float64 intermediates in cache (~2.5x faster)
        a, b = x[i:i + SSIM_CHUNK].to(torch.float64), y[i:i + SSIM_CHUNK].to(torch.float64)
        ux, uy, uxx, uyy, uxy = (blur(z) for z in (a, b, a * a, b * b, a * b))  # each [n,h,w]
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        maps.append(((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2)))
    s = torch.cat(maps) if maps else x.new_zeros((0, H - K + 1, W - K + 1), dtype=torch.float64)  # [B*C,h,w]
    return s.reshape(*lead, C, H - K + 1, W - K + 1)


def region_psnr(pred: Tensor, target: Tensor, mask: Tensor, *, data_range: float = 1.0) -> Tensor:
    """PSNR over the pixels where `mask` is true: [..., C, H, W] with mask [..., H, W] -> [...]; NaN where it is empty."""
    _check_pair(pred, target)
    if mask.shape != pred.shape[:-3] + pred.shape[-2:]:
        raise ValueError(f"mask must be {tuple(pred.shape[:-3] + pred.shape[-2:])} for images {tuple(pred.shape)}, "
                         f"got {tuple(mask.shape)}")
    m = mask.to(torch.float64)[..., None, :, :]  # [...,1,H,W]
    sq = (pred.to(torch.float64) - target.to(torch.float64)).square() * m
    count = m.sum(dim=(-3, -2, -1)) * pred.shape[-3]
    mse = sq.sum(dim=(-3, -2, -1)) / count  # NaN where count is 0
    floor = data_range ** 2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    return (10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))).to(torch.float32)


def region_ssim(pred: Tensor, target: Tensor, mask: Tensor, *, data_range: float = 1.0) -> Tensor:
    """SSIM map averaged over the pixels where `mask` is true (inside the map's border crop): [..., C, H, W],
    mask [..., H, W] -> [...]; NaN where the cropped mask is empty."""
    smap = ssim_map(pred, target, data_range=data_range).to(torch.float64)  # [...,h,w]
    if mask.shape != pred.shape[:-3] + pred.shape[-2:]:
        raise ValueError(f"mask must be {tuple(pred.shape[:-3] + pred.shape[-2:])} for images {tuple(pred.shape)}, "
                         f"got {tuple(mask.shape)}")
    r = (mask.shape[-2] - smap.shape[-2]) // 2
    m = mask[..., r:mask.shape[-2] - r, r:mask.shape[-1] - r].to(torch.float64)
    return ((smap * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))).to(torch.float32)


def hue_histogram(frames: Tensor, *, chroma: float, bins: int = 12) -> Tensor:
    """Counts of hue over the coloured pixels (max - min of RGB > chroma: CLEVRER's gray floor is left out):
    frames [..., 3, H, W] in [0,1] -> [..., bins]."""
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"hue_histogram expects RGB frames [..., 3, H, W], got {tuple(frames.shape)}")
    x = frames.to(torch.float64)
    r, g, b = x.unbind(-3)
    hi, lo = x.max(dim=-3).values, x.min(dim=-3).values
    c = (hi - lo).clamp_min(1e-12)
    hue = torch.where(hi == r, ((g - b) / c) % 6.0, torch.where(hi == g, (b - r) / c + 2.0, (r - g) / c + 4.0)) / 6.0
    index = (hue * bins).long().clamp(0, bins - 1)  # [...,H,W]
    coloured = ((hi - lo) > chroma).to(torch.float64)
    counts = torch.zeros(*index.shape[:-2], bins, dtype=torch.float64, device=frames.device)
    return counts.scatter_add_(-1, index.flatten(-2), coloured.flatten(-2))


def histogram_distance(p: Tensor, q: Tensor) -> Tensor:
    """Total variation between histograms [..., bins] after normalising each: 0 = same, 1 = disjoint;
    two empty histograms are 0 apart, an empty and a non-empty one 1."""
    if p.shape != q.shape:
        raise ValueError(f"histograms must have one shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    sp, sq = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
    tv = 0.5 * (p / sp.clamp_min(1e-12) - q / sq.clamp_min(1e-12)).abs().sum(-1)
    empty_p, empty_q = sp[..., 0] == 0, sq[..., 0] == 0
    tv = torch.where(empty_p & empty_q, torch.zeros_like(tv), tv)
    return torch.where(empty_p ^ empty_q, torch.ones_like(tv), tv).to(torch.float32)


# ---------------------------------------------------------------------------------------------- LPIPS

class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be computed honestly here (e.g. the ImageNet backbone weights are not cached)."""


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision looks for the LPIPS backbone's ImageNet weights: <torch hub dir>/checkpoints/<file>."""
    if net not in ("alex", "vgg"):
        raise ValueError(f"lpips net must be one of ['alex', 'vgg'], got {net!r}")
    return hub_path(net)


def load_lpips(net: str = "alex", *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The official `lpips.LPIPS` model (pretrained linear layers + cached ImageNet backbone), in eval mode.

    Raises LPIPSUnavailable, without any network call, when the backbone weights are not in the torch hub
    cache: LPIPS with a randomly initialised backbone is not LPIPS and is never computed.
    """
    path = lpips_backbone_path(net)
    if not path.is_file():
        raise LPIPSUnavailable(f"LPIPS({net}) backbone weights not found at {path} (no network download is "
                               f"attempted here); run the pretrained stage with weights.download: true, or place torchvision's "
                               f"{torchvision_weights(net)} file in the torch hub cache and re-run dvc repro")
    try:
        import lpips
    except ImportError as e:  # pragma: no cover - lpips is in requirements.txt
        raise LPIPSUnavailable(f"the `lpips` package is not installed: {e}") from e
    try:
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=True` spelling
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=False, verbose=False)
    except Exception as e:  # a truncated or foreign weights file
        raise LPIPSUnavailable(f"LPIPS({net}) could not load its weights ({path}): {type(e).__name__}: {e}") from e
    model.requires_grad_(False)
    return model.eval().to(device)


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, pred: Tensor, target: Tensor, *, batch: int = 64) -> Tensor:
    """LPIPS distance per image, [..., 3, H, W] in [0, 1] -> [...] (lower is better)."""
    _check_pair(pred, target)
    if pred.shape[-3] != 3:
        raise ValueError(f"lpips needs RGB images [..., 3, H, W], got {tuple(pred.shape)}")
    lead, chw = pred.shape[:-3], pred.shape[-3:]
    device = next(model.parameters()).device
    a, b = pred.reshape(-1, *chw), target.reshape(-1, *chw)  # [N,3,H,W]
    out = [model(a[i:i + batch].to(device, torch.float32), b[i:i + batch].to(device, torch.float32),
                 normalize=True).flatten().cpu()
           for i in range(0, a.shape[0], batch)]
    return torch.cat(out).reshape(lead).to(torch.float32) if out else torch.zeros(lead)


# ------------------------------------------------------------------------------------------ collision

def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have the same number of elements")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def average_precision(scores, labels) -> float | None:
    """Area under the step precision-recall curve, sum_n (R_n - R_{n-1}) P_n (sklearn's definition).

    Tied scores form one threshold. Returns None when there is no positive label (AP is undefined).
    """
    s, y = _scores_labels(scores, labels)
    if not y.any():
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # index of the last item at each threshold
    tp = np.cumsum(y)[last_of_group]
    fp = (last_of_group + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion_scores(*, tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """F1, IoU, precision and recall from counts; None where a ratio has no denominator."""
    return {"f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def f1_score(scores, labels, *, threshold: float = 0.5) -> float | None:
    """F1 of `scores >= threshold` against labels; None when there is neither a positive label nor prediction."""
    s, y = _scores_labels(scores, labels)
    hit = s >= threshold
    return confusion_scores(tp=int(np.sum(hit & y)), fp=int(np.sum(hit & ~y)), fn=int(np.sum(~hit & y)))["f1"]


def best_f1(scores, labels) -> tuple[float | None, float | None]:
    """The highest F1 over every threshold (each distinct score) and that threshold; (None, None) without positives."""
    s, y = _scores_labels(scores, labels)
    if not y.any():
        return None, None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_group]
    predicted = last_of_group + 1
    f1 = 2 * tp / (predicted + y.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(s[last_of_group[best]])


def event_recall(scores, labels, *, threshold: float, tolerance: int = 1) -> float | None:
    """Share of positive frames (events) with a score >= threshold within +-tolerance frames, per sequence.

    scores, labels [N, F]: N sequences (videos) of F consecutive frames. None when there is no event.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"event_recall needs scores and labels of one shape [N, F], got {s.shape} and {y.shape}")
    _scores_labels(s, y)  # same value checks
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    hit = s >= threshold
    near = hit.copy()
    for d in range(1, tolerance + 1):
        near[:, d:] |= hit[:, :-d]
        near[:, :-d] |= hit[:, d:]
    events = y.astype(bool)
    return float(near[events].mean()) if events.any() else None


def finite_mean(x) -> float | None:
    """The mean of the finite entries of an array (for JSON), None when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None
