"""Evaluation of predictions.h5 against the true test frames: per-step and mean PSNR / SSIM / LPIPS, collisions.

Writes (DESIGN §7):
    reports/metrics.json          small, for `dvc metrics show/diff`: one object per method (psnr, ssim, lpips,
                                  psnr_step1, ssim_step1), collision {ap, f1}, arch, ttt_gain_psnr, notes
    reports/evaluate/details.json per-step curves of every metric and method, timing, TTT statistics
    reports/plots/<metric>.tsv    long format (step, <metric>, method) for `dvc plots`; <metric>.png
    reports/figures/              strips (context | truth | prediction | error) and GIFs of test videos
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from pipeline.inference import METHODS
from pipeline.io import write_json
from pipeline.metrics import (LPIPSUnavailable, average_precision, f1_score, load_lpips, lpips_distance, psnr,
                              ssim)

__all__ = ["IMAGE_METRICS", "PLOT_METRICS", "score_predictions", "summarize", "evaluate"]

IMAGE_METRICS = ("psnr", "ssim", "lpips")
PLOT_METRICS = IMAGE_METRICS
DECIMALS = 5


def _frames(x: np.ndarray) -> torch.Tensor:
    """uint8 [...,H,W,3] -> float [...,3,H,W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3))).float().div_(255.0)


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), DECIMALS)


def score_predictions(pred_h5: str | Path, frames_h5: str | Path, *, lpips_model: torch.nn.Module | None,
                      chunk: int = 8, log: Callable[[str], None] = print) -> dict:
    """Per-video, per-step scores of every method in predictions.h5: {method: {metric: [N,horizon]}}.

    Metrics: psnr, ssim, lpips (rollout; lpips only with a model) and psnr_step1, ssim_step1 (1-step
    predictions with real history). Also returns the attrs, the collision logits and labels.
    """
    pred_h5, frames_h5 = Path(pred_h5), Path(frames_h5)
    with h5py.File(pred_h5, "r") as p, h5py.File(frames_h5, "r") as fr:
        attrs = {k: (json.loads(v) if k in ("methods", "ttt", "timing", "settings") else v)
                 for k, v in p.attrs.items()}
        for key in ("methods", "context", "horizon", "split"):
            if key not in attrs:
                raise ValueError(f"{pred_h5}: attribute {key!r} missing; was it written by the infer stage?")
        C, Hz, split = int(attrs["context"]), int(attrs["horizon"]), str(attrs["split"])
        methods = list(attrs["methods"])
        if split not in fr:
            raise ValueError(f"{frames_h5}: no split {split!r} (predictions were made on it)")
        group = fr[split]
        ids = p["video_index"][:]
        N = ids.shape[0]
        if group["video"].shape[0] != N or not np.array_equal(group["video_index"][:], ids):
            raise ValueError(f"{pred_h5} was predicted for other {split} videos than {frames_h5} holds "
                             f"({N} vs {group['video'].shape[0]}); re-run infer")
        if group["video"].shape[1] < C + Hz:
            raise ValueError(f"{frames_h5}: {group['video'].shape[1]} frames per video < context + horizon = {C + Hz}")
        for m in methods:
            for kind in ("rollout", "step1"):
                shape = p[m][kind].shape
                if shape[:2] != (N, Hz) or shape[2:] != group["video"].shape[2:]:
                    raise ValueError(f"{pred_h5}: {m}/{kind} has shape {shape}, expected "
                                     f"{(N, Hz) + tuple(group['video'].shape[2:])}")
        names = ["psnr", "ssim", "psnr_step1", "ssim_step1"] + (["lpips"] if lpips_model is not None else [])
        scores = {m: {k: np.zeros((N, Hz), np.float64) for k in names} for m in methods}
        for s in range(0, N, chunk):
            rows = slice(s, min(N, s + chunk))
            truth = _frames(group["video"][rows, C:C + Hz])  # [b,Hz,3,H,W]
            for m in methods:
                roll = _frames(p[m]["rollout"][rows])
                one = _frames(p[m]["step1"][rows])
                scores[m]["psnr"][rows] = psnr(roll, truth).numpy()
                scores[m]["ssim"][rows] = ssim(roll, truth).numpy()
                scores[m]["psnr_step1"][rows] = psnr(one, truth).numpy()
                scores[m]["ssim_step1"][rows] = ssim(one, truth).numpy()
                if lpips_model is not None:
                    scores[m]["lpips"][rows] = lpips_distance(lpips_model, roll, truth).numpy()
            log(f"evaluate: scored {rows.stop}/{N} videos")
        collision = {m: p[m]["collision"][:] for m in methods if "collision" in p[m]}
        labels = group["collision"][:, C:C + Hz].astype(np.int64)
        ttt_losses = ({k: p["model_ttt"][k][:] for k in ("ttt_loss_before", "ttt_loss_after", "ttt_steps")}
                      if "model_ttt" in p else None)
    return {"attrs": attrs, "methods": methods, "scores": scores, "collision_logits": collision,
            "collision_labels": labels, "video_index": ids, "ttt_losses": ttt_losses}


def summarize(scored: dict, *, collision_threshold: float, lpips_note: str | None) -> tuple[dict, dict]:
    """(metrics.json content, details.json content) from score_predictions' output."""
    attrs, scores = scored["attrs"], scored["scores"]
    metrics: dict = {"arch": str(attrs.get("arch", ""))}
    details: dict = {"context": int(attrs["context"]), "horizon": int(attrs["horizon"]), "split": attrs["split"],
                     "videos": int(len(scored["video_index"])), "per_step": {}}
    for m in METHODS:
        if m not in scores:
            metrics[m] = {k: None for k in ("psnr", "ssim", "lpips", "psnr_step1", "ssim_step1")}
            continue
        s = scores[m]
        metrics[m] = {
            "psnr": _round(s["psnr"].mean()), "ssim": _round(s["ssim"].mean()),
            "lpips": _round(s["lpips"].mean()) if "lpips" in s else None,
            "psnr_step1": _round(s["psnr_step1"].mean()), "ssim_step1": _round(s["ssim_step1"].mean()),
        }
        details["per_step"][m] = {k: [_round(v) for v in arr.mean(axis=0)] for k, arr in s.items()}
    logits = scored["collision_logits"].get("model")
    labels = scored["collision_labels"]
    if logits is not None:
        prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        ap = average_precision(prob, labels)
        f1 = f1_score(prob, labels, threshold=collision_threshold)
        metrics["collision"] = {"ap": _round(ap), "f1": _round(f1)}
        if ap is None:
            metrics["collision_note"] = "no collision starts within the evaluated horizon of the test videos"
        details["collision"] = {"positives": int(labels.sum()), "frames": int(labels.size),
                                "threshold": collision_threshold}
        if "model_ttt" in scored["collision_logits"]:
            prob_ttt = 1.0 / (1.0 + np.exp(-scored["collision_logits"]["model_ttt"].astype(np.float64)))
            details["collision"]["ap_ttt"] = _round(average_precision(prob_ttt, labels))
            details["collision"]["f1_ttt"] = _round(f1_score(prob_ttt, labels, threshold=collision_threshold))
    else:
        metrics["collision"] = {"ap": None, "f1": None}
    ttt = attrs.get("ttt", {})
    if metrics["model_ttt"]["psnr"] is not None and metrics["model"]["psnr"] is not None:
        metrics["ttt_gain_psnr"] = _round(metrics["model_ttt"]["psnr"] - metrics["model"]["psnr"])
    else:
        metrics["ttt_gain_psnr"] = None
        metrics["ttt_note"] = ttt.get("reason") or "no model_ttt predictions"
    if ttt.get("warning"):
        metrics["ttt_note"] = ttt["warning"]
    if lpips_note:
        metrics["lpips_note"] = lpips_note
    details["ttt"] = ttt
    if scored["ttt_losses"] is not None:
        details["ttt"]["per_video_loss_before"] = [_round(x) for x in scored["ttt_losses"]["ttt_loss_before"]]
        details["ttt"]["per_video_loss_after"] = [_round(x) for x in scored["ttt_losses"]["ttt_loss_after"]]
    details["timing"] = attrs.get("timing", {})
    details["lpips_note"] = lpips_note
    return metrics, details


def write_plot_tables(details: dict, plots_dir: str | Path) -> list[Path]:
    """reports/plots/<metric>.tsv in long format (step, <metric>, method), one row per step and method."""
    from pipeline.io import atomic_path

    plots_dir = Path(plots_dir)
    written = []
    for metric in PLOT_METRICS:
        lines = [f"step\t{metric}\tmethod"]
        for method, curves in details["per_step"].items():
            for step, value in enumerate(curves.get(metric) or [], start=1):
                if value is not None:
                    lines.append(f"{step}\t{value}\t{method}")
        path = plots_dir / f"{metric}.tsv"
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def evaluate(params, *, log: Callable[[str], None] = print) -> dict:
    """The evaluate stage: score predictions.h5, write metrics.json, details, plots and figures."""
    from pipeline.io import resolve_device
    from pipeline.report import plot_curves, write_figures

    paths, ev = params.paths, params.eval
    device = resolve_device(params.device)
    lpips_model, lpips_note = None, None
    try:
        lpips_model = load_lpips(ev.lpips_net, device=device)
    except LPIPSUnavailable as e:
        lpips_note = str(e)
        log(f"evaluate: LPIPS reported as null: {lpips_note}")
    scored = score_predictions(paths.predictions, paths.frames, lpips_model=lpips_model, log=log)
    metrics, details = summarize(scored, collision_threshold=ev.collision_threshold, lpips_note=lpips_note)
    details["protocol"] = ev.protocol
    details["lpips_net"] = ev.lpips_net
    reports = Path(paths.reports)
    write_plot_tables(details, reports / "plots")
    plot_curves(details, reports / "plots")
    write_figures(paths.predictions, paths.frames, reports / "figures", count=ev.figures,
                  methods=[m for m in ("model_ttt", "model", "flow_extrap", "copy_last") if m in scored["methods"]])
    write_json(paths.report_dir("evaluate") / "details.json", details)
    write_json(reports / "metrics.json", metrics)
    return metrics
