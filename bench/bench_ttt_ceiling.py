"""How much could TTT give at most? The trained model adapted on the very frames it is scored on (val).

Usage: python bench/bench_ttt_ceiling.py [--videos 32] [--oracle-steps 10] [--oracle-lr 1e-3] [--oracle-params flow_head] [--name NAME]

A diagnostic, not a method: per val video, the workspace's models/temporal.pt is adapted (pipeline.ttt.TTTAdapter,
its `ttt_loss` over every window) three ways and rolled out from the same eval.context frames:
- `none`: no adaptation;
- `context`: the shipped TTT, on the eval.context frames only (the ttt.* params);
- `oracle`: on the context and the eval.horizon frames it is then scored on (--oracle-* settings), which
  no predictor may read: an upper bound on what adapting those weights per video can buy.
If even the oracle gains little, the weights TTT adapts are not what limits the rollout. Scores are
float PSNR (the evaluate stage scores uint8 frames, so absolute values differ by a few hundredths), paired
bootstrap intervals over the videos (eval.bootstrap, eval.seed). Writes bench/results/ttt_ceiling[_NAME].json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, save, trained_temporal, val_videos  # noqa: E402


def main() -> None:
    from pipeline.clips import clip_slice
    from pipeline.config import load_params
    from pipeline.inference import rollout_model
    from pipeline.metrics import psnr
    from pipeline.stats import paired_difference, resample_indices
    from pipeline.ttt import TTTAdapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=32, help="first N val videos")
    ap.add_argument("--oracle-steps", type=int, default=10)
    ap.add_argument("--oracle-lr", type=float, default=1e-3)
    ap.add_argument("--oracle-params", default="flow_head", help="flow_head | flow_bias | all")
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()

    torch.manual_seed(0)
    p = load_params(REPO / "params.yaml")
    model = trained_temporal(REPO, p)[1]
    videos = val_videos(REPO, p, limit=args.videos)
    C, Hz, mc = p.eval.context, p.eval.horizon, model.context
    t = p.ttt
    settings = {"context": dict(steps=t.steps, lr=t.lr, params=t.params, loss=t.loss, grad_clip=t.grad_clip),
                "oracle": dict(steps=args.oracle_steps, lr=args.oracle_lr, params=args.oracle_params, loss=t.loss,
                               grad_clip=t.grad_clip)}
    adapters = {name: TTTAdapter(model, **kw) for name, kw in settings.items()}
    spans = {"context": C, "oracle": C + Hz}  # frames each adaptation may read
    scores = {name: [] for name in ["none", *adapters]}
    t0 = time.perf_counter()
    n = len(videos)
    for i, (video, observed, truth) in enumerate(videos):  # truth [1,Hz,3,H,W]
        def score() -> float:
            with torch.no_grad():
                pred = rollout_model(model, observed, model_context=mc, horizon=Hz)["frames"]  # the infer stage's
                return float(psnr(pred, truth).mean())

        scores["none"].append(score())
        for name, adapter in adapters.items():
            with adapter.adapted(clip_slice(video, 0, spans[name], observed=True)):
                scores[name].append(score())
        print(f"  video {i + 1}/{n}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in scores.items()), flush=True)
    draws = resample_indices(n, resamples=p.eval.bootstrap, seed=p.eval.seed)
    result = {"split": "val", "videos": n, "context": C, "horizon": Hz, "model_context": mc, "arch": p.model.arch,
              "settings": settings, "psnr": {k: round(float(np.mean(v)), 4) for k, v in scores.items()}}
    for name in adapters:
        d = paired_difference(scores[name], scores["none"], draws, level=p.eval.confidence)
        result[f"{name}_minus_none"] = {"psnr": round(d.mean, 4), "lo": round(d.lo, 4), "hi": round(d.hi, 4)}
        print(f"{name:>8} - none: {d.mean:+.3f} dB [{d.lo:+.3f}, {d.hi:+.3f}]")
    result["seconds"] = round(time.perf_counter() - t0)
    print(f"wrote {save('ttt_ceiling', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
