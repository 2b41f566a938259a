"""The control stage's work: dual_vae's appearance and motion latents used apart, and how far apart they stay.

On pairs (A, B) of `eval.split` videos (B = the next video of the first `control.pairs`, so no video is its
own partner) it rolls out `eval.horizon` frames three ways:
- `transfer`: the appearance window of A's last `model.context` frames, the motion window of B's flows;
- `still`: A's last context frame repeated as the whole appearance window (a still image), B's motion;
- `constant`: the same still, the motion window of a constant flow `control.constant_flow` (pixels/frame).

Every number stands beside the references that say what it means (docs/EVALUATION.md "Control"):
- motion fidelity, EPE of the generated video's flow (the flow backend the flow stage uses, run on
  [A's last frame, generated frames]) against the motion asked for (B's stored flow into frames
  C..C+H-1, or the constant field), beside `zero_flow` (nothing moves), `copy_b` (B's real frames, the
  backend's own floor) and `warp_b` / `warp_constant` (A's still warped by exactly that motion: the ideal
  dense transfer, which shows nothing where it moves flat floor); on all pixels and on the moving ones
  (|flow| > MOVING_PX);
- appearance fidelity against A's still frame: PSNR / SSIM on the static background (outside A's object
  boxes and every box of B over the horizon) and the hue-histogram distance of the coloured (object)
  pixels, beside `copy_b`, i.e. a shuffled pair: another video's frames;
- the swap test: b_share = d(G, A) / (d(G, A) + d(G, B)) of the histogram distances, 0 when the generated
  objects have A's colours, 1 when they have B's;
- leakage: linear probes (pipeline.probes) fitted on train-split windows, explained variance on the split:
  flow from the appearance latent and colour from the motion latent (0 = disentangled), and each stream's
  own quantity as the reference, for the frozen VAEs' latents (`input`) and the model's next-step
  predictions (`predicted`).

A model is controllable when it has the interface below (DualVAE does; tests build ones by hand):
`context`, `encode_appearance(frames [B,T,3,H,W]) -> [B,T,Ca,h,w]`, `encode_motion(flow [B,T-1,2,H,W]) ->
[B,T-1,Cm,h,w]`, `step(z_win [B,c,Ca,h,w], zf_win [B,c-1,Cm,h,w]) -> {'z', 'zf', ...}`,
`rollout_from(z_ctx, zf_ctx, *, last_frame, horizon) -> {'frames' [B,H,3,H,W], 'zf', ...}` and
`decode_motion(zf [B,n,Cm,h,w]) -> [B,n,2,H,W]`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.flow.ops import compose_backward, warp
from pipeline.losses import epe_map
from pipeline.metrics import histogram_distance, hue_histogram, region_psnr, region_ssim
from pipeline.predictions import to_uint8
from pipeline.probes import cell_features, cell_targets, explained_variance, fit_probe
from pipeline.stats import bootstrap_mean, resample_indices

LOG = logging.getLogger(__name__)

__all__ = ["ControlSettings", "MODES", "MOVING_PX", "pair_indices", "motion_windows", "generate", "video_flow",
           "background_mask", "score_pairs", "probe_samples", "leakage", "summarize_control", "not_applicable",
           "run_control", "write_control_figures", "control"]

MODES = ("transfer", "still", "constant")
MOVING_PX = 0.5  # a pixel of B moves when its stored flow is longer than this (the flow VAE's moving threshold)
HUE_BINS = 12
FlowFn = Callable[[np.ndarray], Tensor]  # uint8 videos [N,L+1,H,W,3] -> backward flows [N,L,2,H,W]


@dataclass(frozen=True)
class ControlSettings:
    """What control needs from params: the control section and eval.split/context/horizon/bootstrap."""

    split: str
    context: int
    horizon: int
    pairs: int
    constant_flow: tuple[float, float]
    probe_videos: int
    probe_ridge: float
    chroma: float
    figures: int
    bootstrap: int
    confidence: float
    seed: int

    @classmethod
    def from_params(cls, params) -> "ControlSettings":
        c, e = params.control, params.eval
        return cls(split=e.split, context=e.context, horizon=e.horizon, pairs=c.pairs,
                   constant_flow=tuple(c.constant_flow), probe_videos=c.probe_videos, probe_ridge=c.probe_ridge,
                   chroma=c.chroma, figures=c.figures, bootstrap=e.bootstrap, confidence=e.confidence, seed=e.seed)


def pair_indices(num_videos: int, pairs: int) -> list[tuple[int, int]]:
    """(A, B) video rows: A = i, B = i + 1 (wrapping) over the first min(pairs, num_videos) videos."""
    n = min(pairs, num_videos)
    if n < 2:
        raise ValueError(f"control needs at least 2 videos to pair, got {num_videos} videos and control.pairs={pairs}")
    return [(i, (i + 1) % n) for i in range(n)]


# ---- generation ---------------------------------------------------------------------------------
def motion_windows(model: nn.Module, a: dict[str, Tensor], b: dict[str, Tensor], *, mode: str,
                   constant_flow: tuple[float, float] = (0.0, 0.0)) -> tuple[Tensor, Tensor, Tensor]:
    """(appearance window [P,c,Ca,h,w], motion window [P,c-1,Cm,h,w], A's last frame [P,3,H,W]) for `mode`.

    a and b hold observed context clips: frames [P,C,3,H,W] and flow_bwd [P,C-1,2,H,W].
    """
    if mode not in MODES:
        raise ValueError(f"control mode must be one of {MODES}, got {mode!r}")
    c = model.context
    frames_a, flow_b = a["frames"], b["flow_bwd"]
    if c < 2:
        raise ValueError(f"control needs model.context >= 2 (a motion window lies between frames), got {c}")
    if frames_a.shape[1] < c or flow_b.shape[1] < c - 1:
        raise ValueError(f"control needs {c} context frames and {c - 1} flows (model.context), got frames "
                         f"{tuple(frames_a.shape)} and flows {tuple(flow_b.shape)}")
    last = frames_a[:, -1]  # [P,3,H,W]
    if mode == "transfer":
        z = model.encode_appearance(frames_a[:, -c:])  # [P,c,Ca,h,w]
    else:
        z = model.encode_appearance(last[:, None]).expand(-1, c, -1, -1, -1)  # a still: one frame, c times
    if mode == "constant":
        P, _, _, H, W = frames_a.shape
        field = torch.tensor(constant_flow, dtype=flow_b.dtype, device=flow_b.device).view(1, 1, 2, 1, 1)
        # constant motion v moves the content by v per frame: its backward flow (t+1 -> t) is -v
        zf = model.encode_motion(-field.expand(P, c - 1, 2, H, W))  # [P,c-1,Cm,h,w]
    else:
        zf = model.encode_motion(flow_b[:, flow_b.shape[1] - (c - 1):])  # [P,c-1,Cm,h,w]
    return z, zf, last


@torch.no_grad()
def generate(model: nn.Module, a: dict[str, Tensor], b: dict[str, Tensor], *, mode: str, horizon: int,
             constant_flow: tuple[float, float] = (0.0, 0.0)) -> dict[str, Tensor]:
    """frames [P,horizon,3,H,W] in [0,1] and the model's own decoded motion [P,horizon,2,H,W] for `mode` (on the CPU)."""
    device = _device(model)
    a, b = ({k: v.to(device) for k, v in x.items()} for x in (a, b))
    z, zf, last = motion_windows(model, a, b, mode=mode, constant_flow=constant_flow)
    out = model.rollout_from(z, zf, last_frame=last, horizon=horizon)
    return {"frames": out["frames"].clamp(0.0, 1.0).float().cpu(), "motion": model.decode_motion(out["zf"]).float().cpu()}


def _device(model: nn.Module) -> torch.device:
    """Where the model's weights live (the CPU for a model without any)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def video_flow(backend: Callable, videos: np.ndarray) -> Tensor:
    """Backward flows [N,L,2,H,W] of uint8 videos [N,L+1,H,W,3] by a flow backend (pipeline.flow.backends)."""
    from pipeline.flow.backends import PairBatch

    N, L1 = videos.shape[:2]
    _, bwd = backend(PairBatch.from_clips(list(videos)))  # [N*L,2,H,W]
    return bwd.float().cpu().view(N, L1 - 1, *bwd.shape[1:])


def background_mask(boxes_a: Tensor, mask_a: Tensor, boxes_b: Tensor, mask_b: Tensor, size: tuple[int, int],
                    *, margin: int = 1) -> Tensor:
    """[P,H,W] bool: pixels outside every box of A (boxes_a [P,Ka,4] normalised xyxy, mask_a [P,Ka]) and of B
    over the horizon (boxes_b [P,n,Kb,4], mask_b [P,n,Kb]), each box grown by `margin` pixels."""
    H, W = size
    boxes = torch.cat([boxes_a, boxes_b.flatten(1, 2)], dim=1)  # [P,K,4]
    valid = torch.cat([mask_a, mask_b.flatten(1, 2)], dim=1) > 0  # [P,K]
    ys = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W) + 0.5
    x0, y0, x1, y1 = (boxes[..., i, None, None] * s for i, s in zip(range(4), (W, H, W, H)))
    inside = (xs >= x0 - margin) & (xs <= x1 + margin) & (ys >= y0 - margin) & (ys <= y1 + margin)  # [P,K,H,W]
    return ~(inside & valid[..., None, None]).any(dim=1)


# ---- scores -------------------------------------------------------------------------------------
def _motion(flow: Tensor, target: Tensor) -> dict[str, np.ndarray]:
    """Per-pair EPE [P] of flows [P,n,2,H,W] against the target on every pixel and on the target's moving ones."""
    epe = epe_map(flow.flatten(0, 1), target.flatten(0, 1)).view(target.shape[0], -1)  # [P,n*H*W]
    moving = (target.norm(dim=2) > MOVING_PX).flatten(1).float()  # [P,n*H*W]
    epe_moving = (epe * moving).sum(1) / moving.sum(1)  # NaN where B does not move
    return {"epe": epe.mean(1).numpy(), "epe_moving": epe_moving.numpy()}


def _appearance(frames: Tensor, still: Tensor, hist_a: Tensor, hist_b: Tensor, background: Tensor, *,
                chroma: float) -> dict[str, np.ndarray]:
    """Per-pair appearance scores [P] of frames [P,n,3,H,W] against A's still [P,3,H,W]."""
    n = frames.shape[1]
    bg = background[:, None].expand(-1, n, -1, -1)  # [P,n,H,W]
    target = still[:, None].expand_as(frames)
    hist = hue_histogram(frames, chroma=chroma, bins=HUE_BINS).sum(1)  # [P,bins], pooled over the horizon
    to_a, to_b = histogram_distance(hist, hist_a), histogram_distance(hist, hist_b)
    return {"background_psnr": region_psnr(frames.flatten(0, 1), target.flatten(0, 1), bg.flatten(0, 1))
            .view(-1, n).mean(1).numpy(),
            "background_ssim": region_ssim(frames.flatten(0, 1), target.flatten(0, 1), bg.flatten(0, 1))
            .view(-1, n).mean(1).numpy(),
            "hist_to_a": to_a.numpy(), "hist_to_b": to_b.numpy(),
            "b_share": (to_a / (to_a + to_b).clamp_min(1e-6)).numpy()}


def score_pairs(model: nn.Module, a: dict[str, Tensor], b: dict[str, Tensor], *, horizon: int, flow_fn: FlowFn,
                chroma: float, constant_flow: tuple[float, float]) -> tuple[dict, dict]:
    """Per-pair scores {method: {metric: [P]}} of the three modes and the references, and the generated frames.

    a and b are whole clips (frames [P,T,3,H,W], flow_bwd [P,T-1,2,H,W], boxes, box_mask) of at least
    C + horizon frames, with 'observed': their first C frames as `clip_slice(..., observed=True)` cuts them;
    only the observed part reaches the model.
    """
    C = a["observed"]["frames"].shape[1]
    P, _, _, H, W = a["frames"].shape
    still = a["frames"][:, C - 1]  # [P,3,H,W]
    future = slice(C, C + horizon)
    target_b = b["flow_bwd"][:, C - 1:C - 1 + horizon].float()  # [P,n,2,H,W]: into frames C..C+n-1
    v = torch.tensor(constant_flow, dtype=torch.float32).view(1, 1, 2, 1, 1)
    target_constant = (-v).expand(P, horizon, 2, H, W)  # constant motion v: backward flow -v
    background = background_mask(a["boxes"][:, C - 1], a["box_mask"][:, C - 1], b["boxes"][:, future],
                                 b["box_mask"][:, future], (H, W))
    hist_a = hue_histogram(still, chroma=chroma, bins=HUE_BINS)  # [P,bins]
    hist_b = hue_histogram(b["frames"][:, future], chroma=chroma, bins=HUE_BINS).sum(1)
    scores, generated = {}, {}
    for mode in MODES:
        out = generate(model, a["observed"], b["observed"], mode=mode, horizon=horizon, constant_flow=constant_flow)
        frames = out["frames"]
        generated[mode] = frames
        target = target_constant if mode == "constant" else target_b
        flow = video_flow(flow_fn, to_uint8(torch.cat([still[:, None], frames], dim=1)))
        scores[mode] = {**_motion(flow, target),
                        **{f"model_motion_{k}": x for k, x in _motion(out["motion"], target).items()},
                        **_appearance(frames, still, hist_a, hist_b, background, chroma=chroma)}
    copy_b = b["frames"][:, C - 1:C + horizon]  # B's real frames from the last context one
    scores["copy_b"] = {**_motion(video_flow(flow_fn, to_uint8(copy_b)), target_b),
                        **_appearance(copy_b[:, 1:], still, hist_a, hist_b, background, chroma=chroma)}
    for name, target in (("warp_b", target_b), ("warp_constant", target_constant)):
        # the ideal dense transfer: A's still carried by exactly the motion asked for (what a perfect model reaches:
        # where A is flat floor, moving it shows nothing the flow backend can see)
        composed, _ = compose_backward(target)  # [P,n,2,H,W]: frame C+k -> C-1
        frames = warp(still[:, None].expand(-1, horizon, -1, -1, -1), composed)
        scores[name] = {**_motion(video_flow(flow_fn, to_uint8(torch.cat([still[:, None], frames], dim=1))), target),
                        **_appearance(frames, still, hist_a, hist_b, background, chroma=chroma)}
    zero = torch.zeros_like(target_b)
    scores["zero_flow"] = _motion(zero, target_b)
    scores["zero_flow_constant"] = _motion(zero, target_constant)
    scores["background_pixels"] = {"fraction": background.float().mean(dim=(1, 2)).numpy()}
    return scores, generated


# ---- leakage probes -----------------------------------------------------------------------------
@torch.no_grad()
def probe_samples(model: nn.Module, windows, *, neighbourhood: int = 3) -> dict[str, Tensor]:
    """Per-cell probe rows from windows of c+1 real frames (an iterable of batches: frames [B,c+1,3,H,W],
    flow_bwd [B,c,2,H,W]): the appearance and motion parts of the last frame, as the VAEs encode them
    (`appearance_input`, `motion_input`) and as the model predicts them from the c frames before
    (`appearance_predicted`, `motion_predicted`), with the targets `flow` (its backward flow, per cell) and
    `colour` (its mean RGB per cell)."""
    c, device = model.context, _device(model)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("appearance_input", "motion_input", "appearance_predicted",
                                                     "motion_predicted", "flow", "colour")}
    for batch in windows:
        frames, flow = batch["frames"].to(device), batch["flow_bwd"].to(device)  # [B,c+1,3,H,W], [B,c,2,H,W]
        if frames.shape[1] != c + 1:
            raise ValueError(f"probe windows must hold model.context + 1 = {c + 1} frames, got {tuple(frames.shape)}")
        z, zf = model.encode_appearance(frames), model.encode_motion(flow)  # [B,c+1,Ca,h,w], [B,c,Cm,h,w]
        out = model.step(z[:, :c], zf[:, :c - 1])
        grid = tuple(z.shape[-2:])
        parts = {"appearance_input": z[:, c], "motion_input": zf[:, c - 1],
                 "appearance_predicted": out["z"], "motion_predicted": out["zf"]}
        for name, part in parts.items():
            rows[name].append(cell_features(part.float().cpu(), neighbourhood=neighbourhood))
        rows["flow"].append(cell_targets(flow[:, c - 1].float().cpu(), grid))
        rows["colour"].append(cell_targets(frames[:, c].float().cpu(), grid))
    if not rows["flow"]:
        raise ValueError("probe_samples got no windows")
    return {k: torch.cat(v) for k, v in rows.items()}


PROBES = {  # name -> (the part it reads, the quantity it predicts); the first two are leakage
    "flow_from_appearance": ("appearance", "flow"),
    "colour_from_motion": ("motion", "colour"),
    "flow_from_motion": ("motion", "flow"),
    "colour_from_appearance": ("appearance", "colour"),
}


def leakage(train: dict[str, Tensor], test: dict[str, Tensor], *, ridge: float) -> dict[str, dict[str, float]]:
    """{input|predicted: {probe: explained variance on test}} for every probe of PROBES, fitted on train."""
    result = {}
    for source in ("input", "predicted"):
        result[source] = {}
        for name, (part, quantity) in PROBES.items():
            key = f"{part}_{source}"
            probe = fit_probe(train[key], train[quantity], ridge=ridge)
            result[source][name] = round(explained_variance(test[quantity].double(), probe(test[key])), 4)
    return result


# ---- report -------------------------------------------------------------------------------------
def summarize_control(scores: dict, *, resamples: int, level: float, seed: int) -> dict:
    """{method: {metric: {mean, lo, hi, n}}}: bootstrap over pairs (pairs with a NaN score, e.g. B never moves,
    are left out of that metric and counted in n)."""
    summary = {}
    for method, metrics in scores.items():
        summary[method] = {}
        for metric, values in metrics.items():
            x = np.asarray(values, dtype=np.float64)
            x = x[np.isfinite(x)]
            if len(x) == 0:
                summary[method][metric] = None
                continue
            iv = bootstrap_mean(x, resample_indices(len(x), resamples=resamples, seed=seed), level=level)
            summary[method][metric] = {"mean": round(iv.mean, 4), "lo": round(iv.lo, 4), "hi": round(iv.hi, 4),
                                       "n": iv.n}
    return summary


def not_applicable(arch: str) -> dict:
    """The control report of an arch without separate appearance and motion latents."""
    return {"applies": False, "arch": arch,
            "reason": f"model.arch={arch} has no separate appearance and motion latents; control measures "
                      f"dual_vae (dvc exp run -S model.arch=dual_vae)"}


def run_control(model: nn.Module, *, videos, train_windows, test_windows, flow_fn: FlowFn,
                settings: ControlSettings) -> tuple[dict, dict]:
    """The control report and the generated frames of the figure pairs.

    videos: a dataset of whole eval.split videos (ClipDataset items); train_windows / test_windows:
    iterables of c+1-frame batches for the probes.
    """
    from pipeline.clips import clip_slice

    C, n = settings.context, settings.horizon
    pairs = pair_indices(len(videos), settings.pairs)
    items = [videos[i] for i in range(len(pairs))]
    stack = {k: torch.stack([it[k] for it in items]) for k in ("frames", "flow_bwd", "boxes", "box_mask")}
    if stack["frames"].shape[1] < C + n:
        raise ValueError(f"control: videos have {stack['frames'].shape[1]} frames, need eval.context + "
                         f"eval.horizon = {C + n}")
    a_rows, b_rows = [p[0] for p in pairs], [p[1] for p in pairs]
    a = {k: v[a_rows] for k, v in stack.items()}
    b = {k: v[b_rows] for k, v in stack.items()}
    a["observed"] = clip_slice(a, 0, C, observed=True)
    b["observed"] = clip_slice(b, 0, C, observed=True)
    scores, generated = score_pairs(model, a, b, horizon=n, flow_fn=flow_fn, chroma=settings.chroma,
                                    constant_flow=settings.constant_flow)
    report = {"applies": True, "split": settings.split, "pairs": len(pairs), "context": C, "horizon": n,
              "settings": asdict(settings), "moving_px": MOVING_PX,
              "methods": summarize_control(scores, resamples=settings.bootstrap, level=settings.confidence,
                                           seed=settings.seed),
              "leakage": leakage(probe_samples(model, train_windows), probe_samples(model, test_windows),
                                 ridge=settings.probe_ridge)}
    ids = [int(it["video_index"]) for it in items]
    figures = {"a": a["frames"][:, :C + n], "b": b["frames"][:, :C + n], **generated,
               "ids": [(ids[i], ids[j]) for i, j in pairs]}
    return report, figures


def write_control_figures(figures: dict, out_dir: str | Path, *, count: int, context: int) -> None:
    """out_dir/pair_<A>_<B>.png (rows A | B | transfer | still | constant) and .gif for `count` pairs, atomically
    (an empty directory when count is 0 or the arch does not apply: figures=None)."""
    from pipeline.io import atomic_path

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if figures is not None:
            _write_pairs(figures, tmp, count=count, context=context)


def _write_pairs(figures: dict, out_dir: Path, *, count: int, context: int) -> None:
    from pipeline.report import labelled_strip, side_by_side_gif

    ids = figures["ids"]
    for i in range(min(count, figures["a"].shape[0])):
        a, b = to_uint8(figures["a"][i]), to_uint8(figures["b"][i])  # [C+n,H,W,3]
        rows = {"A (appearance)": a, "B (motion)": b}
        for mode in MODES:
            rows[mode] = np.concatenate([a[:context] if mode == "transfer" else
                                         np.repeat(a[context - 1:context], context, 0),
                                         to_uint8(figures[mode][i])])
        name = f"pair_{ids[i][0]:05d}_{ids[i][1]:05d}"
        labelled_strip(rows, out_dir / f"{name}.png", context=context,
                       title=f"{name}: appearance of A, motion of B ({context} context | predicted)")
        side_by_side_gif(out_dir / f"{name}.gif", list(rows.values()), context=context)


def _windows(frames_h5, flow_h5, split: str, length: int, *, videos: int, per_video: int, batch: int = 32):
    """Batches of `length`-frame windows of the first `videos` videos of `split`, `per_video` evenly spaced each."""
    from torch.utils.data import DataLoader, Subset

    from pipeline.data.datasets import ClipDataset

    ds = ClipDataset(frames_h5, split, length, flow_h5=flow_h5)
    wpv = ds.windows_per_video
    starts = np.unique(np.linspace(0, wpv - 1, min(per_video, wpv)).round().astype(int))
    rows = [v * wpv + int(t) for v in range(min(videos, ds.num_videos)) for t in starts]
    return DataLoader(Subset(ds, rows), batch_size=batch, shuffle=False, num_workers=0)


PROBE_WINDOWS_PER_VIDEO = 8


def control(params) -> tuple[dict, dict | None]:
    """The control stage: (report, figures) for params.model.arch; (not_applicable, None) unless dual_vae."""
    from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    from pipeline.data.datasets import ClipDataset, split_group
    from pipeline.flow.backends import build_backend
    from pipeline.io import open_h5, resolve_device
    from pipeline.models.temporal import rebuild_temporal
    from pipeline.pretrained import hub_dir, weights_dir

    paths, settings = params.paths, ControlSettings.from_params(params)
    if params.model.arch != "dual_vae":
        return not_applicable(params.model.arch), None
    device = resolve_device(params.device)
    ckpt = load_checkpoint(paths.temporal, kind="temporal", map_location=device)
    if ckpt.get("arch") != "dual_vae":
        raise ValueError(f"{paths.temporal}: a {ckpt.get('arch')!r} checkpoint, but params say model.arch=dual_vae; "
                         f"re-run train_temporal")
    model = model_from_checkpoint(ckpt, rebuild_temporal, path=paths.temporal, map_location=device)
    with hub_dir(weights_dir(paths.pretrained, "flow")):  # the flow stage's RAFT weights, when it has them
        backend, info = build_backend(params.flow, device)
    with open_h5(paths.flow, what="flow file") as f:
        stored = str(f.attrs.get("backend_used", ""))
    if info.backend_used != stored:
        LOG.warning(f"control: motion is measured with {info.backend_used}, but {paths.flow} was computed with "
                    f"{stored}: EPE against the stored flow then includes the difference of the two backends")
    length = model.context + 1
    videos = ClipDataset(paths.frames, settings.split, split_group(paths.frames, settings.split)[1], flow_h5=paths.flow,
                         first_window_only=True)
    train = _windows(paths.frames, paths.flow, "train", length, videos=settings.probe_videos,
                     per_video=PROBE_WINDOWS_PER_VIDEO)
    test = _windows(paths.frames, paths.flow, settings.split, length, videos=len(videos),
                    per_video=PROBE_WINDOWS_PER_VIDEO)
    report, figures = run_control(model, videos=videos, train_windows=train, test_windows=test,
                                  flow_fn=backend, settings=settings)
    report["flow_backend_used"] = info.backend_used
    return report, figures
