"""End to end: `dvc repro` of the whole DAG with tiny params in a temporary git repo, then the
experiment workflow users rely on (`dvc exp run -S model.arch=X` re-runs only what follows)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from bench.common import copy_project
from helpers import tiny_params_dict

pytestmark = pytest.mark.slow

STAGES = ["pretrained", "download", "extract", "flow", "train_vae", "train_flow_vae", "encode", "train_temporal",
          "infer", "evaluate", "control"]
UPSTREAM = ["download", "extract", "flow", "train_vae", "train_flow_vae", "encode"]
ARCHS = ["clip_lstm", "latent", "latent_flow", "warp_occ", "dual_vae"]


def run(cmd, cwd, env=None):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w]+)'", output))


def changed_stages(status: str) -> set[str]:
    """Stage names `dvc status` lists as changed; pretrained is always listed (always_changed: it looks at the
    hub cache and the network every run, and its outputs hash the same when nothing new is there)."""
    return set(re.findall(r"^(\w+):", status, flags=re.M)) - {"pretrained"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with tiny params in its own git repo, after one `dvc repro` (committed)."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2", TORCH_HOME=str(root / ".torch_home"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny"], root, env)
    out = run([sys.executable, "-m", "dvc", "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    return root, env, out


def test_repro_runs_every_stage_then_is_cached(project):
    root, env, out = project
    assert ran_stages(out) == set(STAGES), out[-3000:]
    for rel in ("data/frames.h5", "data/flow.h5", "data/latents.h5", "data/predictions.h5", "models/vae.pt",
                "models/flow_vae.pt", "models/temporal.pt", "dvc.lock"):
        assert (root / rel).is_file(), rel
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for method in ("model", "copy_last", "flow_extrap", "flow_advect", "vae_recon"):
        assert set(metrics[method]) >= {"psnr", "ssim", "lpips", "psnr_step1", "ssim_step1"}
    assert metrics["arch"] == "warp_occ" and "collision" in metrics
    control = json.loads((root / "reports/control/metrics.json").read_text())
    assert control["applies"] is False and "dual_vae" in control["reason"]  # the stage runs, says why it is idle
    flow_report = json.loads((root / "reports/flow/metrics.json").read_text())
    assert flow_report["backend_used"] == "dis"
    again = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert ran_stages(again) <= {"pretrained"}, again
    assert all(f"Stage '{stage}' didn't change" in again for stage in STAGES[1:]), again
    status = run([sys.executable, "-m", "dvc", "status"], root, env)
    assert changed_stages(status) == set(), status
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], root, env)
    assert "reports/metrics.json" in shown


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "warp_occ"])
def test_exp_run_reruns_only_temporal_and_after(project, arch):
    root, env, _ = project
    run(["git", "add", "-A"], root, env)  # an earlier exp run leaves its params and outputs in the workspace
    run(["git", "commit", "-qm", f"before {arch}", "--allow-empty"], root, env)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", f"model.arch={arch}"], root, env)
    # pretrained re-checks the weights model.arch needs (seconds); from the data only what follows the model runs
    assert ran_stages(out) - {"pretrained"} == {"train_temporal", "infer", "evaluate", "control"}, out[-3000:]
    assert all(f"Stage '{stage}' didn't change" in out for stage in UPSTREAM), out[-3000:]
    control = json.loads((root / "reports/control/metrics.json").read_text())
    assert control["applies"] is (arch == "dual_vae"), control
    if arch == "dual_vae":  # motion transfer, animating a still and the leakage probes ran on the trained model
        assert set(control["methods"]) >= {"transfer", "still", "constant", "copy_b", "zero_flow"}
        assert set(control["leakage"]["predicted"]) == {"flow_from_appearance", "colour_from_motion",
                                                        "flow_from_motion", "colour_from_appearance"}
        assert sorted(f.suffix for f in (root / "reports/control/figures").iterdir()) == [".gif", ".png"]
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--md", "--no-pager"], root, env)
    assert arch in shown


def test_queued_experiments_fan_out(project):
    root, env, _ = project
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "before queue", "--allow-empty"], root, env)
    for lr in ("0.002", "0.0005"):
        run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}", "-n", f"lr-{lr}"], root, env)
    run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], root, env)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run([sys.executable, "-m", "dvc", "queue", "status"], root, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    assert "Failed" not in status, status
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--md", "--no-pager"], root, env)
    assert "lr-0.002" in shown and "lr-0.0005" in shown, shown


def test_push_pull_through_a_local_remote(project, tmp_path):
    root, env, _ = project
    remote = tmp_path / "remote"
    run([sys.executable, "-m", "dvc", "remote", "add", "-f", "-d", "localremote", str(remote)], root, env)
    run([sys.executable, "-m", "dvc", "checkout", "-f"], root, env)
    run([sys.executable, "-m", "dvc", "push"], root, env)
    assert any(remote.rglob("*")), "nothing was pushed"
    shutil.rmtree(root / ".dvc" / "cache")
    for rel in ("data/frames.h5", "data/flow.h5", "models/temporal.pt"):
        (root / rel).unlink()
    shutil.rmtree(root / "data" / "raw")
    run([sys.executable, "-m", "dvc", "pull"], root, env)
    assert (root / "models/temporal.pt").is_file() and (root / "data/raw").is_dir()
    status = run([sys.executable, "-m", "dvc", "status"], root, env)
    assert changed_stages(status) == set(), status
