"""Helpers shared by the benchmark scripts: machine description and result files."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU's model name and its vector extensions (avx*, amx*) from /proc/cpuinfo; None where unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {"name": None, "vector_flags": None}
    name, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and name is None and key in ("model name", "Model", "cpu model"):
            name = value.strip() or None
        if sep and flags is None and key in ("flags", "Features"):
            flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "sve", "asimd")))
    return {"name": name, "vector_flags": flags}


def machine() -> dict:
    """What the numbers were measured on.

    The CPU model and the vector ISA torch dispatches to are part of it: float training on another CPU
    type takes other MKL / oneDNN kernels, so its trained weights differ in the last bits (README
    "Reproducibility").
    """
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def save(name: str, result: dict, *, suffix: str = "") -> Path:
    """Write bench/results/<name>[_<suffix>].json with the machine and a timestamp."""
    name = f"{name}_{suffix}" if suffix else name
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def trained_temporal(base: Path, params) -> tuple[dict, torch.nn.Module]:
    """The run's temporal checkpoint (`base` / paths.temporal) and its model, in eval mode."""
    from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    from pipeline.models.temporal import rebuild_temporal

    path = base / params.paths.temporal
    ckpt = load_checkpoint(path, kind="temporal")
    return ckpt, model_from_checkpoint(ckpt, rebuild_temporal, path=path).eval()


def val_videos(base: Path, params, limit: int | None = None, *, split: str = "val") -> list[tuple[dict, dict, torch.Tensor]]:
    """(video, observed, truth) for the first `limit` videos of `split` (val unless told) of the run in `base`.

    video: the first window of each (a batch of one, flows included); observed: its first eval.context frames
    as a predictor may read them (pipeline.clips.clip_slice, observed=True); truth: the eval.horizon frames
    after them [1,Hz,3,H,W].
    """
    from pipeline.clips import clip_slice
    from pipeline.data.datasets import ClipDataset, split_group

    frames_h5 = base / params.paths.frames
    data = ClipDataset(frames_h5, split, split_group(frames_h5, split)[1], flow_h5=base / params.paths.flow,
                       first_window_only=True)
    C, Hz = params.eval.context, params.eval.horizon
    out = []
    for i in range(len(data) if limit is None else min(limit, len(data))):
        video = {k: v[None] for k, v in data[i].items()}
        out.append((video, clip_slice(video, 0, C, observed=True), video["frames"][:, C:C + Hz]))
    return out


def copy_project(dst: Path) -> None:
    """Copy what a clone of the working tree holds (tracked + untracked-not-ignored), without reports."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(("reports/", "bench/results/")) or not (REPO / rel).exists():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def parse_value(text: str):
    """A -S / --set value as YAML, except that 1e-3 is the number PyYAML's YAML 1.1 rules read as a string."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply KEY=VALUE overrides (dotted keys, YAML values) to a params mapping in place."""
    import yaml
    for item in overrides:
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"unknown param {key}")
        node[leaf] = parse_value(value)


def set_params(params_file: Path, overrides: list[str]) -> None:
    """Apply KEY=VALUE overrides to a params.yaml file."""
    import yaml
    params = yaml.safe_load(params_file.read_text())
    apply_overrides(params, overrides)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
