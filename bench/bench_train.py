"""Training throughput: samples/s of every temporal architecture, and of the two VAEs, on the default data.

Usage: python bench/bench_train.py [--workspace DIR] [--steps 30] [--archs warp_occ,latent,...] [--set KEY=VALUE ...]
Speed only: the upstream stages run in a workspace (a copy of the project, default data) with few VAE
steps and the exact synthetic flow (flow.backend=gt), since throughput does not depend on how well the
weights are trained. --workspace reuses (or creates) that directory; without it a temporary one is used.
Each arch then trains `--steps` steps with the shared loop (train.batch clips of model.context + train.rollout
frames); samples/s = steps x batch / loop seconds (the first step's start-up included). The two VAEs train
`--steps` steps the same way (train_vae / train_flow_vae on the workspace data). On CUDA the loop runs with AMP (device auto).
Writes bench/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import apply_overrides, copy_project, save, set_params  # noqa: E402
from pipeline.config import Params, params_from_dict  # noqa: E402
from pipeline.io import resolve_device  # noqa: E402

ARCHS = ["warp_occ", "latent", "latent_flow", "dual_vae", "clip_lstm"]
UPSTREAM = ["download", "extract", "flow", "train_vae", "train_flow_vae", "encode"]
# speed-only workspace: exact synthetic flow instead of RAFT/DIS, VAEs trained just long enough to time them
WORKSPACE_SET = ["flow.backend=gt", "vae.steps=40", "flow_vae.steps=40", "vae.log_every=10", "flow_vae.log_every=10"]
MANIFEST = "bench_workspace.json"


def prepare_workspace(root: Path, *, overrides: list[str] = (), stages: list[str] = UPSTREAM) -> dict:
    """Copy the project into `root` and run `stages` there (each `python -m pipeline.stages.<name>`).

    Reused as is when `root` already holds a finished workspace with the same overrides and stages.
    Returns the manifest: overrides, stages, wall seconds per stage.
    """
    root = Path(root)
    overrides = [*WORKSPACE_SET, *overrides]
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("overrides") == overrides and manifest.get("stages") == list(stages):
            print(f"reusing the benchmark workspace {root}", flush=True)
            return manifest
        raise SystemExit(f"{root} holds a benchmark workspace made with other settings "
                         f"({manifest.get('overrides')}, {manifest.get('stages')}); pass another --workspace")
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not empty and not a benchmark workspace (no {MANIFEST}); pass an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    copy_project(root)
    set_params(root / "params.yaml", overrides)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    seconds = {}
    for stage in stages:
        print(f"workspace: running {stage} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}"], cwd=root, env=env,
                              capture_output=True, text=True)
        seconds[stage] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            raise SystemExit(f"workspace stage {stage} failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    manifest = {"overrides": overrides, "stages": list(stages), "stage_seconds": seconds}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def workspace_params(root: Path, overrides: list[str] = ()) -> Params:
    """The workspace's params with every path made absolute (so this process can stay where it is)."""
    raw = yaml.safe_load((Path(root) / "params.yaml").read_text())
    raw["paths"] = {k: str(Path(root) / v) for k, v in raw["paths"].items()}
    apply_overrides(raw, list(overrides))
    return params_from_dict(raw)


def vae_rows(params: Params, work: Path, *, steps: int) -> list[dict]:
    """samples/s of the two VAEs: each trains `steps` steps on the workspace data (checkpoints under `work`)."""
    import dataclasses

    from pipeline.vae_training import train_flow_vae, train_vae

    paths = dataclasses.replace(params.paths, vae=str(work / "vae.pt"), flow_vae=str(work / "flow_vae.pt"),
                                reports=str(work / "reports"))
    params = dataclasses.replace(params, paths=paths, vae=dataclasses.replace(params.vae, steps=steps),
                                 flow_vae=dataclasses.replace(params.flow_vae, steps=steps))
    rows = []
    for name, section, fn in (("vae", params.vae, train_vae), ("flow_vae", params.flow_vae, train_flow_vae)):
        seconds = float(fn(params)["run"]["train_seconds"])  # the training loop only, from the stage function
        rows.append({"model": name, "steps": steps, "batch": section.batch, "train_seconds": seconds,
                     "samples_per_s": round(steps * section.batch / seconds, 1) if seconds > 0 else None,
                     "device": resolve_device(params.device).type,
                     "sample": "one frame" if name == "vae" else "one backward flow field"})
        print(f"  {name:<12} {rows[-1]['samples_per_s']:>8} samples/s ({steps} steps x batch {section.batch} in "
              f"{seconds:.1f} s)", flush=True)
    return rows


def arch_row(arch: str, params: Params, work: Path, *, steps: int) -> dict:
    """Train `arch` for `steps` steps on the workspace data and time the loop."""
    import dataclasses

    from pipeline.temporal_training import train_temporal

    params = dataclasses.replace(params, model=dataclasses.replace(params.model, arch=arch))
    report = train_temporal(params, steps=steps, checkpoint=work / f"{arch}.pt", report_dir=work / "reports" / arch)
    batch = params.train.batch
    seconds = float(report["run"]["train_seconds"])
    row = {"model": arch, "steps": report["steps"], "batch": batch, "train_seconds": seconds,
           "samples_per_s": round(report["steps"] * batch / seconds, 2) if seconds > 0 else None,
           "parameters": report["parameters"], "device": resolve_device(params.device).type,
           "sample": f"one clip of {report['clip_length']} frames"}
    if report.get("encoder"):
        row["encoder"] = report["encoder"].get("used")
    print(f"  {arch:<12} {row['samples_per_s']:>8} samples/s ({report['steps']} steps x batch {batch} in "
          f"{seconds:.1f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None, help="reuse/create the upstream outputs here")
    parser.add_argument("--steps", type=int, default=30, help="training steps per arch")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--set", action="append", default=[], help="param override KEY=VALUE for the workspace")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = args.workspace or Path(tmp) / "workspace"
        manifest = prepare_workspace(root, overrides=args.set)
        params = workspace_params(root)
        rows = vae_rows(params, Path(tmp), steps=args.steps)
        for arch in [a for a in args.archs.split(",") if a]:
            rows.append(arch_row(arch, params, Path(tmp), steps=args.steps))
    result = {"steps": args.steps, "torch_threads": torch.get_num_threads(),
              "load_avg_1min": round(os.getloadavg()[0], 2), "workspace": manifest,
              "data": {"videos": params.data.videos.train, "frames": params.data.frames,
                       "resolution": list(params.data.resolution)},
              "note": "samples/s = steps x batch / seconds of the training loop (start-up of the first step "
                      "included), the same for the VAEs (train_vae / train_flow_vae's own loops)",
              "rows": rows}
    print(f"wrote {save('train', result)}")


if __name__ == "__main__":
    main()
