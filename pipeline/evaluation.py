"""The evaluate stage's work: score predictions.h5 against the true frames, with bootstrap intervals over videos.

Writes (DESIGN §7, docs/EVALUATION.md):
    reports/metrics.json            flat numbers for `dvc metrics show/diff`: per method the mean and the 95%
                                    interval of psnr, ssim, lpips over the horizon and psnr_step1, ssim_step1;
                                    the paired differences (model - each baseline, model_ttt - model) with
                                    their intervals; collision scores; split, arch, flow backend, notes
    reports/evaluate/details.json   per-step curves (mean, lo, hi) of every metric and method, collision
                                    counts, TTT statistics
    reports/evaluate/per_video.json every video's score per method and metric (what pr_report pairs across
                                    revisions)
    reports/plots/<metric>.tsv/.png per-step curves for `dvc plots`
    reports/figures/                strips (context | truth | predictions | error) and GIFs
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.data.datasets import frames_to_tensor
from pipeline.io import open_h5, write_json
from pipeline.metrics import (LPIPSUnavailable, average_precision, best_f1, event_recall, f1_score, load_lpips,
                              lpips_distance, psnr, ssim)
from pipeline.predictions import KINDS, METHODS, read_attrs
from pipeline.stats import Interval, bootstrap_mean, paired_difference, resample_indices

LOG = logging.getLogger(__name__)

__all__ = ["IMAGE_METRICS", "SCORES", "PAIRS", "score_predictions", "summarize", "write_plot_tables", "evaluate"]

IMAGE_METRICS = ("psnr", "ssim", "lpips")
SCORES = ("psnr", "ssim", "lpips", "psnr_step1", "ssim_step1")  # per method in metrics.json
PAIRS = (("model", "copy_last"), ("model", "flow_extrap"), ("model", "flow_advect"), ("model_ttt", "model"))
DECIMALS = 5


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), DECIMALS)


def score_predictions(pred_h5: str | Path, frames_h5: str | Path, *, lpips_model: torch.nn.Module | None,
                      chunk: int = 8, log: Callable[[str], None] = LOG.info) -> dict:
    """Per-video, per-step scores of every method: {'scores': {method: {metric: [N,horizon]}}, ...}.

    Metrics: psnr, ssim, lpips (rollout; lpips only with a model) and psnr_step1, ssim_step1 (each frame
    from real history). Also returns the attrs, video ids and the collision logits with their labels.
    """
    pred_h5, frames_h5 = Path(pred_h5), Path(frames_h5)
    with open_h5(pred_h5, what="predictions") as p, open_h5(frames_h5, what="frames file") as fr:
        attrs = read_attrs(p, pred_h5)
        C, Hz, split, mc = int(attrs["context"]), int(attrs["horizon"]), str(attrs["split"]), int(attrs["model_context"])
        methods = list(attrs["methods"])
        if not attrs.get("teacher_forced", True):
            raise ValueError(f"{pred_h5} holds rollouts only (teacher_forced=False); evaluate needs the full infer run")
        if split not in fr:
            raise ValueError(f"{frames_h5}: no split {split!r} (predictions were made on it)")
        group = fr[split]
        ids = p["video_index"][:]
        N, T = ids.shape[0], group["video"].shape[1]
        if group["video"].shape[0] != N or not np.array_equal(group["video_index"][:], ids):
            raise ValueError(f"{pred_h5} was predicted for other {split} videos than {frames_h5} holds "
                             f"({N} vs {group['video'].shape[0]}); re-run infer")
        if T < C + Hz or T != int(attrs["frames"]):
            raise ValueError(f"{frames_h5}: {T} frames per video, predictions.h5 was made for {attrs['frames']} "
                             f"(context + horizon = {C + Hz}); re-run infer")
        for m in methods:
            for kind in KINDS:
                shape = p[m][kind].shape
                if shape[:2] != (N, Hz) or shape[2:] != group["video"].shape[2:]:
                    raise ValueError(f"{pred_h5}: {m}/{kind} has shape {shape}, expected "
                                     f"{(N, Hz) + tuple(group['video'].shape[2:])}")
        names = ["psnr", "ssim", "psnr_step1", "ssim_step1"] + (["lpips"] if lpips_model is not None else [])
        scores = {m: {k: np.zeros((N, Hz), np.float64) for k in names} for m in methods}
        for s in range(0, N, chunk):
            rows = slice(s, min(N, s + chunk))
            truth = frames_to_tensor(group["video"][rows, C:C + Hz])  # [b,Hz,3,H,W]
            for m in methods:
                roll, one = frames_to_tensor(p[m]["rollout"][rows]), frames_to_tensor(p[m]["step1"][rows])
                scores[m]["psnr"][rows] = psnr(roll, truth).numpy()
                scores[m]["ssim"][rows] = ssim(roll, truth).numpy()
                scores[m]["psnr_step1"][rows] = psnr(one, truth).numpy()
                scores[m]["ssim_step1"][rows] = ssim(one, truth).numpy()
                if lpips_model is not None:
                    scores[m]["lpips"][rows] = lpips_distance(lpips_model, roll, truth).numpy()
            log(f"evaluate: scored {rows.stop}/{N} {split} videos")
        labels = group["collision"][:].astype(np.int64)  # [N,T]
        collision = {"rollout": {m: p[m]["collision"][:] for m in methods if "collision" in p[m]},
                     "rollout_labels": labels[:, C:C + Hz],
                     "teacher": p["model"]["collision_teacher"][:] if "collision_teacher" in p["model"] else None,
                     "teacher_labels": labels[:, mc:]}
        ttt = ({k: p["model_ttt"][k][:] for k in ("ttt_loss_before", "ttt_loss_after", "ttt_steps")}
               if "model_ttt" in p else None)
    return {"attrs": attrs, "methods": methods, "scores": scores, "collision": collision, "video_index": ids,
            "ttt_losses": ttt}


def _interval_fields(name: str, iv: Interval | None) -> dict:
    if iv is None:
        return {name: None, f"{name}_lo": None, f"{name}_hi": None}
    return {name: _round(iv.mean), f"{name}_lo": _round(iv.lo), f"{name}_hi": _round(iv.hi)}


def _per_video(scores: dict, metric: str) -> np.ndarray | None:
    """[N] horizon mean of a per-step score, or None when it was not computed."""
    return scores[metric].mean(axis=1) if metric in scores else None


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def collision_metrics(logits_teacher: np.ndarray | None, labels_teacher: np.ndarray, logits_rollout: np.ndarray | None,
                      labels_rollout: np.ndarray, *, threshold: float) -> tuple[dict, str | None]:
    """Collision head scores on every frame with real history (teacher-forced) and on the rollout horizon.

    Each with the prevalence (share of frames where a collision starts), which is also the AP of a
    constant predictor, so an AP means something only well above it. Returns (scores, note).
    """
    out, note = {}, None
    for prefix, logits, labels in (("", logits_teacher, labels_teacher), ("rollout_", logits_rollout, labels_rollout)):
        prevalence = float(labels.mean()) if labels.size else None
        fields = {"ap": None, "ap_constant": _round(prevalence), "prevalence": _round(prevalence), "f1": None}
        if prefix == "":
            fields.update(best_f1=None, best_f1_threshold=None, event_recall=None, events=int(labels.sum()),
                          frames=int(labels.size))
        if logits is not None and labels.any():
            prob = _sigmoid(logits)
            fields["ap"] = _round(average_precision(prob, labels))
            fields["f1"] = _round(f1_score(prob, labels, threshold=threshold))
            if prefix == "":
                best, at = best_f1(prob, labels)
                fields.update(best_f1=_round(best), best_f1_threshold=_round(at),
                              event_recall=_round(event_recall(prob, labels, threshold=threshold, tolerance=1)))
        elif logits is not None:
            note = f"no collision starts in the scored {'rollout horizon' if prefix else 'frames'}"
        out.update({prefix + k: v for k, v in fields.items()})
    return out, note


def summarize(scored: dict, *, collision_threshold: float, lpips_note: str | None, resamples: int, level: float,
              seed: int) -> tuple[dict, dict, dict]:
    """(metrics.json, details.json, per_video.json contents) from score_predictions' output."""
    attrs, scores = scored["attrs"], scored["scores"]
    N = len(scored["video_index"])
    draws = resample_indices(N, resamples=resamples, seed=seed)
    metrics: dict = {"arch": str(attrs.get("arch", "")), "split": str(attrs["split"]), "videos": N,
                     "context": int(attrs["context"]), "horizon": int(attrs["horizon"]),
                     "flow_backend": str(attrs.get("flow_backend", ""))}
    details: dict = {"split": attrs["split"], "videos": N, "context": int(attrs["context"]),
                     "horizon": int(attrs["horizon"]), "interval": {"kind": "percentile bootstrap over videos",
                                                                   "resamples": resamples, "level": level, "seed": seed},
                     "per_step": {}}
    per_video: dict = {"split": attrs["split"], "video_index": [int(i) for i in scored["video_index"]], "scores": {}}
    for m in METHODS:
        fields: dict = {}
        for metric in SCORES:
            values = _per_video(scores[m], metric) if m in scores else None
            fields.update(_interval_fields(metric, bootstrap_mean(values, draws, level=level)
                                           if values is not None else None))
        metrics[m] = fields
        if m not in scores:
            continue
        per_video["scores"][m] = {k: [_round(v) for v in arr.mean(axis=1)] for k, arr in scores[m].items()}
        curves = {}
        for metric, arr in scores[m].items():
            steps = [bootstrap_mean(arr[:, t], draws, level=level) for t in range(arr.shape[1])]
            curves[metric] = [_round(iv.mean) for iv in steps]
            curves[f"{metric}_lo"] = [_round(iv.lo) for iv in steps]
            curves[f"{metric}_hi"] = [_round(iv.hi) for iv in steps]
        details["per_step"][m] = curves
    for a, b in PAIRS:
        fields = {}
        for metric in SCORES:
            ok = a in scores and b in scores and metric in scores[a] and metric in scores[b]
            fields.update(_interval_fields(metric, paired_difference(_per_video(scores[a], metric),
                                                                     _per_video(scores[b], metric), draws, level=level)
                                           if ok else None))
        metrics[f"{a}_minus_{b}"] = fields
    col = scored["collision"]
    metrics["collision"], collision_note = collision_metrics(
        col["teacher"], col["teacher_labels"], col["rollout"].get("model"), col["rollout_labels"],
        threshold=collision_threshold)
    details["collision"] = {"threshold": collision_threshold, "tolerance_frames": 1,
                            "teacher_frames_from": int(attrs["model_context"]),
                            "rollout_ttt_ap": (_round(average_precision(_sigmoid(col["rollout"]["model_ttt"]),
                                                                        col["rollout_labels"]))
                                               if "model_ttt" in col["rollout"] and col["rollout_labels"].any()
                                               else None)}
    ttt = dict(attrs.get("ttt", {}))
    if collision_note:
        metrics["collision_note"] = collision_note
    if "model_ttt" not in scores:
        metrics["ttt_note"] = ttt.get("reason") or "no model_ttt predictions"
    if ttt.get("warning"):
        metrics["ttt_note"] = ttt["warning"]
    if lpips_note:
        metrics["lpips_note"] = lpips_note
    if scored["ttt_losses"] is not None:
        ttt["per_video_loss_before"] = [_round(x) for x in scored["ttt_losses"]["ttt_loss_before"]]
        ttt["per_video_loss_after"] = [_round(x) for x in scored["ttt_losses"]["ttt_loss_after"]]
    details["ttt"] = ttt
    details["lpips_note"] = lpips_note
    return metrics, details, per_video


def write_plot_tables(details: dict, plots_dir: str | Path) -> list[Path]:
    """reports/plots/<metric>.tsv in long format (step, <metric>, method), one row per step and method."""
    from pipeline.io import atomic_path

    plots_dir = Path(plots_dir)
    written = []
    for metric in IMAGE_METRICS:
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


def evaluate(params, *, log: Callable[[str], None] = LOG.info) -> dict:
    """The evaluate stage: score predictions.h5, write metrics.json, details, per-video scores, plots, figures."""
    from pipeline.io import resolve_device
    from pipeline.pretrained import hub_dir, weights_dir
    from pipeline.report import plot_curves, write_figures

    paths, ev = params.paths, params.eval
    device = resolve_device(params.device)
    lpips_model, lpips_note = None, None
    try:
        with hub_dir(weights_dir(paths.pretrained, "lpips")):  # the backbone from the pretrained stage
            lpips_model = load_lpips(ev.lpips_net, device=device)
    except LPIPSUnavailable as e:
        lpips_note = str(e)
        log(f"evaluate: LPIPS reported as null: {lpips_note}")
    scored = score_predictions(paths.predictions, paths.frames, lpips_model=lpips_model, log=log)
    if scored["attrs"]["split"] != ev.split:
        raise ValueError(f"{paths.predictions} holds {scored['attrs']['split']} predictions, params say eval.split="
                         f"{ev.split}; re-run infer")
    metrics, details, per_video = summarize(scored, collision_threshold=ev.collision_threshold, lpips_note=lpips_note,
                                            resamples=ev.bootstrap, level=ev.confidence, seed=ev.seed)
    metrics["lpips_net"] = ev.lpips_net
    # numeric flags, so a fallback shows in `dvc metrics show/diff`, not only in a note
    metrics["lpips_computed"] = int(lpips_model is not None)
    metrics["flow_fallback"] = int("fallback" in metrics["flow_backend"])
    details.update(protocol=ev.protocol, lpips_net=ev.lpips_net)
    reports = Path(paths.reports)
    write_plot_tables(details, reports / "plots")
    plot_curves(details, reports / "plots")
    write_figures(paths.predictions, paths.frames, reports / "figures", count=ev.figures,
                  methods=[m for m in ("model_ttt", "model", "flow_advect", "flow_extrap", "copy_last")
                           if m in scored["methods"]])
    write_json(paths.report_dir("evaluate") / "details.json", details)
    write_json(paths.report_dir("evaluate") / "per_video.json", per_video)
    write_json(reports / "metrics.json", metrics)
    return metrics
