"""Inference on the test split: model rollouts (with and without TTT), 1-step predictions, and baselines.

Protocol (DESIGN §7): each test video gives `context` real frames, then `horizon` frames are predicted,
each fed back (`model.rollout`). The 1-step predictions use real history instead: the frame at
context + t is predicted from the real frames just before it. Every prediction is written to
predictions.h5 (layout below); metrics are computed by pipeline.evaluation.

predictions.h5 (written atomically):
    video_index                int64 [N]           CLEVRER ids of the test videos
    <method>/rollout           uint8 [N,horizon,H,W,3]
    <method>/step1             uint8 [N,horizon,H,W,3]
    model/collision, model_ttt/collision      float32 [N,horizon] collision logits of the rollout
    model_ttt/ttt_loss_before, ttt_loss_after float32 [N] context loss before / after adaptation
    model_ttt/ttt_best_step, ttt_steps        int32 [N];  model_ttt/ttt_diverged uint8 [N]
    model_ttt/ttt_grad_norm                   float32 [N] gradient norm of the first TTT step
    attrs: split, context, horizon, model_context, first_predicted_frame, arch, methods (JSON list),
           ttt (JSON: settings, enabled, supported, reason), timing (JSON: frames/s per method, seconds)
Methods: `model`, `model_ttt` (when ttt.enabled and the arch supports it), `copy_last`, `flow_extrap`
(the last context frame warped again and again by the last context backward flow) and `vae_ceiling`
(VAE reconstruction of the true frames: the best a latent model could decode).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.flow import warp
from pipeline.io import atomic_path
from pipeline.ttt import TestTimeTrainer, clip_slice, context_slice

__all__ = ["METHODS", "InferenceSettings", "to_uint8", "copy_last", "flow_extrapolation",
           "vae_reconstruction", "rollout_model", "step1_model", "predict_model", "run_inference", "infer"]

METHODS = ("model", "model_ttt", "copy_last", "flow_extrap", "vae_ceiling")


@dataclass(frozen=True)
class InferenceSettings:
    """What infer needs from params: eval.context/horizon/batch and the ttt section."""

    context: int
    horizon: int
    batch: int = 8
    ttt_enabled: bool = True
    ttt_steps: int = 20
    ttt_lr: float = 3e-4
    ttt_params: str = "flow_head"
    ttt_loss: str = "full"
    ttt_grad_clip: float = 1.0

    @classmethod
    def from_params(cls, params) -> "InferenceSettings":
        """Settings from a validated pipeline.config.Params."""
        t = params.ttt
        return cls(context=params.eval.context, horizon=params.eval.horizon, batch=params.eval.batch,
                   ttt_enabled=t.enabled, ttt_steps=t.steps, ttt_lr=t.lr, ttt_params=t.params,
                   ttt_loss=t.loss, ttt_grad_clip=t.grad_clip)


def to_uint8(frames: Tensor) -> np.ndarray:
    """Frames [B,T,3,H,W] in [0,1] -> uint8 [B,T,H,W,3] (rounded, clipped)."""
    x = frames.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).contiguous().cpu().numpy()


def copy_last(frames: Tensor, *, context: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Copy-last-frame baseline: (rollout, step1), each [B,horizon,3,H,W]."""
    rollout = frames[:, context - 1:context].expand(-1, horizon, -1, -1, -1)  # [B,Hz,3,H,W]
    step1 = frames[:, context - 1:context - 1 + horizon]  # the real frame just before each target
    return rollout.contiguous(), step1.contiguous()


def flow_extrapolation(frames: Tensor, flow_bwd: Tensor, *, context: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Constant-motion baseline: warp the last frame by the last backward flow, repeatedly.

    frames [B,L,3,H,W], flow_bwd [B,L-1,2,H,W] (flow_bwd[:, t] maps frame t+1 -> t). The rollout only
    uses flow between context frames (flow_bwd[:, context-2]); step1 predicts frame context+t from real
    frame context+t-1 and the real flow between frames context+t-2 and context+t-1.
    """
    if flow_bwd.shape[1] < context - 1 + horizon - 1 or frames.shape[1] < context + horizon - 1:
        raise ValueError(f"flow_extrapolation needs {context + horizon - 1} frames of history, got frames "
                         f"{tuple(frames.shape)} and flow {tuple(flow_bwd.shape)}")
    motion = flow_bwd[:, context - 2]  # [B,2,H,W] frame context-1 -> context-2
    current, out = frames[:, context - 1], []
    for _ in range(horizon):
        current = warp(current, motion)  # [B,3,H,W]
        out.append(current)
    rollout = torch.stack(out, dim=1)  # [B,Hz,3,H,W]
    hist = frames[:, context - 1:context - 1 + horizon]  # [B,Hz,3,H,W]
    step1 = warp(hist, flow_bwd[:, context - 2:context - 2 + horizon])  # [B,Hz,3,H,W]
    return rollout, step1


@torch.no_grad()
def vae_reconstruction(vae: nn.Module, frames: Tensor) -> Tensor:
    """decode(encode(frames).mu) for frames [B,T,3,H,W] -> [B,T,3,H,W]: the VAE ceiling."""
    B, T = frames.shape[:2]
    mu, _ = vae.encode(frames.flatten(0, 1))  # [B*T,C,h,w]
    return vae.decode(mu).view(B, T, *frames.shape[2:]).clamp(0, 1)


def rollout_model(model: nn.Module, batch: dict[str, Tensor], *, context: int, model_context: int,
                  horizon: int) -> dict[str, Tensor]:
    """Rollout of `horizon` frames from the `model_context` frames ending at frame context-1.

    Returns rollout [B,horizon,3,H,W] and collision [B,horizon] (logits).
    """
    out = model.rollout(clip_slice(batch, context - model_context, context), horizon)
    rollout, collision = out["frames"], out["collision"]  # [B,Hz,3,H,W], [B,Hz]
    B = batch["frames"].shape[0]
    if rollout.shape[:2] != (B, horizon) or collision.shape != (B, horizon):
        raise ValueError(f"{type(model).__name__}.rollout returned frames {tuple(rollout.shape)} and collision "
                         f"{tuple(collision.shape)}, expected [{B},{horizon},3,H,W] and [{B},{horizon}]")
    return {"rollout": rollout, "collision": collision}


def step1_model(model: nn.Module, batch: dict[str, Tensor], *, context: int, model_context: int,
                horizon: int) -> Tensor:
    """1-step predictions with real history [B,horizon,3,H,W]: frame context+t from the real frames before it."""
    step1 = [model.rollout(clip_slice(batch, context + t - model_context, context + t), 1)["frames"][:, 0]
             for t in range(horizon)]
    return torch.stack(step1, dim=1)


def predict_model(model: nn.Module, batch: dict[str, Tensor], *, context: int, model_context: int,
                  horizon: int) -> dict[str, Tensor]:
    """rollout_model and step1_model together: {'rollout', 'collision', 'step1'}."""
    kw = dict(context=context, model_context=model_context, horizon=horizon)
    return {**rollout_model(model, batch, **kw), "step1": step1_model(model, batch, **kw)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _finite_mean(x: np.ndarray) -> float | None:
    """Mean over the finite entries, None when there are none."""
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def run_inference(*, model: nn.Module, vae: nn.Module, dataset, out_path: str | Path,
                  settings: InferenceSettings, device: torch.device | str = "cpu", arch: str = "",
                  model_context: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Predict every clip of `dataset` (ClipDataset items of context + horizon frames) into predictions.h5.

    `model` follows the temporal contract (docs/ARCHITECTURE.md); `vae` is the frame VAE. Returns a
    summary (methods, timing, TTT statistics) that is also stored in the file's attrs.
    """
    device = torch.device(device)
    C, Hz = settings.context, settings.horizon
    mc = int(model_context if model_context is not None else getattr(model, "context", C))
    if not 1 <= mc <= C:
        raise ValueError(f"model context {mc} must be in [1, eval.context={C}]")
    if C < 2:
        raise ValueError(f"eval.context must be >= 2 (flow extrapolation needs a context flow), got {C}")
    N = len(dataset)
    if N == 0:
        raise ValueError("the test split has no videos")
    first = dataset[0]
    L, _, H, W = first["frames"].shape
    if L != C + Hz:
        raise ValueError(f"dataset clips have {L} frames, need eval.context + eval.horizon = {C + Hz}")
    if "flow_bwd" not in first:
        raise ValueError("dataset clips lack flow_bwd: build the ClipDataset with flow_h5 (flow extrapolation "
                         "baseline)")
    model, vae = model.to(device).eval(), vae.to(device).eval()

    trainer, ttt_reason = None, None
    if not settings.ttt_enabled:
        ttt_reason = "ttt.enabled is false"
    else:
        trainer = TestTimeTrainer(model, steps=settings.ttt_steps, lr=settings.ttt_lr, params=settings.ttt_params,
                                  loss=settings.ttt_loss, grad_clip=settings.ttt_grad_clip)
        if not trainer.supported:
            trainer, ttt_reason = None, trainer.reason
    methods = ["model"] + (["model_ttt"] if trainer is not None else []) + ["copy_last", "flow_extrap",
                                                                          "vae_ceiling"]
    if ttt_reason:
        log(f"infer: TTT skipped: {ttt_reason}")
    seconds = {m: 0.0 for m in methods + ["model_step1"]}
    ttt_seconds = 0.0
    ttt_rows: list[tuple] = []
    loader = DataLoader(dataset, batch_size=settings.batch, shuffle=False, num_workers=0)

    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        dsets = {}
        for m in methods:
            g = f.create_group(m)
            for kind in ("rollout", "step1"):
                dsets[m, kind] = g.create_dataset(kind, shape=(N, Hz, H, W, 3), dtype="uint8",
                                                  chunks=(1, 1, H, W, 3))
            if m in ("model", "model_ttt"):
                dsets[m, "collision"] = g.create_dataset("collision", shape=(N, Hz), dtype="float32")
        video_index = f.create_dataset("video_index", shape=(N,), dtype="int64")

        start = 0
        for batch in loader:
            B = batch["frames"].shape[0]
            rows = slice(start, start + B)
            video_index[rows] = batch["video_index"].numpy()
            batch = _to(batch, device)
            frames = batch["frames"]  # [B,L,3,H,W]

            def timed(method: str, fn):
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    result = fn()
                _sync(device)
                seconds[method] += time.perf_counter() - t0
                return result

            kw = dict(context=C, model_context=mc, horizon=Hz)
            pred = timed("model", lambda: rollout_model(model, batch, **kw))
            pred["step1"] = timed("model_step1", lambda: step1_model(model, batch, **kw))
            _store(dsets, "model", rows, pred)
            cl = timed("copy_last", lambda: copy_last(frames, context=C, horizon=Hz))
            _store(dsets, "copy_last", rows, {"rollout": cl[0], "step1": cl[1]})
            fe = timed("flow_extrap", lambda: flow_extrapolation(frames, batch["flow_bwd"], context=C, horizon=Hz))
            _store(dsets, "flow_extrap", rows, {"rollout": fe[0], "step1": fe[1]})
            vc = timed("vae_ceiling", lambda: vae_reconstruction(vae, frames[:, C:C + Hz]))
            _store(dsets, "vae_ceiling", rows, {"rollout": vc, "step1": vc})

            if trainer is not None:
                outs = []
                for b in range(B):  # TTT adapts per video
                    one = {k: v[b:b + 1] for k, v in batch.items()}
                    _sync(device)
                    t0 = time.perf_counter()
                    with trainer.adapted(context_slice(one, C)) as stats:
                        _sync(device)
                        t1 = time.perf_counter()
                        with torch.no_grad():
                            out = rollout_model(model, one, **kw)
                        _sync(device)
                        t2 = time.perf_counter()
                        with torch.no_grad():
                            out["step1"] = step1_model(model, one, **kw)
                        outs.append(out)
                    ttt_seconds += t1 - t0
                    seconds["model_ttt"] += t2 - t0  # adaptation + rollout
                    ttt_rows.append((stats.loss_before, stats.loss_after, stats.best_step, stats.steps,
                                     stats.diverged, stats.grad_norm))
                _store(dsets, "model_ttt", rows, {k: torch.cat([o[k] for o in outs]) for k in outs[0]})
            start += B
            log(f"infer: {start}/{N} videos")

        if trainer is not None:
            before, after, best, steps, diverged, grad_norm = (np.array(c) for c in zip(*ttt_rows))
            g = f["model_ttt"]
            g.create_dataset("ttt_loss_before", data=before.astype(np.float32))
            g.create_dataset("ttt_loss_after", data=after.astype(np.float32))
            g.create_dataset("ttt_best_step", data=best.astype(np.int32))
            g.create_dataset("ttt_steps", data=steps.astype(np.int32))
            g.create_dataset("ttt_diverged", data=diverged.astype(np.uint8))
            g.create_dataset("ttt_grad_norm", data=grad_norm.astype(np.float32))
        # frames/s of the rollout (model_ttt: adaptation included; model_step1: the horizon 1-step predictions)
        frames_out = N * Hz
        timing = {f"fps_{m}": frames_out / s if s > 0 else None for m, s in seconds.items()}
        timing.update({f"seconds_{m}": s for m, s in seconds.items()})
        timing["seconds_ttt_adapt"] = ttt_seconds if trainer is not None else None
        timing["device"] = str(device)
        ttt_info = {"enabled": settings.ttt_enabled, "supported": trainer is not None, "reason": ttt_reason,
                    "steps": settings.ttt_steps, "lr": settings.ttt_lr, "params": settings.ttt_params,
                    "loss": settings.ttt_loss, "grad_clip": settings.ttt_grad_clip,
                    "num_parameters": trainer.num_parameters if trainer is not None else 0}
        if trainer is not None:
            ttt_info.update(loss_before_mean=_finite_mean(before), loss_after_mean=_finite_mean(after),
                            diverged_videos=int(diverged.sum()), adapted_videos=int((best > 0).sum()),
                            grad_norm_mean=_finite_mean(grad_norm))
            if settings.ttt_steps > 0 and not (grad_norm > 0).any():
                ttt_info["warning"] = (f"ttt.loss={settings.ttt_loss} has zero gradient w.r.t. ttt.params="
                                       f"{settings.ttt_params} on every video: TTT changed nothing")
                log(f"infer: WARNING: {ttt_info['warning']}")
        f.attrs.update({"split": "test", "context": C, "horizon": Hz, "model_context": mc,
                        "first_predicted_frame": C, "arch": arch, "methods": json.dumps(methods),
                        "ttt": json.dumps(ttt_info), "timing": json.dumps(timing),
                        "settings": json.dumps(asdict(settings))})
    return {"methods": methods, "ttt": ttt_info, "timing": timing, "videos": N}


def _store(dsets: dict, method: str, rows: slice, pred: dict[str, Tensor]) -> None:
    for kind in ("rollout", "step1"):
        x = pred[kind]
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{method} {kind} predictions contain NaN or inf")
        dsets[method, kind][rows] = to_uint8(x)
    if (method, "collision") in dsets:
        dsets[method, "collision"][rows] = pred["collision"].detach().float().cpu().numpy()


def infer(params) -> dict:
    """The infer stage: load the trained models and the test split named in params, write predictions.h5."""
    from pipeline.checkpoint import load_model
    from pipeline.data.datasets import ClipDataset
    from pipeline.io import resolve_device

    paths, settings = params.paths, InferenceSettings.from_params(params)
    device = resolve_device(params.device)
    model = load_model(paths.temporal, "temporal", map_location=device)
    vae = load_model(paths.vae, "vae", map_location=device)
    model_context = getattr(model, "context", params.model.context)
    if model_context != params.model.context:
        raise ValueError(f"{paths.temporal}: trained with model.context={model_context}, params say "
                         f"{params.model.context}; re-run train_temporal")
    latents = paths.latents if Path(paths.latents).exists() else None
    dataset = ClipDataset(paths.frames, "test", settings.context + settings.horizon, flow_h5=paths.flow,
                          latents_h5=latents, first_window_only=True)
    return run_inference(model=model, vae=vae, dataset=dataset, out_path=paths.predictions, settings=settings,
                         device=device, arch=params.model.arch, model_context=model_context)
