"""Two kernels of evaluate / infer against what they replaced: SSIM's blur and the TTT step's trunk.

Usage: python bench/bench_eval_kernels.py [--base DIR] [--videos 16] [--repeats 3] [--name NAME]

- SSIM: `pipeline.metrics.ssim` (the separable Gaussian as float64 matmuls, in blocks) against the float64
  conv2d blur it replaced, both over one evaluate call's shape ([64 videos, 10 steps, 3, H, W] of the default
  run: random images of the run's frame size). Printed: seconds of each (median of --repeats), the ratio
  conv2d / ours, and the largest difference of the scores (0 when they agree bit for bit).
- TTT: per TTT step, `model.ttt_objective` (pixel warp_occ runs the trunk once per window when only the
  flow head adapts) against `model.ttt_loss` (the trunk on every step), forward + backward to the flow head,
  on the first --videos test videos of the run in DIR (default: the workspace; its trained temporal.pt).
  Printed: milliseconds per step of each, the ratio, and the largest loss difference.
Writes bench/results/eval_kernels[_NAME].json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import REPO, save, trained_temporal, val_videos  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.metrics import gaussian_window, ssim  # noqa: E402


def ssim_conv2d(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference: the same SSIM with the valid Gaussian blur as two float64 conv2d passes (the old code)."""
    C, H, W = pred.shape[-3:]
    win = gaussian_window(1.5)
    K = win.numel()
    x, y = pred.reshape(-1, 1, H, W).double(), target.reshape(-1, 1, H, W).double()

    def blur(img):
        return F.conv2d(F.conv2d(img, win.view(1, 1, K, 1)), win.view(1, 1, 1, K))

    ux, uy, uxx, uyy, uxy = (blur(z) for z in (x, y, x * x, y * y, x * y))
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(*pred.shape[:-2], -1).mean(-1).mean(-1).float()  # [...]


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_ssim(frame_size: tuple[int, int], repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 10, 3, *frame_size, generator=g)  # [N,Hz,3,H,W]: one evaluate call of the default run
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    conv_s, ref = median_seconds(lambda: ssim_conv2d(a, b), repeats)
    ours_s, got = median_seconds(lambda: ssim(a, b), repeats)
    return {"shape": list(a.shape), "conv2d_s": round(conv_s, 4), "ours_s": round(ours_s, 4),
            "ratio_conv2d_over_ours": round(conv_s / ours_s, 2), "max_abs_diff": float((got - ref).abs().max())}


def bench_ttt(base: Path, params, videos: int, repeats: int) -> dict:
    _, model = trained_temporal(base, params)
    head = model.ttt_parameters(params.ttt.params)
    if head is None:
        return {"skipped": f"{params.model.arch} has no TTT parameters"}
    observed = [obs for _, obs, _ in val_videos(base, params, videos, split=params.eval.split)]

    def steps(make_loss) -> tuple[float, list[float]]:
        losses = []
        with torch.enable_grad():
            t0 = time.perf_counter()
            for obs in observed:
                loss_fn = make_loss(obs)
                for _ in range(params.ttt.steps):
                    loss = loss_fn()
                    torch.autograd.grad(loss, head)
                    losses.append(float(loss.detach()))
            return (time.perf_counter() - t0) / (len(observed) * params.ttt.steps), losses

    def plain(obs):
        return lambda: model.ttt_loss(obs, params.ttt.loss)

    def cached(obs):
        return model.ttt_objective(obs, params.ttt.loss, head)

    plain_s, plain_losses = min((steps(plain) for _ in range(repeats)), key=lambda r: r[0])
    cached_s, cached_losses = min((steps(cached) for _ in range(repeats)), key=lambda r: r[0])
    return {"videos": len(observed), "steps_per_video": params.ttt.steps, "ttt_params": params.ttt.params,
            "ttt_loss_ms_per_step": round(1000 * plain_s, 2), "ttt_objective_ms_per_step": round(1000 * cached_s, 2),
            "ratio_loss_over_objective": round(plain_s / cached_s, 2),
            "max_abs_loss_diff": max(abs(x - y) for x, y in zip(plain_losses, cached_losses))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO, help="run whose params, frames, flow and temporal.pt to use")
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    params = load_params(args.base / "params.yaml")
    result = {"ssim": bench_ssim(tuple(params.data.resolution), args.repeats),
              "ttt": bench_ttt(args.base, params, args.videos, args.repeats), "torch_threads": torch.get_num_threads()}
    s, t = result["ssim"], result["ttt"]
    print(f"ssim {s['shape']}: conv2d {s['conv2d_s']} s, ours {s['ours_s']} s, ratio {s['ratio_conv2d_over_ours']}, "
          f"max diff {s['max_abs_diff']}")
    if "skipped" in t:
        print(f"ttt: {t['skipped']}")
    else:
        print(f"ttt step ({t['videos']} videos x {t['steps_per_video']}): ttt_loss {t['ttt_loss_ms_per_step']} ms, "
              f"ttt_objective {t['ttt_objective_ms_per_step']} ms, ratio {t['ratio_loss_over_objective']}, "
              f"max loss diff {t['max_abs_loss_diff']}")
    print(f"wrote {save('eval_kernels', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
