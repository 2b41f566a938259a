"""bench/sweep.py chooses defaults on val only: it refuses the test split, on the command line and as a call."""
import subprocess
import sys

import pytest

from bench.sweep import parse_grid, stages_to_run, sweep
from helpers import REPO


def test_sweep_refuses_the_test_split_on_the_command_line():
    result = subprocess.run([sys.executable, "bench/sweep.py", "--split", "test", "-S", "ttt.steps=1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--split test: sweeps choose defaults and read only the val split" in result.stderr


def test_sweep_refuses_the_test_split_as_a_call(tmp_path):
    with pytest.raises(SystemExit, match="must not read the test split"):
        sweep({"ttt.steps": [1]}, base=tmp_path, split="test")


def test_sweep_runs_only_what_a_change_reaches_and_parses_values_as_params_yaml_would():
    assert stages_to_run(["ttt.steps"]) == ["infer", "evaluate"]
    assert stages_to_run(["model.mask"]) == ["train_temporal", "infer", "evaluate", "control"]
    grid = parse_grid(["ttt.lr=1e-3,0.01", "ttt.loss=warp", "ttt.enabled=false", "ttt.steps=5"])
    assert grid == {"ttt.lr": [0.001, 0.01], "ttt.loss": ["warp"], "ttt.enabled": [False], "ttt.steps": [5]}
    assert isinstance(grid["ttt.steps"][0], int)
    with pytest.raises(SystemExit, match="sweeping the data itself"):
        stages_to_run(["data.videos"])
