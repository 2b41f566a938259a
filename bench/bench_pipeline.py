"""Wall time of the default `dvc repro` (every stage) in a fresh copy of the repo, and of a no-op re-run.

Usage: python bench/bench_pipeline.py [--set KEY=VALUE ...]   (e.g. --set data.videos.train=96)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_project, save, set_params  # noqa: E402


def dvc(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", default=[], help="param override KEY=VALUE, e.g. data.videos.train=96")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        copy_project(root)
        env = dict(os.environ, DVC_NO_ANALYTICS="1")
        set_params(root / "params.yaml", args.set)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=root, env=env, check=True)
        full_s, out = dvc(["repro"], root, env)
        stages = re.findall(r"Running stage '(\w+)'", out)
        noop_s, _ = dvc(["repro"], root, env)
        metrics = json.loads((root / "reports" / "metrics.json").read_text())
    result = {"overrides": args.set, "repro_s": round(full_s, 1), "noop_repro_s": round(noop_s, 2),
              "stages_run": stages, "metrics": metrics}
    print(f"dvc repro (all {len(stages)} stages): {full_s / 60:.1f} min; no-op dvc repro: {noop_s:.1f} s")
    print(f"wrote {save('pipeline', result)}")


if __name__ == "__main__":
    main()
