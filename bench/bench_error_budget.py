"""Where the default model's rollout error lies (val): the fill, the pixels that change, the collisions.

Usage: python bench/bench_error_budget.py [--videos 32] [--threshold 0.05] [--name NAME]

A diagnostic for the pixel-space warp_occ (`model.fill: extrap`), not a method: per val video, the workspace's
models/temporal.pt rolls out eval.horizon frames from the last model.context of the eval.context frames (as infer
does), and its squared error is split over two regions of every predicted frame:
- `fill`: where the model's mask is below 0.5, i.e. where it shows the fill (plus the residual);
- `changed`: where the true frame differs from the last context frame by more than --threshold in some channel
  (the moving objects, their shadows and the floor they uncover; read from the truth, so only a diagnostic).
`oracle_fill` puts the true frame where the mask is below 0.5: the most a better fill could buy. Videos are also
split by what happens in the horizon: a collision, an object entering the view (in no context frame's
boxes, in some horizon frame's), neither; for the model and the `flow_advect` baseline. Scores are
float PSNR (the evaluate stage scores uint8 frames, so absolute values differ by a few hundredths); intervals are
paired bootstraps over the videos (eval.bootstrap, eval.seed). Writes bench/results/error_budget[_NAME].json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, save, trained_temporal, val_videos  # noqa: E402


def error_budget(pred: torch.Tensor, truth: torch.Tensor, last: torch.Tensor, mask_logit: torch.Tensor, *,
                 threshold: float) -> dict[str, float]:
    """One video's rollout: pred, truth [Hz,3,H,W], last context frame [3,H,W], mask logits [Hz,1,H,W]."""
    from pipeline.metrics import psnr

    if pred.shape != truth.shape or mask_logit.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ValueError(f"error_budget: pred {tuple(pred.shape)}, truth {tuple(truth.shape)} and mask logits "
                         f"{tuple(mask_logit.shape)} must be [Hz,3,H,W], [Hz,3,H,W], [Hz,1,H,W]")
    fill = (torch.sigmoid(mask_logit) < 0.5).float()  # [Hz,1,H,W]
    changed = ((truth - last).abs().amax(dim=1, keepdim=True) > threshold).float()  # [Hz,1,H,W]
    se = (pred - truth).pow(2).sum(dim=1, keepdim=True)  # [Hz,1,H,W]
    total = float(se.sum().clamp_min(1e-12))
    per_step = psnr(pred, truth)  # [Hz]
    oracle_fill = pred * (1 - fill) + truth * fill
    return {"psnr": float(per_step.mean()), "psnr_last_step": float(per_step[-1]),
            "oracle_fill_psnr": float(psnr(oracle_fill, truth).mean()),
            "fill_pixels": float(fill.mean()), "fill_error_share": float((se * fill).sum()) / total,
            "changed_pixels": float(changed.mean()), "changed_error_share": float((se * changed).sum()) / total}


def horizon_events(video: dict, *, context: int, horizon: int) -> dict[str, bool]:
    """What happens in frames context..context+horizon-1 of one video (batch of 1): a collision, an entry."""
    collision = bool(video["collision"][0, context:context + horizon].sum() > 0)
    seen = video["box_mask"][0, :context].amax(dim=0) > 0  # [K] in view in some context frame
    later = video["box_mask"][0, context:context + horizon].amax(dim=0) > 0  # [K]
    enters = bool((later & ~seen).any())
    return {"collision": collision, "enters": enters, "neither": not (collision or enters)}


def main() -> None:
    from pipeline.baselines import PREDICTORS
    from pipeline.clips import clip_slice
    from pipeline.config import load_params
    from pipeline.metrics import psnr
    from pipeline.stats import bootstrap_mean, paired_difference, resample_indices

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=32, help="first N val videos")
    ap.add_argument("--threshold", type=float, default=0.05, help="'changed': |true - last context frame| above this")
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()

    p = load_params(REPO / "params.yaml")
    m = p.model
    if (m.arch, m.warp_space, m.fill) != ("warp_occ", "pixel", "extrap"):
        raise SystemExit(f"error_budget reads the mask of the pixel-space warp_occ with model.fill=extrap; params.yaml "
                         f"has arch={m.arch}, warp_space={m.warp_space}, fill={m.fill}")
    model = trained_temporal(REPO, p)[1]
    videos = val_videos(REPO, p, limit=args.videos)
    C, Hz, mc = p.eval.context, p.eval.horizon, model.context
    rows, advect, events = [], [], []
    with torch.no_grad():
        for video, observed, truth in videos:  # truth [1,Hz,3,H,W]
            n = observed["frames"].shape[1]
            out = model.rollout(clip_slice(observed, n - mc, n), Hz)  # what infer's rollout_model calls
            rows.append(error_budget(out["frames"][0], truth[0], observed["frames"][0, -1], out["mask_logit"][0],
                                     threshold=args.threshold))
            advect.append(float(psnr(PREDICTORS["flow_advect"](observed, Hz)[0], truth[0]).mean()))
            events.append(horizon_events(video, context=C, horizon=Hz))
    n = len(rows)
    draws = resample_indices(n, resamples=p.eval.bootstrap, seed=p.eval.seed)
    col = {k: [r[k] for r in rows] for k in rows[0]}

    def interval(iv) -> dict:
        return {"mean": round(iv.mean, 4), "lo": round(iv.lo, 4), "hi": round(iv.hi, 4)}

    result = {"split": "val", "videos": n, "context": C, "horizon": Hz, "model_context": mc,
              "threshold": args.threshold,
              "mean": {k: round(float(np.mean(v)), 4) for k, v in col.items()},
              "oracle_fill_minus_model": interval(paired_difference(col["oracle_fill_psnr"], col["psnr"], draws,
                                                                    level=p.eval.confidence)),
              "changed_error_share": interval(bootstrap_mean(col["changed_error_share"], draws,
                                                             level=p.eval.confidence)),
              "by_event": {}}
    for name in ("collision", "enters", "neither"):
        idx = [i for i, e in enumerate(events) if e[name]]

        def group_mean(values: list[float]) -> float | None:
            return round(float(np.mean([values[i] for i in idx])), 4) if idx else None

        result["by_event"][name] = {"videos": len(idx), "model_psnr": group_mean(col["psnr"]),
                                    "model_psnr_last_step": group_mean(col["psnr_last_step"]),
                                    "flow_advect_psnr": group_mean(advect)}
    mean = result["mean"]
    print(f"model {mean['psnr']:.2f} dB (step {Hz}: {mean['psnr_last_step']:.2f}); fill: {100 * mean['fill_pixels']:.1f} % "
          f"of pixels, {100 * mean['fill_error_share']:.1f} % of the squared error; a perfect fill "
          f"{result['oracle_fill_minus_model']['mean']:+.2f} dB; changed pixels: {100 * mean['changed_pixels']:.1f} % of "
          f"pixels, {100 * mean['changed_error_share']:.1f} % of the error")
    for name, g in result["by_event"].items():
        print(f"  {name}: {g['videos']} videos, model {g['model_psnr']} dB (step {Hz}: {g['model_psnr_last_step']}), "
              f"flow_advect {g['flow_advect_psnr']}")
    print(f"wrote {save('error_budget', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
