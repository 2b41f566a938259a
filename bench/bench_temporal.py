"""Temporal models vs copy-last-frame on the test split: 1-step PSNR and PSNR over a 10-step rollout.

Usage: python bench/bench_temporal.py --data DIR [--archs warp_occ,latent,...] [--steps N] [-S key=value ...]
DIR holds a copy of the upstream outputs (frames.h5, flow.h5, latents.h5, vae.pt, flow_vae.pt), e.g. from
`dvc repro encode`. Each arch is trained with the shared loop (params.yaml + overrides; train.steps unless
--steps), then scored on the test split: 1-step prediction from `model.context` real frames (every window,
strided to --max-clips), and a `--horizon`-step rollout fed back on itself. Writes bench/results/<name>.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import REPO, apply_overrides, save  # noqa: E402
from pipeline.checkpoint import load_model  # noqa: E402
from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.datasets import ClipDataset  # noqa: E402
from pipeline.temporal import evaluate_psnr, train_temporal  # noqa: E402

ARCHS = ["warp_occ", "latent", "latent_flow", "dual_vae", "clip_lstm"]


def bench_arch(arch: str, raw: dict, data: Path, work: Path, *, steps: int | None, horizon: int,
               max_clips: int) -> dict:
    """Train one arch on the copied data and score it on the test split."""
    raw = yaml.safe_load(yaml.safe_dump(raw))
    raw["model"]["arch"] = arch
    raw["paths"].update(frames=str(data / "frames.h5"), flow=str(data / "flow.h5"), latents=str(data / "latents.h5"),
                        vae=str(data / "vae.pt"), flow_vae=str(data / "flow_vae.pt"),
                        temporal=str(work / f"{arch}.pt"), reports=str(work / "reports" / arch))
    params = params_from_dict(raw)
    report = train_temporal(params, steps=steps)
    model = load_model(params.paths.temporal, "temporal")
    c, p = params.model.context, params.paths
    latents = p.latents if arch != "clip_lstm" else None
    one = evaluate_psnr(model, ClipDataset(p.frames, "test", c + 1, flow_h5=p.flow, latents_h5=latents),
                        context=c, horizon=1, max_clips=max_clips)
    roll = evaluate_psnr(model, ClipDataset(p.frames, "test", c + horizon, flow_h5=p.flow, latents_h5=latents),
                         context=c, horizon=horizon, max_clips=max_clips)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    result = {
        "arch": arch, "steps": report["steps"], "train_seconds": report["train_seconds"],
        "encoder": report.get("encoder"), "final_loss": report["loss"],
        "psnr_step1": round(one["model"][0], 3), "psnr_step1_copy_last": round(one["copy_last"][0], 3),
        "gain_step1_db": round(one["model"][0] - one["copy_last"][0], 3), "clips_step1": one["clips"],
        f"psnr_rollout{horizon}": round(mean(roll["model"]), 3),
        f"psnr_rollout{horizon}_copy_last": round(mean(roll["copy_last"]), 3),
        f"gain_rollout{horizon}_db": round(mean(roll["model"]) - mean(roll["copy_last"]), 3),
        "psnr_per_step": [round(v, 3) for v in roll["model"]],
        "psnr_per_step_copy_last": [round(v, 3) for v in roll["copy_last"]], "clips_rollout": roll["clips"],
    }
    print(f"{arch}: {result['steps']} steps in {result['train_seconds']} s | 1-step {result['psnr_step1']:.2f} vs "
          f"copy {result['psnr_step1_copy_last']:.2f} dB ({result['gain_step1_db']:+.2f}) | {horizon}-step "
          f"{result[f'psnr_rollout{horizon}']:.2f} vs {result[f'psnr_rollout{horizon}_copy_last']:.2f} dB "
          f"({result[f'gain_rollout{horizon}_db']:+.2f})", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="dir with frames.h5 flow.h5 latents.h5 vae.pt flow_vae.pt")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--max-clips", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--name", default="temporal")
    parser.add_argument("-S", "--set", action="append", default=[], help="param override key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text())
    raw["device"] = "cpu" if not torch.cuda.is_available() else raw.get("device", "auto")
    for item in args.set:
        apply_overrides(raw, [item])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_temporal_") as tmp:
        for arch in [a for a in args.archs.split(",") if a]:
            results.append(bench_arch(arch, raw, args.data.resolve(), Path(tmp), steps=args.steps,
                                      horizon=args.horizon, max_clips=args.max_clips))
    path = save(args.name, {"data": str(args.data), "overrides": args.set, "threads": torch.get_num_threads(),
                            "horizon": args.horizon, "results": results})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
