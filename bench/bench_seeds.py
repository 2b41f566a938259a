"""Seed spread: train the default arch with several seeds and report the spread of every headline number.

    python bench/bench_seeds.py [--seeds 0,1,2] [--split test|val] [-S KEY=VALUE ...] [--name NAME]

Each seed sets `train.seed` and the seeds of the VAEs the arch builds on (`vae.seed` for the latent
archs, `flow_vae.seed` too for dual_vae; pixel-space warp_occ uses none), then re-runs from the first
stage those seeds reach to evaluate in a temporary directory
(bench/sweep.py's runner; the data and flow come from the workspace's last `dvc repro`). A gain claimed in
the README is meaningful only when it is larger than this spread. This script reports; it chooses nothing,
so it may read the test split (the default, where the README's table is).
Writes bench/results/seeds.json (seeds_<split>.json for val; --name NAME: NAME.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, save  # noqa: E402
from bench.sweep import parse_grid, run_variant, set_key  # noqa: E402

def seed_overrides(raw: dict, seed: int) -> dict:
    """The seed params the configured arch's result depends on (its VAEs' seeds only where it is built on them)."""
    from pipeline.config import params_from_dict
    from pipeline.models.temporal import needs_vae

    p = params_from_dict(raw)
    want_vae, want_flow_vae = needs_vae(p.model.arch, p.model)
    out = {"train.seed": seed}
    if want_vae:
        out["vae.seed"] = seed
    if want_flow_vae:
        out["flow_vae.seed"] = seed
    return out


def flatten(metrics: dict) -> dict[str, float]:
    """Every number of a metrics.json as 'section.key' -> value (strings and nulls left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float)) and v is not None})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def spread(runs: list[dict]) -> dict[str, dict]:
    """Per number: mean, sample std, min, max and max - min over the seeds."""
    flat = [flatten(r) for r in runs]
    keys = [k for k in flat[0] if all(k in f for f in flat) and not k.endswith(("_lo", "_hi"))]
    out = {}
    for k in keys:
        xs = [f[k] for f in flat]
        out[k] = {"mean": round(statistics.fmean(xs), 5), "std": round(statistics.stdev(xs), 5) if len(xs) > 1 else 0.0,
                  "min": min(xs), "max": max(xs), "range": round(max(xs) - min(xs), 5), "values": xs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--base", type=Path, default=REPO, help="directory holding the base run's data/ and models/")
    ap.add_argument("-S", "--set", action="append", default=[], help="extra fixed override KEY=VALUE")
    ap.add_argument("--name", default=None, help="result name (default: seeds for test, seeds_<split> otherwise)")
    args = ap.parse_args()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, values in parse_grid(args.set).items():
        set_key(raw, key, values[0])
    arch = raw["model"]["arch"]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seeds_") as tmp:
        for seed in seeds:
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            print(f"seed {seed}: {seed_overrides(raw, seed)}", flush=True)
            metrics = run_variant(raw, seed_overrides(raw, seed), base=args.base.resolve(), work=work, split=args.split)
            runs.append(metrics)
            print(f"  model {metrics['model']['psnr']} dB, model - flow_extrap "
                  f"{metrics['model_minus_flow_extrap']['psnr']} dB", flush=True)
    table = spread(runs)
    name = args.name or ("seeds" if args.split == "test" else f"seeds_{args.split}")
    path = save(name, {"split": args.split, "arch": arch, "seeds": seeds, "overrides": args.set,
                       "seconds": round(time.perf_counter() - t0), "spread": table, "runs": runs})
    for key in ("model.psnr", "model_ttt.psnr", "model_minus_flow_extrap.psnr", "model_ttt_minus_model.psnr",
                "model.psnr_step1", "collision.ap"):
        if key in table:
            s = table[key]
            print(f"{key}: mean {s['mean']:.3f}, std {s['std']:.3f}, range {s['range']:.3f} over {len(seeds)} seeds")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
