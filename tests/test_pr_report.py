"""The PR report: intervals, paired changes marked significant only when their interval excludes zero."""
from __future__ import annotations

import json
import subprocess

import numpy as np

from helpers import REPO
from pipeline.pr_report import apply_tiny, main, methods_table, paired_change
from pipeline.profiles import profile


def method(psnr, lo, hi, ssim=0.8):
    return {"psnr": psnr, "psnr_lo": lo, "psnr_hi": hi, "ssim": ssim, "ssim_lo": ssim - 0.01, "ssim_hi": ssim + 0.01,
            "lpips": None, "lpips_lo": None, "lpips_hi": None, "psnr_step1": 30.0, "psnr_step1_lo": 29.0,
            "psnr_step1_hi": 31.0, "ssim_step1": 0.9, "ssim_step1_lo": 0.89, "ssim_step1_hi": 0.91}


def per_video(psnr, ssim):
    return {"split": "test", "video_index": list(range(10000, 10000 + len(psnr))),
            "scores": {"model": {"psnr": list(psnr), "ssim": list(ssim), "psnr_step1": [30.0] * len(psnr),
                                 "ssim_step1": [0.9] * len(psnr)}}}


def test_tiny_params_are_valid(tmp_path):
    from pipeline.config import load_params

    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    assert apply_tiny(target) == []
    params = load_params(target)
    assert params.data.videos.test == profile("pr")["data"]["videos"]["test"] and params.flow.backend == "dis"
    # keys an older params.yaml lacks are skipped, not added (it would reject them)
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  context: 6\n")
    skipped = apply_tiny(old)
    assert "eval.batch" in skipped and "data" in skipped


def test_a_change_is_significant_only_when_its_paired_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base_psnr = 25 + rng.normal(0, 3, 32)
    ssim = 0.8 + rng.normal(0, 0.05, 32)
    base, head = per_video(base_psnr, ssim), per_video(base_psnr + 0.5, ssim + rng.normal(0, 0.01, 32))
    psnr_change = paired_change(head, base, "model", "psnr")
    assert psnr_change.excludes_zero and abs(psnr_change.mean - 0.5) < 1e-9
    assert not paired_change(head, base, "model", "ssim").excludes_zero
    # other videos: nothing to pair
    shifted = dict(head, video_index=[i + 1 for i in head["video_index"]])
    assert paired_change(shifted, base, "model", "psnr") is None
    table = methods_table({"model": method(25.5, 24.4, 26.6, ssim=0.801)}, {"model": method(25.0, 23.9, 26.1)},
                          per_video=head, base_per_video=base)
    row = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert "25.500 [24.40, 26.60] (**+0.500**" in row
    assert "n.s." in row  # the ssim change
    unpaired = methods_table({"model": method(25.5, 24.4, 26.6)}, {"model": method(25.0, 23.9, 26.1)})
    assert "(+0.500, unpaired)" in unpaired and "**" not in unpaired


def test_pr_report_markdown(tmp_path, monkeypatch):
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: 'true'\n    params: [eval]\n"
                                       "    metrics:\n      - reports/metrics.json:\n          cache: false\n")
    (tmp_path / "reports" / "evaluate").mkdir(parents=True)
    psnr = [20.0, 22.0, 19.0, 21.0]

    def write(metrics, scores):
        (tmp_path / "reports" / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / "reports" / "evaluate" / "per_video.json").write_text(json.dumps(scores))

    base = {"arch": "warp_occ", "split": "test", "videos": 4, "flow_backend": "dis", "model": method(20.5, 19.5, 21.5),
            "model_minus_copy_last": method(1.0, 0.5, 1.5), "collision": {"ap": 0.5, "ap_constant": 0.03}}
    write(base, per_video(psnr, [0.8] * 4))
    (tmp_path / "params.yaml").write_text("eval:\n  horizon: 10\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    head = json.loads(json.dumps(base))
    head["model"] = method(22.0, 21.0, 23.0)
    write(head, per_video([p + 1.5 for p in psnr], [0.8] * 4))
    (tmp_path / "params.yaml").write_text("eval:\n  horizon: 12\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pr.md"
    assert main(["--base", "main", "--output", str(out)]) == 0
    text = out.read_text()
    assert "| model | 22.000 [21.00, 23.00] (**+1.500** [+1.50, +1.50])" in text
    assert "| model − copy_last | 1.000 [0.50, 1.50] |" in text and "| yes |" in text
    assert "eval.horizon" in text and "12" in text
    assert "AP 0.500 vs constant 0.030" in text
    assert main(["--base", "no-such-rev", "--output", str(out)]) == 1
