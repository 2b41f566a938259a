"""The same inputs give the same bytes: a tiny `dvc repro` in two fresh directories records identical outputs."""
import os
import subprocess
import sys

import pytest
import yaml

from bench.common import copy_project
from helpers import tiny_params_dict

pytestmark = pytest.mark.slow


def repro(root):
    """A fresh tiny project at `root`, `dvc repro` there; returns its dvc.lock."""
    copy_project(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2", TORCH_HOME=str(root / ".torch_home"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"],
                [sys.executable, "-m", "dvc", "repro"]):
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return yaml.safe_load((root / "dvc.lock").read_text())


def outs(lock: dict) -> dict[str, str]:
    """path -> md5 of every output of every stage in a dvc.lock."""
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_two_fresh_runs_record_the_same_outputs(tmp_path):
    first, second = repro(tmp_path / "a"), repro(tmp_path / "b")
    a, b = outs(first), outs(second)
    assert a.keys() == b.keys() and len(a) > 20
    differ = sorted(path for path in a if a[path] != b[path])
    assert not differ, f"outputs that differ between two runs of the same inputs: {differ}"
    assert first == second  # deps, params and outs: the whole lock
