"""dual_vae's disentanglement weights on val: prediction quality, motion transfer and leakage per setting.

    python bench/bench_control.py -S loss.appearance=0,0.5,2 -S loss.motion=0,0.5,2 [--base DIR] [--name NAME]

The -S lists are zipped, not crossed: the example runs three variants (0/0, 0.5/0.5, 2/2). Each one trains
dual_vae (model.arch=dual_vae), infers, evaluates and runs the control stage on the val split, in its own
temporary directory from the base run's data and VAEs (bench/sweep.py's runner, which refuses the test
split: this script chooses a default). Writes bench/results/control_<name>.json: per variant the model's
val PSNR with its interval, the control methods' motion / appearance means and the leakage table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, save  # noqa: E402
from bench.sweep import parse_grid, run_variant  # noqa: E402

SHOWN = ("epe", "epe_moving", "model_motion_epe_moving", "background_psnr", "background_ssim", "hist_to_a", "b_share")


def variants(grid: dict[str, list]) -> list[dict]:
    """{'a': [1, 2], 'b': [3, 4]} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}] (lists of one length, zipped)."""
    lengths = {len(v) for v in grid.values()}
    if len(lengths) != 1:
        raise SystemExit(f"-S lists are zipped and must have one length, got {({k: len(v) for k, v in grid.items()})}")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in zip(*(grid[k] for k in keys))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], required=True, help="KEY=V1[,V2...] (zipped)")
    ap.add_argument("--base", type=Path, default=REPO, help="directory holding the base run's data/ and models/")
    ap.add_argument("--name", default="weights", help="results name: bench/results/control_<name>.json")
    args = ap.parse_args()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_control_") as tmp:
        for i, overrides in enumerate(variants(parse_grid(args.set))):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            print(f"{i + 1}: {overrides}", flush=True)
            metrics = run_variant(raw, {"model.arch": "dual_vae", **overrides}, base=args.base.resolve(), work=work,
                                  split="val")
            report = json.loads((work / "reports" / "control" / "metrics.json").read_text())
            methods = {name: {k: (v or {}).get("mean") for k, v in m.items() if k in SHOWN}
                       for name, m in report["methods"].items()}
            m = metrics["model"]
            rows.append({"overrides": overrides, "model": {k: m[k] for k in ("psnr", "psnr_lo", "psnr_hi", "ssim",
                                                                               "psnr_step1")},
                         "control": methods, "leakage": report["leakage"]})
            t = methods["transfer"]
            print(f"  val PSNR {m['psnr']} [{m['psnr_lo']}, {m['psnr_hi']}]; transfer EPE moving {t['epe_moving']} "
                  f"(zero {methods['zero_flow']['epe_moving']}, warp_b {methods['warp_b']['epe_moving']}), "
                  f"b_share {t['b_share']}; leakage {report['leakage']['predicted']}", flush=True)
    print(f"-> {save(f'control_{args.name}', {'split': 'val', 'variants': args.set, 'rows': rows})}")


if __name__ == "__main__":
    main()
