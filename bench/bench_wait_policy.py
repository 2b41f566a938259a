"""OpenMP wait policy: wall time of the train_temporal stage with libgomp's default against OMP_WAIT_POLICY=PASSIVE.

Usage: python bench/bench_wait_policy.py [--steps 40] [--pairs 3] [--base DIR] [-S KEY=VALUE ...] [--name NAME]

The pipeline sets no wait policy (libgomp's default: spin briefly, then sleep). PASSIVE (sleep at once) saves
CPU for other jobs on a shared machine, but wakes torch's threads late after every parallel region. This runs
`python -m pipeline.stages.train_temporal` for --steps steps with DIR's params (plus -S overrides) in a
temporary directory: its inputs are read from DIR (default: the workspace; paths.* pointed there, nothing of DIR
written), its checkpoint and reports go to the temporary directory. The two policies run in turn (default,
PASSIVE, default, ...); printed: each one's median wall and CPU seconds and the median of the pairwise ratios
PASSIVE / default.
Writes bench/results/wait_policy[_NAME].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, apply_overrides, save  # noqa: E402

POLICIES = {"default": None, "PASSIVE": "PASSIVE"}
INPUTS = ("frames", "flow", "latents", "vae", "flow_vae", "pretrained")  # paths.* the stage reads


def run_stage(root: Path, policy: str | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one train_temporal stage run in `root` under `policy` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    before = os.times()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.train_temporal"], cwd=root, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if result.returncode != 0:
        raise SystemExit(f"train_temporal failed under OMP_WAIT_POLICY={policy}:\n{result.stderr[-3000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> None:
    from pipeline.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each policy, in turn")
    ap.add_argument("--base", type=Path, default=REPO, help="the run whose inputs to read (default: the workspace)")
    ap.add_argument("-S", "--set", action="append", default=[], help="param override KEY=VALUE (e.g. model.arch=dual_vae)")
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()
    base = args.base.resolve()
    p = load_params(base / "params.yaml")
    missing = [f for f in (p.paths.frames, p.paths.flow) if not (base / f).is_file()]
    if missing:
        raise SystemExit(f"{base}: {', '.join(missing)} missing: run `dvc repro encode` there first")
    raw = yaml.safe_load((base / "params.yaml").read_text())
    apply_overrides(raw, [*args.set, f"train.steps={args.steps}"])
    for name in INPUTS:
        raw["paths"][name] = str(base / raw["paths"][name])
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw["paths"].update(temporal=str(root / "temporal.pt"), reports=str(root / "reports"))
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        for i in range(args.pairs):
            for name, policy in POLICIES.items():
                runs[name].append(run_stage(root, policy))
                print(f"  pair {i + 1}/{args.pairs} {name}: {runs[name][-1][0]:.1f} s wall", flush=True)
    result = {"base": str(base), "overrides": args.set, "stage": "train_temporal", "steps": args.steps,
              "pairs": args.pairs, "policies": {}}
    for name, rows in runs.items():
        result["policies"][name] = {"wall_s_median": round(statistics.median(w for w, _ in rows), 1),
                                    "cpu_s_median": round(statistics.median(c for _, c in rows), 1),
                                    "wall_s": [round(w, 1) for w, _ in rows]}
    ratios = [b[0] / a[0] for a, b in zip(runs["default"], runs["PASSIVE"])]
    result["passive_over_default_wall"] = {"median": round(statistics.median(ratios), 3),
                                           "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    for name, row in result["policies"].items():
        print(f"{name:>8}: {row['wall_s_median']} s wall, {row['cpu_s_median']} s CPU (median of {args.pairs})")
    r = result["passive_over_default_wall"]
    print(f"PASSIVE / default wall: {r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})")
    print(f"wrote {save('wait_policy', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
