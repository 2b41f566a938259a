"""Choose model.mask_steps on val: the trained pixel warp_occ rolled out with its mask cut at step K.

Usage: python bench/bench_mask_steps.py --values 0,6,8 [--base DIR] [--name NAME]

After step K (model.mask_steps) the mask is 0 and the prediction is the fill (the last frame re-warped k times
by the velocity held in place) plus the residual. For K >= the checkpoint's train.rollout the cut never
reaches a training step, so one trained model gives every such K exactly what training with it would;
smaller K are refused (they would need a model trained with them). DIR (default: the workspace) holds the
run: params.yaml, data/frames.h5, data/flow.h5, models/temporal.pt. Scores: float PSNR of the first eval.context
+ eval.horizon frames of each val video (the evaluate stage scores uint8 frames, so values differ by a few
hundredths) per step, and the paired difference against flow_extrap and against K = 0 (the mask at every
step): 95 % bootstrap over videos (eval.bootstrap, eval.seed). Writes bench/results/mask_steps[_NAME].json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, save, trained_temporal, val_videos  # noqa: E402


def mask_step_configs(model_cfg, *, rollout: int, values: list[int]) -> dict:
    """The trained model's config with mask_steps=K for each K; ValueError where one model cannot answer for K."""
    trained = model_cfg.mask_steps
    if 0 < trained < rollout:
        raise ValueError(f"the checkpoint was trained with model.mask_steps={trained} < train.rollout={rollout}: "
                         "its mask never learned steps after that; score a model trained without the cut")
    short = [k for k in values if 0 < k < rollout]
    if short:
        raise ValueError(f"--values {short}: below train.rollout={rollout}, the cut would change training; "
                         "train with them (bench/sweep.py -S model.mask_steps=...) instead")
    # the model config's own check (a ConfigError, a ValueError) refuses a cut for anything but pixel + fill extrap
    return {k: dataclasses.replace(model_cfg, mask_steps=k) for k in values}


def main() -> None:
    from pipeline.baselines import flow_extrapolation
    from pipeline.config import load_params
    from pipeline.inference import rollout_model
    from pipeline.metrics import psnr
    from pipeline.stats import paired_difference, resample_indices

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", required=True, help="comma-separated K (0 = the mask at every step)")
    ap.add_argument("--base", type=Path, default=REPO, help="the run to score (default: the workspace)")
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()
    values = [int(v) for v in args.values.split(",")]

    base = args.base.resolve()
    p = load_params(base / "params.yaml")
    ckpt, model = trained_temporal(base, p)
    rollout = int(ckpt["params"]["train"]["rollout"])
    try:
        configs = mask_step_configs(model.model_cfg, rollout=rollout, values=values)
    except ValueError as e:
        raise SystemExit(f"{base / p.paths.temporal}: {e}") from None
    videos = val_videos(base, p)
    C, Hz, mc = p.eval.context, p.eval.horizon, model.context
    scores: dict[str, list[np.ndarray]] = {"flow_extrap": [], **{f"mask_steps={k}": [] for k in values}}
    t0 = time.perf_counter()
    for _, observed, truth in videos:  # truth [1,Hz,3,H,W]
        with torch.no_grad():
            scores["flow_extrap"].append(psnr(flow_extrapolation(observed, Hz).clamp(0, 1), truth)[0].numpy())
            for k, cfg in configs.items():
                model.model_cfg = cfg
                pred = rollout_model(model, observed, model_context=mc, horizon=Hz)["frames"]  # the infer stage's
                scores[f"mask_steps={k}"].append(psnr(pred, truth)[0].numpy())  # [Hz]
    per_video = {name: np.stack(v).mean(axis=1) for name, v in scores.items()}  # [N] mean over the horizon
    draws = resample_indices(len(videos), resamples=p.eval.bootstrap, seed=p.eval.seed)
    result = {"split": "val", "base": str(base), "videos": len(videos), "context": C, "horizon": Hz,
              "train_rollout": rollout, "methods": {}}
    for name, v in scores.items():
        row = {"psnr": round(float(per_video[name].mean()), 4),
               "psnr_per_step": [round(float(x), 3) for x in np.stack(v).mean(axis=0)]}
        for other in ("flow_extrap", "mask_steps=0"):
            if other in per_video and other != name:
                d = paired_difference(per_video[name], per_video[other], draws, level=p.eval.confidence)
                row[f"minus_{other}"] = {"psnr": round(d.mean, 4), "lo": round(d.lo, 4), "hi": round(d.hi, 4)}
        result["methods"][name] = row
        extra = "".join(f", - {o} {row[f'minus_{o}']['psnr']:+.2f} [{row[f'minus_{o}']['lo']:+.2f}, "
                        f"{row[f'minus_{o}']['hi']:+.2f}]" for o in ("flow_extrap", "mask_steps=0")
                        if f"minus_{o}" in row)
        print(f"  {name}: {row['psnr']:.2f} dB{extra}")
    result["seconds"] = round(time.perf_counter() - t0)
    print(f"wrote {save('mask_steps', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
