"""The pretrained stage in a DVC project: weights that appear re-run exactly what uses them, and DVC says so.

A real mirror serves torchvision's own files, whose names carry a prefix of their sha256; a test cannot
forge those, so here weights "become reachable" through the torch hub cache (the stage's first source),
and the download path itself (mirror, hash refusal, cut transfers, timeouts) is tests/test_pretrained.py's.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from bench.common import copy_project
from helpers import override, tiny_params_dict
from pipeline.pretrained import hub_path

pytestmark = pytest.mark.slow


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def dvc(args, root, env):
    return run([sys.executable, "-m", "dvc", *args], root, env)


def ran(output):
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project asking for RAFT (raft_small, 1 update on CPU), with an empty torch hub cache."""
    root = tmp_path_factory.mktemp("weights_project")
    copy_project(root)
    raw = override(tiny_params_dict(), {"flow": {"backend": "raft_small", "cpu_raft": "raft_small",
                                                 "cpu_num_updates": 1}, "weights": {"download": False}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    torch_home = root.parent / f"{root.name}_torch_home"
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2", TORCH_HOME=str(torch_home),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, root, env)
    return root, env, torch_home


def test_weights_that_appear_rerun_exactly_their_consumers(project):
    root, env, torch_home = project
    dvc(["repro"], root, env)
    flow = json.loads((root / "reports/flow/metrics.json").read_text())
    assert flow["backend_used"] == "dis" and flow["fallback"] == 1  # no weights anywhere: the recorded fallback
    manifest = json.loads((root / "models/pretrained/flow/manifest.json").read_text())
    assert [w["available"] for w in manifest["weights"]] == [False] and "disabled" in manifest["weights"][0]["reason"]
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["flow_fallback"] == 1 and metrics["lpips_computed"] == 0

    # RAFT and AlexNet weights appear in the torch hub cache (random ones: the stages run on them, the flow
    # and LPIPS values are meaningless)
    path = hub_path("raft_small", torch_home / "hub")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), path)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), hub_path("alex", torch_home / "hub"))
    out = dvc(["repro", "pretrained"], root, env)
    assert ran(out) == {"pretrained"}
    status = dvc(["status"], root, env)
    stale = set(re.findall(r"^(\w+):", status, flags=re.M)) - {"pretrained"}  # pretrained: always changed
    # DVC lists the stages whose own deps changed: the consumers of the new weights (control measures motion with
    # the flow stage's backend, so it reads RAFT's too)
    assert stale == {"flow", "evaluate", "control"}, status
    assert "models/pretrained/flow" in status and "models/pretrained/lpips" in status, status

    out = dvc(["repro"], root, env)
    # new flow: everything after flow re-runs; the stages before it and the VAE on frames do not
    assert {"flow", "train_flow_vae", "encode", "train_temporal", "infer", "evaluate", "control"} <= ran(out), out
    assert not ran(out) & {"download", "extract", "train_vae"}, out
    flow = json.loads((root / "reports/flow/metrics.json").read_text())
    assert flow["backend_used"] == "raft_small" and flow["fallback"] == 0
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["flow_fallback"] == 0 and metrics["lpips_computed"] == 1 and "lpips_note" not in metrics
    assert metrics["model"]["lpips"] is not None and metrics["model"]["lpips"] > 0


def test_weights_travel_with_dvc_push_and_pull(project, tmp_path):
    root, env, torch_home = project
    dvc(["repro"], root, env)
    remote = tmp_path / "remote"
    dvc(["remote", "add", "-f", "-d", "local", str(remote)], root, env)
    dvc(["push"], root, env)
    # another machine: no torch hub cache, no network; `dvc pull` brings the weights with the rest
    for p in (root / "models" / "pretrained").rglob("*.pth"):
        p.unlink()
    dvc(["pull", "pretrained"], root, env)
    manifest = json.loads((root / "models/pretrained/flow/manifest.json").read_text())
    for w in manifest["weights"]:
        present = (root / "models/pretrained/flow/hub/checkpoints" / w["file"]).is_file()
        assert present == w["available"]
