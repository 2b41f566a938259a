"""The infer stage's work: rollouts of the model (with and without TTT) and of the baselines, teacher-forced
1-step predictions and collision scores, written to data/predictions.h5 (layout: pipeline.predictions).

Protocol (DESIGN §7, docs/EVALUATION.md): every video of `eval.split` gives its first `eval.context` real
frames, then `eval.horizon` frames are predicted, each fed back. A rollout, and TTT before it, receives
only `clip_slice(video, 0, context, observed=True)`: frames and flow between them, no labels, nothing
later, so no predictor can read a frame it must predict. The teacher-forced pass then predicts each
frame from the real frames just before it: the horizon frames (`step1`) for every method, and every
frame with `model.context` frames of history for the collision head (`model/collision_teacher`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.baselines import PREDICTORS, vae_reconstruction
from pipeline.clips import clip_slice, history_windows
from pipeline.io import atomic_path
from pipeline.metrics import finite_mean
from pipeline.predictions import PredictionWriter
from pipeline.ttt import TTTAdapter

LOG = logging.getLogger(__name__)

__all__ = ["InferenceSettings", "rollout_model", "run_inference", "infer"]

BASELINE_HISTORY = 2  # frames a flow baseline reads: the last one and the flow into it


@dataclass(frozen=True)
class InferenceSettings:
    """What infer needs from params: eval.split/context/horizon/batch and the ttt section."""

    split: str
    context: int
    horizon: int
    batch: int
    ttt_enabled: bool
    ttt_steps: int
    ttt_lr: float
    ttt_params: str
    ttt_loss: str
    ttt_grad_clip: float

    @classmethod
    def from_params(cls, params) -> "InferenceSettings":
        """Settings from a validated pipeline.config.Params."""
        e, t = params.eval, params.ttt
        return cls(split=e.split, context=e.context, horizon=e.horizon, batch=e.batch, ttt_enabled=t.enabled,
                   ttt_steps=t.steps, ttt_lr=t.lr, ttt_params=t.params, ttt_loss=t.loss, ttt_grad_clip=t.grad_clip)


def rollout_model(model: nn.Module, observed: dict[str, Tensor], *, model_context: int,
                  horizon: int) -> dict[str, Tensor]:
    """The model's rollout of `horizon` frames after the last `model_context` observed frames.

    Returns frames [B,horizon,3,H,W] and collision logits [B,horizon].
    """
    n = observed["frames"].shape[1]
    out = model.rollout(clip_slice(observed, n - model_context, n), horizon)
    frames, collision = out["frames"], out["collision"]
    B = observed["frames"].shape[0]
    if frames.shape[:2] != (B, horizon) or collision.shape != (B, horizon):
        raise ValueError(f"{type(model).__name__}.rollout returned frames {tuple(frames.shape)} and collision "
                         f"{tuple(collision.shape)}, expected [{B},{horizon},3,H,W] and [{B},{horizon}]")
    return {"frames": frames, "collision": collision}


def _teacher_forced(predict: Callable[[dict, int], Tensor], batch: dict[str, Tensor], targets: list[int],
                    history: int) -> Tensor:
    """1-step predictions of the target frames from the `history` real frames before each: [B,n,...]."""
    B = batch["frames"].shape[0]
    out = predict(history_windows(batch, targets, history), 1)  # [n*B,1,...] targets major
    out = out[:, 0] if out.dim() >= 2 and out.shape[1] == 1 else out
    return out.reshape(len(targets), B, *out.shape[1:]).transpose(0, 1)


def _model_step(model: nn.Module, key: str) -> Callable[[dict, int], Tensor]:
    return lambda window, horizon: model.rollout(window, horizon)[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall seconds per method (the stage log's frames/s; never written into an output)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def __call__(self, name: str, fn):
        _sync(self.device)
        t0 = time.perf_counter()
        result = fn()
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return result


def run_inference(*, model: nn.Module, vae: nn.Module | None, dataset, out_path: str | Path,
                  settings: InferenceSettings, device: torch.device | str = "cpu", arch: str = "",
                  model_context: int, flow_backend: str = "", teacher_forced: bool = True,
                  log: Callable[[str], None] = LOG.info) -> dict:
    """Predict every video of `dataset` (ClipDataset items of whole videos) into predictions.h5, atomically.

    `model` follows the temporal contract (docs/ARCHITECTURE.md); `vae` is the frame VAE (for the
    vae_recon reference, skipped when None). teacher_forced=False leaves out everything that reads real
    frames after the context (step1, collision_teacher, vae_recon): only rollouts are written. Returns a
    summary: methods, TTT statistics and frames/s (for the stage log, never for an output).
    """
    device = torch.device(device)
    C, Hz, mc = settings.context, settings.horizon, int(model_context)
    if not 1 <= mc <= C:
        raise ValueError(f"model context {mc} must be in [1, eval.context={C}]")
    if C < BASELINE_HISTORY:
        raise ValueError(f"eval.context must be >= {BASELINE_HISTORY} (the flow baselines need a context flow), "
                         f"got {C}")
    N = len(dataset)
    if N == 0:
        raise ValueError(f"the {settings.split} split has no videos")
    first = dataset[0]
    T, _, H, W = first["frames"].shape
    if T < C + Hz:
        raise ValueError(f"videos have {T} frames, need eval.context + eval.horizon = {C + Hz}")
    if "flow_bwd" not in first:
        raise ValueError("dataset clips lack flow_bwd: build the ClipDataset with flow_h5 (flow baselines)")
    model = model.to(device).eval()
    vae = vae.to(device).eval() if vae is not None else None

    trainer, ttt_reason = None, None
    if not settings.ttt_enabled:
        ttt_reason = "ttt.enabled is false"
    else:
        trainer = TTTAdapter(model, steps=settings.ttt_steps, lr=settings.ttt_lr, params=settings.ttt_params,
                                  loss=settings.ttt_loss, grad_clip=settings.ttt_grad_clip)
        if not trainer.supported:
            trainer, ttt_reason = None, trainer.reason
    if ttt_reason:
        log(f"infer: TTT skipped: {ttt_reason}")
    methods = ["model"] + (["model_ttt"] if trainer is not None else []) + list(PREDICTORS)
    if teacher_forced and vae is not None:
        methods.append("vae_recon")
    horizon_frames = list(range(C, C + Hz))
    clock, ttt_rows = _Clock(device), []
    loader = DataLoader(dataset, batch_size=settings.batch, shuffle=False, num_workers=0)

    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        writer = PredictionWriter(f, methods=methods, videos=N, horizon=Hz, frame_shape=(H, W),
                                  teacher_frames=T - mc, teacher_forced=teacher_forced)
        start = 0
        bar = tqdm(total=N, desc=f"infer {settings.split}", disable=None, leave=False)  # a bar on a terminal only
        for batch in loader:
            B = batch["frames"].shape[0]
            rows = slice(start, start + B)
            writer.video_index[rows] = batch["video_index"].numpy()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            observed = clip_slice(batch, 0, C, observed=True)  # all a rollout or TTT may read

            with torch.no_grad():
                pred = clock("model", lambda: rollout_model(model, observed, model_context=mc, horizon=Hz))
                writer.frames("model", "rollout", rows, pred["frames"])
                writer.logits("model", "collision", rows, pred["collision"])
                for name, predictor in PREDICTORS.items():
                    frames = clock(name, lambda: predictor(clip_slice(observed, C - BASELINE_HISTORY, C), Hz))
                    writer.frames(name, "rollout", rows, frames)

            if trainer is not None:
                rollouts, logits, step1 = [], [], []
                for b in range(B):  # TTT adapts per video, then the trained weights come back
                    one = {k: v[b:b + 1] for k, v in observed.items()}
                    with trainer.adapted(one) as stats:
                        with torch.no_grad():
                            out = rollout_model(model, one, model_context=mc, horizon=Hz)
                            if teacher_forced:
                                video = {k: v[b:b + 1] for k, v in batch.items()}
                                step1.append(_teacher_forced(_model_step(model, "frames"), video, horizon_frames, mc))
                    rollouts.append(out["frames"])
                    logits.append(out["collision"])
                    ttt_rows.append((stats.loss_before, stats.loss_after, stats.best_step, stats.steps,
                                     stats.diverged, stats.grad_norm, stats.seconds))
                writer.frames("model_ttt", "rollout", rows, torch.cat(rollouts))
                writer.logits("model_ttt", "collision", rows, torch.cat(logits))
                if teacher_forced:
                    writer.frames("model_ttt", "step1", rows, torch.cat(step1))

            if teacher_forced:
                with torch.no_grad():
                    every = list(range(mc, T))  # every frame with a full real history
                    window = history_windows(batch, every, mc)
                    out = clock("model_teacher", lambda: model.rollout(window, 1))
                    frames = out["frames"][:, 0].reshape(len(every), B, 3, H, W).transpose(0, 1)
                    writer.frames("model", "step1", rows, frames[:, C - mc:C - mc + Hz])
                    writer.logits("model", "collision_teacher", rows,
                                  out["collision"][:, 0].reshape(len(every), B).transpose(0, 1))
                    for name, predictor in PREDICTORS.items():
                        writer.frames(name, "step1", rows,
                                      _teacher_forced(predictor, batch, horizon_frames, BASELINE_HISTORY))
                    if vae is not None:
                        recon = vae_reconstruction(vae, batch["frames"][:, C:C + Hz])
                        writer.frames("vae_recon", "rollout", rows, recon)
                        writer.frames("vae_recon", "step1", rows, recon)
            start += B
            LOG.debug("infer: %d/%d %s videos", start, N, settings.split)
            bar.update(B)

        bar.close()
        ttt_info = _ttt_summary(settings, trainer, ttt_reason, ttt_rows)
        if ttt_rows:
            before, after, best, steps, diverged, grad_norm, _ = (np.array(c) for c in zip(*ttt_rows))
            writer.ttt_stats({"ttt_loss_before": before.astype(np.float32), "ttt_loss_after": after.astype(np.float32),
                              "ttt_best_step": best.astype(np.int32), "ttt_steps": steps.astype(np.int32),
                              "ttt_diverged": diverged.astype(np.uint8), "ttt_grad_norm": grad_norm.astype(np.float32)})
        if ttt_info.get("warning"):
            log(f"infer: WARNING: {ttt_info['warning']}")
        writer.finish(split=settings.split, context=C, horizon=Hz, frames=T, model_context=mc,
                      first_predicted_frame=C, arch=arch, flow_backend=flow_backend, methods=methods, ttt=ttt_info,
                      settings=asdict(settings), teacher_forced=teacher_forced)
    fps = {m: N * Hz / s for m, s in clock.seconds.items() if s > 0}
    if ttt_rows:
        adapt = sum(r[-1] for r in ttt_rows)
        fps["model_ttt"] = N * Hz / (adapt + clock.seconds.get("model", 0.0))
    return {"methods": methods, "ttt": ttt_info, "frames_per_second": fps, "videos": N}


def _ttt_summary(settings: InferenceSettings, trainer, reason: str | None, rows: list[tuple]) -> dict:
    """TTT settings and what happened over the videos (for predictions.h5 attrs and the report)."""
    info = {"enabled": settings.ttt_enabled, "supported": trainer is not None, "reason": reason,
            "steps": settings.ttt_steps, "lr": settings.ttt_lr, "params": settings.ttt_params,
            "loss": settings.ttt_loss, "grad_clip": settings.ttt_grad_clip,
            "num_parameters": trainer.num_parameters if trainer is not None else 0}
    if rows:
        before, after, best, _, diverged, grad_norm, _ = (np.array(c, dtype=np.float64) for c in zip(*rows))
        info.update(loss_before_mean=finite_mean(before), loss_after_mean=finite_mean(after),
                    diverged_videos=int(diverged.sum()), adapted_videos=int((best > 0).sum()),
                    grad_norm_mean=finite_mean(grad_norm))
        if settings.ttt_steps > 0 and not (grad_norm > 0).any():
            info["warning"] = (f"ttt.loss={settings.ttt_loss} has zero gradient w.r.t. ttt.params="
                               f"{settings.ttt_params} on every video: TTT changed nothing")
    return info


def infer(params, *, log: Callable[[str], None] = LOG.info) -> dict:
    """The infer stage: the trained models and the videos of eval.split -> predictions.h5."""
    from pipeline.checkpoint import load_checkpoint, load_model, model_from_checkpoint
    from pipeline.data.datasets import ClipDataset, flow_backend, split_group
    from pipeline.io import resolve_device
    from pipeline.models.temporal import rebuild_temporal
    from pipeline.models.vae import build_vae

    paths, settings = params.paths, InferenceSettings.from_params(params)
    device = resolve_device(params.device)
    ckpt = load_checkpoint(paths.temporal, kind="temporal", map_location=device)
    if ckpt.get("arch") != params.model.arch:
        raise ValueError(f"{paths.temporal}: a {ckpt.get('arch')!r} checkpoint, but params say model.arch="
                         f"{params.model.arch}; re-run train_temporal")
    model = model_from_checkpoint(ckpt, rebuild_temporal, path=paths.temporal, map_location=device)
    vae = load_model(paths.vae, "vae", build_vae, map_location=device)
    model_context = getattr(model, "context", params.model.context)
    if model_context != params.model.context:
        raise ValueError(f"{paths.temporal}: trained with model.context={model_context}, params say "
                         f"{params.model.context}; re-run train_temporal")
    latents = paths.latents if Path(paths.latents).exists() else None
    frames_per_video = split_group(paths.frames, settings.split)[1]
    dataset = ClipDataset(paths.frames, settings.split, frames_per_video, flow_h5=paths.flow, latents_h5=latents,
                          first_window_only=True)
    return run_inference(model=model, vae=vae, dataset=dataset, out_path=paths.predictions, settings=settings,
                         device=device, arch=ckpt["arch"], model_context=model_context,
                         flow_backend=flow_backend(paths.flow), log=log)
