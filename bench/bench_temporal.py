"""The five temporal archs on one protocol: train each on the same upstream outputs, infer and evaluate it.

    python bench/bench_temporal.py [--archs warp_occ,latent,...] [--split test|val] [--base DIR] [-S KEY=VALUE ...]
    python bench/bench_temporal.py --archs latent_flow,clip_lstm -S loss.flow=0.1   # an arch's own loss weights

Each arch runs train_temporal, infer and evaluate in a temporary directory with model.arch set (bench/sweep.py's
runner: frames, flow, latents and the VAEs come from the workspace's last `dvc repro`, or --base DIR). This
script reports, it chooses nothing, so it reads the test split by default (the README's table); training wall
time is measured around train_temporal on this machine. Writes bench/results/temporal.json (temporal_val.json
for --split val), one row per arch: every metric with its interval, the paired differences, train seconds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, save  # noqa: E402
from bench.sweep import parse_grid, run_variant, set_key  # noqa: E402

ARCHS = ["warp_occ", "latent", "latent_flow", "dual_vae", "clip_lstm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--base", type=Path, default=REPO, help="directory holding the base run's data/ and models/")
    ap.add_argument("--name", default=None, help="results name (default temporal, temporal_val)")
    ap.add_argument("-S", "--set", action="append", default=[], help="fixed override KEY=VALUE for every arch")
    args = ap.parse_args()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, values in parse_grid(args.set).items():
        set_key(raw, key, values[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_temporal_") as tmp:
        for arch in [a for a in args.archs.split(",") if a]:
            work = Path(tmp) / arch
            work.mkdir()
            seconds = {}
            t0 = time.perf_counter()
            metrics = run_variant(raw, {"model.arch": arch}, base=args.base.resolve(), work=work, split=args.split,
                                  log=lambda line: _stage_time(line, seconds))
            m = metrics["model"]
            rows.append({"arch": arch, "train_seconds": seconds.get("train_temporal"),
                         "total_seconds": round(time.perf_counter() - t0), "metrics": metrics})
            print(f"{arch}: {m['psnr']} dB [{m['psnr_lo']}, {m['psnr_hi']}], step1 {m['psnr_step1']}, "
                  f"vs flow_extrap {metrics['model_minus_flow_extrap']['psnr']:+.3f} dB, train "
                  f"{seconds.get('train_temporal')} s", flush=True)
    name = args.name or ("temporal" if args.split == "test" else f"temporal_{args.split}")
    print(f"-> {save(name, {'split': args.split, 'overrides': args.set, 'rows': rows})}")


def _stage_time(line: str, seconds: dict) -> None:
    """Collect 'stage: N s' lines of run_variant's log."""
    print(line, flush=True)
    stage, _, rest = line.strip().partition(": ")
    if rest.endswith(" s") and rest[:-2].isdigit():
        seconds[stage] = int(rest[:-2])


if __name__ == "__main__":
    main()
