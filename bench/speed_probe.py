"""Machine speed probe: seconds per training step of the default temporal model, on fixed random clips.

Usage: python bench/speed_probe.py [--steps 8] [--repeats 3]

The same code and the same outputs took 10.9 and 19.6 minutes of `dvc repro` on two days on the same 2-core
machine type (README "Run time on a slower day"): the CPU time of a step moved, not the pipeline. This
probe times what dominates a default run, one train_temporal step (forward, loss, backward, clipping, AdamW)
of the pixel-space warp_occ at params.yaml's sizes, on random inputs, so that a wall time can be read against
the speed the machine had at that moment. bench_pipeline.py runs it before and after `dvc repro` and records
repro seconds per probe step. Nothing here reads or writes the pipeline's files.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REPO  # noqa: E402
from pipeline.data.extract import MAX_OBJECTS  # noqa: E402
from pipeline.models.temporal import build_temporal  # noqa: E402
from pipeline.temporal_training import temporal_loss  # noqa: E402


def probe_batch(*, batch: int, frames: int, size: tuple[int, int], boxes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random training clip: frames [B,T,3,H,W], flows, visibility, collision labels and boxes."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    B, T = batch, frames
    return {"frames": torch.rand(B, T, 3, H, W, generator=g),                    # [B,T,3,H,W]
            "flow_bwd": 2 * torch.randn(B, T - 1, 2, H, W, generator=g),         # [B,T-1,2,H,W] pixels
            "occ": torch.rand(B, T - 1, 1, H, W, generator=g),                   # [B,T-1,1,H,W]
            "collision": (torch.rand(B, T, generator=g) < 0.05).float(),          # [B,T]
            "boxes": torch.rand(B, T, boxes, 4, generator=g).sort(-1).values,   # [B,T,K,4]
            "box_mask": torch.ones(B, T, boxes)}                                 # [B,T,K]


def probe_step_seconds(params, *, steps: int = 8, repeats: int = 3, seed: int = 0) -> dict:
    """Median and min wall seconds of one training step of pixel warp_occ at these params' sizes (after a warm-up)."""
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps and repeats must be >= 1, got steps={steps}, repeats={repeats}")
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(params.model, arch="warp_occ", warp_space="pixel")
    size = tuple(params.data.resolution)
    boxes = MAX_OBJECTS  # frames.h5's box slots, what the trained model's state head predicts
    model = build_temporal("warp_occ", model=model_cfg, loss=params.loss, frame_size=size, num_boxes=boxes).train()
    batch = probe_batch(batch=params.train.batch, frames=model_cfg.context + params.train.rollout, size=size,
                        boxes=boxes, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=0.0)  # as pipeline.training.train

    def step() -> None:
        loss = temporal_loss(model, batch)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.clip_grad or float("inf"))
        opt.step()

    step()  # warm-up: allocations, oneDNN primitive caches
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        per_step.append((time.perf_counter() - start) / steps)
    return {"step_s": round(statistics.median(per_step), 4), "step_s_min": round(min(per_step), 4),
            "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "batch": params.train.batch, "clip_frames": model_cfg.context + params.train.rollout,
            "size": list(size)}


def main() -> None:
    from pipeline.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    args = ap.parse_args()
    result = probe_step_seconds(load_params(REPO / "params.yaml"), steps=args.steps, repeats=args.repeats)
    print(f"speed probe: {result['step_s'] * 1000:.0f} ms per default train_temporal step "
          f"(min {result['step_s_min'] * 1000:.0f}, {result['threads']} threads)")


if __name__ == "__main__":
    main()
