"""Wall time of the default `dvc repro` (every stage) in a fresh copy of the repo, and of a no-op re-run.

Usage: python bench/bench_pipeline.py [--set KEY=VALUE ...]   (e.g. --set data.videos.train=96)
       python bench/bench_pipeline.py --clone                 # a `git clone` of HEAD, as a new user gets it
       python bench/bench_pipeline.py --clone --name NAME     # writes bench/results/pipeline_NAME.json

With --clone (no overrides) the run is also the reproducibility check: after `dvc repro` in the clone,
`git status --short dvc.lock` must print nothing, i.e. every output hashes as the committed dvc.lock says;
the result records that output and, per stage, the outputs whose md5 differ.

Before and after the runs it times one default train_temporal step on random inputs (bench/speed_probe.py,
the workspace's params.yaml) and records the repro's wall time in those steps: a change of the pipeline moves
that ratio, a slower machine moves the probe and the wall time together.
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

from bench.common import REPO, copy_project, save, set_params  # noqa: E402
from bench.speed_probe import probe_step_seconds  # noqa: E402


def run_timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str, dict[str, float]]:
    """Run CMD: (wall seconds, output, {stage: seconds from its 'Running stage' line to the next or the end})."""
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    lines: list[str] = []
    env = dict(env, PYTHONUNBUFFERED="1")  # lines arrive when printed, so their arrival times the stages
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"Running stage '(\w+)'", line)
            if found:
                marks.append((found.group(1), time.perf_counter()))
    seconds = time.perf_counter() - start
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-6000:]}")
    ends = [t for _, t in marks[1:]] + [start + seconds]
    return seconds, out, {name: round(end - begin, 1) for (name, begin), end in zip(marks, ends)}


def dvc(args: list[str], cwd: Path, env: dict) -> tuple[float, str, dict[str, float]]:
    """Run `dvc ARGS` with run_timed."""
    return run_timed([sys.executable, "-m", "dvc", *args], cwd, env)


def lock_outs(lock_text: str) -> dict[str, str]:
    """{stage/out path: md5} of every out and metric of a dvc.lock."""
    import yaml

    lock = yaml.safe_load(lock_text)
    return {f"{stage}/{out['path']}": out.get("md5", "") for stage, entry in lock["stages"].items()
            for out in entry.get("outs", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="param override KEY=VALUE, e.g. data.videos.train=96")
    parser.add_argument("--clone", action="store_true", help="git clone HEAD instead of copying the working tree, "
                                                             "and check dvc.lock afterwards")
    parser.add_argument("--name", default="", help="results name: bench/results/pipeline_<name>.json "
                                                      "(e.g. for a run on another machine type)")
    args = parser.parse_args()
    if args.clone and args.set:
        raise SystemExit("--clone checks the committed dvc.lock: it takes no --set overrides")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    from pipeline.config import load_params

    probe_params = load_params(REPO / "params.yaml")
    probe_before = probe_step_seconds(probe_params)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        if args.clone:
            subprocess.run(["git", "clone", "-q", str(REPO), str(root)], env=env, check=True)
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        else:
            copy_project(root)
            set_params(root / "params.yaml", args.set)
            for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
                subprocess.run(cmd, cwd=root, env=env, check=True)
            head = None
        committed = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None
        full_s, out, stage_s = dvc(["repro"], root, env)
        stages = list(stage_s)
        noop_s, _, _ = dvc(["repro"], root, env)
        metrics = json.loads((root / "reports" / "metrics.json").read_text())
        check = None
        if args.clone:
            status = subprocess.run(["git", "status", "--short", "dvc.lock"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout.strip()
            before, after = lock_outs(committed or "stages: {}"), lock_outs((root / "dvc.lock").read_text())
            check = {"commit": head, "git_status_dvc_lock": status, "identical": status == "",
                     "outs_differing": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}
    probe_after = probe_step_seconds(probe_params)
    probe_s = (probe_before["step_s"] + probe_after["step_s"]) / 2
    probe = {"before": probe_before, "after": probe_after, "repro_in_probe_steps": round(full_s / probe_s)}
    result = {"overrides": args.set, "source": "git clone of HEAD" if args.clone else "copy of the working tree",
              "repro_s": round(full_s, 1), "noop_repro_s": round(noop_s, 2), "stages_run": stages,
              "stage_s": stage_s,
              "metrics": metrics, "lock_check": check,
              "speed_probe": probe}
    print(f"dvc repro (all {len(stages)} stages): {full_s / 60:.1f} min; no-op dvc repro: {noop_s:.1f} s")
    print(f"speed probe: {probe_before['step_s'] * 1000:.0f} ms per train_temporal step before, "
          f"{probe_after['step_s'] * 1000:.0f} after; the repro took {probe['repro_in_probe_steps']} probe steps")
    print("per stage (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in stage_s.items()))
    if check is not None:
        print(f"git status --short dvc.lock: {check['git_status_dvc_lock'] or '(nothing)'}; "
              f"outs differing: {check['outs_differing'] or 'none'}")
    print(f"wrote {save('pipeline', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
