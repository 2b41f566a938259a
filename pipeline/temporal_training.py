"""Training and quick evaluation of the temporal model (stage train_temporal, bench/bench_temporal.py).

`train_temporal(params)` reads frames.h5, flow.h5, latents.h5 and both VAE checkpoints, builds
`model.arch` (pipeline.models.temporal), trains it with the shared loop (pipeline.training) on clips
of `model.context + train.rollout` frames and writes models/temporal.pt. It then scores 1-step
prediction on the validation split against copy-last-frame, for the stage report.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from pipeline.checkpoint import load_model, unwrap
from pipeline.clips import clip_slice
from pipeline.config import Params, to_dict
from pipeline.data.datasets import ClipDataset
from pipeline.distributed import is_main_process
from pipeline.io import file_digest, open_h5
from pipeline.metrics import psnr
from pipeline.models.flow_vae import build_flow_vae
from pipeline.models.temporal import build_temporal, needs_vae
from pipeline.models.vae import build_vae
from pipeline.pretrained import hub_dir, weights_dir
from pipeline.training import TrainConfig, seed_everything, train, to_device

LOG = logging.getLogger(__name__)

def temporal_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The training loss_fn: forward through the (possibly DDP-wrapped) model, then its own loss terms."""
    out = model(batch)
    return unwrap(model).loss(batch, out)


def _num_boxes(frames_h5: str | Path, split: str) -> int:
    with open_h5(frames_h5, what="frames file") as f:
        if split not in f or "boxes" not in f[split]:
            raise KeyError(f"{frames_h5}: split {split!r} has no 'boxes' dataset")
        return int(f[split]["boxes"].shape[2])


def load_vaes(params: Params, arch: str, device: torch.device | str = "cpu") -> tuple[nn.Module | None, nn.Module | None]:
    """The trained frame / flow VAEs an arch needs (None where it needs none)."""
    want_vae, want_flow_vae = needs_vae(arch, params.model)
    vae = load_model(params.paths.vae, "vae", build_vae, map_location=device) if want_vae else None
    flow_vae = load_model(params.paths.flow_vae, "flow_vae", build_flow_vae, map_location=device) if want_flow_vae else None
    return vae, flow_vae


@torch.no_grad()
def evaluate_psnr(model: nn.Module, dataset: ClipDataset, *, context: int, horizon: int, batch: int = 32,
                  max_clips: int | None = None, device: torch.device | str = "cpu") -> dict:
    """Mean PSNR per rollout step of the model vs copy-last-frame on clips of length >= context + horizon.

    Each clip's first `context` frames are the only input; frames context..context+horizon-1 are scored.
    Returns {'model': [horizon], 'copy_last': [horizon], 'clips': n} (dB, averaged over clips).
    """
    if dataset.length < context + horizon:
        raise ValueError(f"clips of {dataset.length} frames are too short for context {context} + horizon {horizon}")
    indices = list(range(len(dataset)))
    if max_clips is not None and len(indices) > max_clips:
        stride = len(indices) / max_clips
        indices = [indices[int(i * stride)] for i in range(max_clips)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False)
    was_training = model.training
    model.eval()
    sums_model, sums_copy, n = torch.zeros(horizon, dtype=torch.float64), torch.zeros(horizon, dtype=torch.float64), 0
    for clip in loader:
        clip = to_device(clip, device)
        truth = clip["frames"][:, context:context + horizon]  # [B,Hz,3,H,W]
        pred = model.rollout(clip_slice(clip, 0, context, observed=True), horizon)["frames"]  # [B,Hz,3,H,W]
        copy = clip["frames"][:, context - 1:context].expand_as(truth)
        sums_model += psnr(pred, truth).double().sum(0).cpu()
        sums_copy += psnr(copy, truth).double().sum(0).cpu()
        n += truth.shape[0]
    model.train(was_training)
    return {"model": (sums_model / n).tolist(), "copy_last": (sums_copy / n).tolist(), "clips": n}


def train_temporal(params: Params, *, steps: int | None = None, checkpoint: str | Path | None = None,
                   report_dir: str | Path | None = None) -> dict:
    """Train `params.model.arch` and write its checkpoint; returns the stage report (plain values).

    `steps` / `checkpoint` / `report_dir` override train.steps / paths.temporal / reports/temporal
    (benchmarks). The report records the loss terms, timing, the encoder clip_lstm really used and
    the 1-step validation PSNR of the model and of copy-last-frame.
    """
    p, arch = params, params.model.arch
    checkpoint = Path(checkpoint or p.paths.temporal)
    report_dir = Path(report_dir or p.paths.report_dir("temporal"))
    length = p.model.context + p.train.rollout
    want_vae, want_flow_vae = needs_vae(arch, p.model)
    latents = p.paths.latents if want_vae else None  # clip_lstm and pixel-space warp_occ work on frames alone
    dataset = ClipDataset(p.paths.frames, "train", length, flow_h5=p.paths.flow, latents_h5=latents)
    seed_everything(p.train.seed)
    vae, flow_vae = load_vaes(p, arch)
    with hub_dir(weights_dir(p.paths.pretrained, "encoder")):  # clip_lstm's encoder weights (pretrained stage)
        model = build_temporal(arch, model=p.model, loss=p.loss, frame_size=tuple(p.data.resolution),
                               num_boxes=_num_boxes(p.paths.frames, "train"), vae=vae, flow_vae=flow_vae)
    t = p.train
    config = TrainConfig(steps=steps or t.steps, batch=min(t.batch, len(dataset)), lr=t.lr, seed=t.seed,
                         workers=t.workers, warmup=t.warmup, clip_grad=t.clip_grad, ckpt_every=t.ckpt_every,
                         log_every=t.log_every)
    encoder = getattr(model, "encoder_info", None)
    if encoder is not None and encoder["used"] != encoder["requested"]:
        LOG.warning(encoder["reason"])
    t0 = time.perf_counter()
    inputs = [p.paths.frames, p.paths.flow] + ([p.paths.latents, p.paths.vae] if want_vae else []) + (
        [p.paths.flow_vae] if want_flow_vae else [])
    stage_params = {"model": to_dict(p.model), "loss": to_dict(p.loss), "train": to_dict(p.train), "device": p.device}
    result = train(model, dataset, temporal_loss, config=config, checkpoint=checkpoint, kind="temporal",
                   model_args=model.model_args(), arch=arch, params=stage_params, report_dir=report_dir,
                   device=p.device, extra={"encoder": encoder}, data_identity={f: file_digest(f) for f in inputs})
    seconds = time.perf_counter() - t0
    if not is_main_process():  # under DDP only rank 0 validates and reports
        return {}
    trained = unwrap(result.model)
    device = next(trained.parameters()).device

    report = {"arch": arch, "steps": result.step, "clip_length": length,
              "run": {"train_seconds": round(result.seconds, 1), "stage_seconds": round(seconds, 1),
                      "resumed_from": result.resumed_from},
              "parameters": sum(q.numel() for q in trained.trainable_parameters()),
              "loss": {k: v for k, v in result.metrics.items()}}
    if encoder is not None:
        report["encoder"] = encoder
    if "val" in p.data.splits:
        val = ClipDataset(p.paths.frames, "val", p.model.context + 1, flow_h5=p.paths.flow, latents_h5=latents)
        scores = evaluate_psnr(trained, val, context=p.model.context, horizon=1, max_clips=256, device=device)
        report["val_psnr_step1"] = round(scores["model"][0], 3)
        report["val_psnr_step1_copy_last"] = round(scores["copy_last"][0], 3)
        report["val_psnr_step1_gain"] = round(scores["model"][0] - scores["copy_last"][0], 3)
    return _finite(report)


def _finite(obj):
    """Replace non-finite floats by None (JSON reports stay valid)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
