"""Peak memory of extract and VAE training as the dataset grows (1x, 2x, 4x the default videos).

Memory must stay flat: both stream videos/batches from disk. Each stage runs in its own process
in a temporary copy of the repo; the peak is the larger of that process's and its workers' max RSS.
Usage: python bench/bench_memory.py [--scales 1 2 4] [--train-steps 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_project, save, set_params  # noqa: E402

def peak_mb(module: str, cwd: Path) -> float:
    """Run `python -m module` in cwd and return its peak RSS in MB."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(cwd))  # peak.py's sys.path[0] is bench/, not cwd
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("peak.py")), module], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    kb = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK_KB")))
    return kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--train-steps", type=int, default=60)
    args = parser.parse_args()
    import yaml
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    rows = []
    for scale in args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            copy_project(root)
            videos = {k: v * scale for k, v in base["data"]["videos"].items()}
            set_params(root / "params.yaml", [f"data.videos.{k}={v}" for k, v in videos.items()]
                       + [f"vae.steps={args.train_steps}"])
            peak_mb("pipeline.stages.download", root)
            extract_mb = peak_mb("pipeline.stages.extract", root)
            train_mb = peak_mb("pipeline.stages.train_vae", root)
            size_mb = (root / "data" / "frames.h5").stat().st_size / 2**20
        rows.append({"scale": scale, "videos": videos, "frames_h5_mb": round(size_mb, 1),
                     "extract_peak_mb": round(extract_mb), "train_vae_peak_mb": round(train_mb)})
        print(f"x{scale}: frames.h5 {size_mb:.0f} MB, extract peak {extract_mb:.0f} MB, "
              f"train_vae peak {train_mb:.0f} MB")
    first, last = rows[0], rows[-1]
    result = {"rows": rows,
              "extract_growth": round(last["extract_peak_mb"] / first["extract_peak_mb"], 3),
              "train_vae_growth": round(last["train_vae_peak_mb"] / first["train_vae_peak_mb"], 3),
              "data_growth": round(last["frames_h5_mb"] / first["frames_h5_mb"], 3)}
    print(f"data grew x{result['data_growth']}; peak memory grew x{result['extract_growth']} (extract), "
          f"x{result['train_vae_growth']} (train_vae); flat means close to 1")
    print(f"wrote {save('memory', result)}")


if __name__ == "__main__":
    main()
