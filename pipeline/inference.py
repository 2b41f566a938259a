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


@dataclass
class _Run:
    """One inference run's fixed pieces: what each pass of `run_inference` needs."""

    model: nn.Module
    vae: nn.Module | None
    adapter: TTTAdapter | None
    writer: PredictionWriter
    clock: _Clock
    context: int
    horizon: int
    model_context: int
    ttt_rows: list

    def rollouts(self, observed: dict[str, Tensor], rows: slice) -> None:
        """The model's and the baselines' rollouts from the observed context only."""
        C, Hz, mc = self.context, self.horizon, self.model_context
        with torch.no_grad():
            pred = self.clock("model", lambda: rollout_model(self.model, observed, model_context=mc, horizon=Hz))
            self.writer.frames("model", "rollout", rows, pred["frames"])
            self.writer.logits("model", "collision", rows, pred["collision"])
            for name, predictor in PREDICTORS.items():
                frames = self.clock(name, lambda: predictor(clip_slice(observed, C - BASELINE_HISTORY, C), Hz))
                self.writer.frames(name, "rollout", rows, frames)

    def adapted(self, observed: dict[str, Tensor], batch: dict[str, Tensor] | None, rows: slice) -> None:
        """Per video: adapt on its context (TTT), roll out (and 1-step from batch's real history), restore."""
        rollouts, logits, step1 = [], [], []
        horizon_frames = list(range(self.context, self.context + self.horizon))
        for b in range(observed["frames"].shape[0]):
            one = {k: v[b:b + 1] for k, v in observed.items()}
            with self.adapter.adapted(one) as stats:
                with torch.no_grad():
                    out = rollout_model(self.model, one, model_context=self.model_context, horizon=self.horizon)
                    if batch is not None:
                        video = {k: v[b:b + 1] for k, v in batch.items()}
                        step1.append(_teacher_forced(_model_step(self.model, "frames"), video, horizon_frames,
                                                     self.model_context))
            rollouts.append(out["frames"])
            logits.append(out["collision"])
            self.ttt_rows.append((stats.loss_before, stats.loss_after, stats.best_step, stats.steps, stats.diverged,
                                  stats.grad_norm, stats.seconds))
        self.writer.frames("model_ttt", "rollout", rows, torch.cat(rollouts))
        self.writer.logits("model_ttt", "collision", rows, torch.cat(logits))
        if batch is not None:
            self.writer.frames("model_ttt", "step1", rows, torch.cat(step1))

    @torch.no_grad()
    def teacher_forced(self, batch: dict[str, Tensor], rows: slice) -> None:
        """Every frame from the real frames before it: horizon step1 for every method, collisions, vae_recon."""
        C, Hz, mc = self.context, self.horizon, self.model_context
        B, T, _, H, W = batch["frames"].shape
        every = list(range(mc, T))  # every frame with a full real history
        out = self.clock("model_teacher", lambda: self.model.rollout(history_windows(batch, every, mc), 1))
        frames = out["frames"][:, 0].reshape(len(every), B, 3, H, W).transpose(0, 1)
        self.writer.frames("model", "step1", rows, frames[:, C - mc:C - mc + Hz])
        self.writer.logits("model", "collision_teacher", rows,
                           out["collision"][:, 0].reshape(len(every), B).transpose(0, 1))
        for name, predictor in PREDICTORS.items():
            self.writer.frames(name, "step1", rows,
                               _teacher_forced(predictor, batch, list(range(C, C + Hz)), BASELINE_HISTORY))
        if self.vae is not None:
            recon = vae_reconstruction(self.vae, batch["frames"][:, C:C + Hz])
            self.writer.frames("vae_recon", "rollout", rows, recon)
            self.writer.frames("vae_recon", "step1", rows, recon)


def _check_dataset(dataset, settings: InferenceSettings, model_context: int) -> tuple[int, int, int, int]:
    """(videos, frames, H, W) of a dataset of whole videos, after checking it fits the settings."""
    C, Hz, mc = settings.context, settings.horizon, model_context
    if not 1 <= mc <= C:
        raise ValueError(f"model context {mc} must be in [1, eval.context={C}]")
    if C < BASELINE_HISTORY:
        raise ValueError(f"eval.context must be >= {BASELINE_HISTORY} (the flow baselines need a context flow), "
                         f"got {C}")
    if len(dataset) == 0:
        raise ValueError(f"the {settings.split} split has no videos")
    first = dataset[0]
    T, _, H, W = first["frames"].shape
    if T < C + Hz:
        raise ValueError(f"videos have {T} frames, need eval.context + eval.horizon = {C + Hz}")
    if "flow_bwd" not in first:
        raise ValueError("dataset clips lack flow_bwd: build the ClipDataset with flow_h5 (flow baselines)")
    return len(dataset), T, H, W


def _adapter(model: nn.Module, settings: InferenceSettings) -> tuple[TTTAdapter | None, str | None]:
    """The TTT adapter the settings ask for, or None and why not."""
    if not settings.ttt_enabled:
        return None, "ttt.enabled is false"
    adapter = TTTAdapter(model, steps=settings.ttt_steps, lr=settings.ttt_lr, params=settings.ttt_params,
                         loss=settings.ttt_loss, grad_clip=settings.ttt_grad_clip)
    return (adapter, None) if adapter.supported else (None, adapter.reason)


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
    N, T, H, W = _check_dataset(dataset, settings, mc)
    model = model.to(device).eval()
    vae = vae.to(device).eval() if vae is not None and teacher_forced else None
    adapter, ttt_reason = _adapter(model, settings)
    if ttt_reason:
        log(f"infer: TTT skipped: {ttt_reason}")
    methods = ["model"] + (["model_ttt"] if adapter is not None else []) + list(PREDICTORS) + (
        ["vae_recon"] if vae is not None else [])
    loader = DataLoader(dataset, batch_size=settings.batch, shuffle=False, num_workers=0)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        run = _Run(model=model, vae=vae, adapter=adapter, clock=_Clock(device), context=C, horizon=Hz,
                   model_context=mc, ttt_rows=[],
                   writer=PredictionWriter(f, methods=methods, videos=N, horizon=Hz, frame_shape=(H, W),
                                           teacher_frames=T - mc, teacher_forced=teacher_forced))
        start = 0
        for batch in tqdm(loader, desc=f"infer {settings.split}", disable=None, leave=False):  # a bar on a terminal
            rows = slice(start, start + batch["frames"].shape[0])
            run.writer.video_index[rows] = batch["video_index"].numpy()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            observed = clip_slice(batch, 0, C, observed=True)  # all a rollout or TTT may read
            run.rollouts(observed, rows)
            if adapter is not None:
                run.adapted(observed, batch if teacher_forced else None, rows)
            if teacher_forced:
                run.teacher_forced(batch, rows)
            start = rows.stop
        ttt_info = _ttt_summary(settings, adapter, ttt_reason, run.ttt_rows)
        if run.ttt_rows:
            before, after, best, steps, diverged, grad_norm, _ = (np.array(c) for c in zip(*run.ttt_rows))
            run.writer.ttt_stats({"ttt_loss_before": before.astype(np.float32),
                                  "ttt_loss_after": after.astype(np.float32), "ttt_best_step": best.astype(np.int32),
                                  "ttt_steps": steps.astype(np.int32), "ttt_diverged": diverged.astype(np.uint8),
                                  "ttt_grad_norm": grad_norm.astype(np.float32)})
        if ttt_info.get("warning"):
            log(f"infer: WARNING: {ttt_info['warning']}")
        run.writer.finish(split=settings.split, context=C, horizon=Hz, frames=T, model_context=mc,
                          first_predicted_frame=C, arch=arch, flow_backend=flow_backend, methods=methods,
                          ttt=ttt_info, settings=asdict(settings), teacher_forced=teacher_forced)
    seconds = run.clock.seconds
    fps = {m: N * Hz / s for m, s in seconds.items() if s > 0}
    if run.ttt_rows:
        fps["model_ttt"] = N * Hz / (sum(r[-1] for r in run.ttt_rows) + seconds.get("model", 0.0))
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
