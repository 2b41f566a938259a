"""Inference throughput on the test split: predicted frames/s with and without test-time training, per arch.

Usage: python bench/bench_infer.py [--workspace DIR] [--archs warp_occ] [--train-steps 20] [--set KEY=VALUE ...]
Speed only: uses the workspace of bench/bench_train.py (upstream outputs of the default data, see there),
trains each arch for --train-steps steps (the weights' quality does not change the cost of a rollout or
of the fixed `ttt.steps` adaptation steps), then runs the infer stage's code (pipeline.inference.infer) and
reads its timing: frames/s of the rollout per method (`model`, `model_ttt` = adaptation + rollout, the
baselines) as written to predictions.h5's attrs. Writes bench/results/infer.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_train import prepare_workspace, workspace_params  # noqa: E402
from bench.common import save  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.io import resolve_device  # noqa: E402


def arch_row(arch: str, params: Params, work: Path, *, train_steps: int) -> dict:
    """Train `arch` briefly, run inference on the test split, return its frames/s per method."""
    from pipeline.inference import infer
    from pipeline.temporal_training import train_temporal

    paths = dataclasses.replace(params.paths, temporal=str(work / f"{arch}.pt"),
                                predictions=str(work / f"{arch}_predictions.h5"))
    params = dataclasses.replace(params, paths=paths, model=dataclasses.replace(params.model, arch=arch))
    train_temporal(params, steps=train_steps, report_dir=work / "reports" / arch)
    summary = infer(params)  # frames/s are logged, never stored in predictions.h5
    ttt = summary["ttt"]
    fps = {k: round(v, 2) for k, v in summary["frames_per_second"].items()}
    row = {"arch": arch, "videos": summary["videos"], "horizon": params.eval.horizon, "context": params.eval.context,
           "device": resolve_device(params.device).type, "fps": fps,
           "fps_model": fps.get("model"), "fps_model_ttt": fps.get("model_ttt"),
           "ttt_supported": ttt.get("supported"), "ttt_reason": ttt.get("reason"), "ttt_steps": params.ttt.steps,
           "ttt_params": params.ttt.params}
    if row["fps_model"] and row["fps_model_ttt"]:
        row["ttt_slowdown"] = round(row["fps_model"] / row["fps_model_ttt"], 1)
    ttt_text = (f"with TTT ({params.ttt.steps} steps on {params.ttt.params}) {row['fps_model_ttt']} frames/s"
                if row["fps_model_ttt"] else f"TTT n/a ({ttt.get('reason')})")
    print(f"  {arch:<12} rollout {row['fps_model']} frames/s; {ttt_text}; teacher-forced pass (1-step + collisions) "
          f"{fps.get('model_teacher')} frames/s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None, help="reuse/create the upstream outputs here")
    parser.add_argument("--archs", default="warp_occ", help="comma-separated, e.g. warp_occ,dual_vae,latent")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="param override KEY=VALUE for the workspace")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        root = args.workspace or Path(tmp) / "workspace"
        manifest = prepare_workspace(root, overrides=args.set)
        params = dataclasses.replace(workspace_params(root), ttt=dataclasses.replace(workspace_params(root).ttt,
                                                                                      enabled=True))
        rows = [arch_row(arch, params, Path(tmp), train_steps=args.train_steps)
                for arch in args.archs.split(",") if arch]
    result = {"train_steps": args.train_steps, "torch_threads": torch.get_num_threads(),
              "load_avg_1min": round(os.getloadavg()[0], 2), "workspace": manifest,
              "ttt": dataclasses.asdict(params.ttt), "eval_batch": params.eval.batch,
              "note": "frames/s = predicted frames (videos x horizon) / seconds per method, from infer's "
                      "clock; model_ttt includes the per-video adaptation; model_teacher = the teacher-forced pass "
                      "(1-step predictions and collision scores on every frame)",
              "rows": rows}
    print(f"wrote {save('infer', result)}")


if __name__ == "__main__":
    main()
