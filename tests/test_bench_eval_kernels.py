"""bench/bench_eval_kernels.py: its conv2d reference is the SSIM it claims to compare against, the TTT comparison
reads a run's files and finds the two paths equal; run_all's table shows both rows."""
import dataclasses
import json

import torch

from bench import run_all
from bench.bench_eval_kernels import bench_ssim, bench_ttt, ssim_conv2d
from helpers import write_clip_files
from pipeline.checkpoint import make_checkpoint, save_checkpoint
from pipeline.metrics import ssim
from pipeline.models.temporal import build_temporal
from test_metrics import skimage_ssim


def test_conv2d_reference_is_skimage_ssim_and_matches_ours():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 3, 24, 20, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ref = ssim_conv2d(a, b)
    assert ref.shape == (2, 3)
    assert float(ref[1, 2]) == float(ssim(a, b)[1, 2])
    assert abs(float(ref[1, 2]) - skimage_ssim(a[1, 2], b[1, 2])) < 1e-4
    result = bench_ssim((16, 16), repeats=1)
    assert result["shape"] == [64, 10, 3, 16, 16] and result["max_abs_diff"] == 0.0 and result["ours_s"] > 0


def test_ttt_comparison_on_a_saved_run(tiny_params, tmp_path):
    """The flow-head TTT step through ttt_objective gives ttt_loss's losses exactly, on a run's files."""
    p = tiny_params
    frames_h5, flow_h5, _ = write_clip_files(tmp_path, splits=("test",), N=2, T=8)
    torch.manual_seed(0)
    model = build_temporal("warp_occ", model=p.model, loss=p.loss, frame_size=(32, 32), num_boxes=2).eval()
    with torch.no_grad():  # a model whose heads are not at their initial zeros
        for q in model.trainable_parameters():
            q.add_(0.01 * torch.randn_like(q))
    save_checkpoint(tmp_path / "temporal.pt", make_checkpoint(kind="temporal", model=model,
                                                              model_args=model.model_args(), arch=model.arch))
    paths = dataclasses.replace(p.paths, frames=str(frames_h5), flow=str(flow_h5), temporal="temporal.pt")
    params = dataclasses.replace(p, paths=paths, eval=dataclasses.replace(p.eval, split="test"))
    result = bench_ttt(tmp_path, params, videos=2, repeats=1)
    assert result["videos"] == 2 and result["steps_per_video"] == params.ttt.steps
    assert result["max_abs_loss_diff"] == 0.0 and result["ttt_objective_ms_per_step"] > 0


def test_table_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    r = {"ssim": {"shape": [64, 10, 3, 64, 64], "conv2d_s": 2.8, "ours_s": 0.25, "ratio_conv2d_over_ours": 11.2,
                  "max_abs_diff": 0.0},
         "ttt": {"ttt_params": "flow_head", "ttt_loss_ms_per_step": 90.0, "ttt_objective_ms_per_step": 60.0,
                 "ratio_loss_over_objective": 1.5, "max_abs_loss_diff": 0.0}}
    (tmp_path / "eval_kernels.json").write_text(json.dumps(r))
    rows = [line for line in run_all.write_table({}, []).read_text().splitlines() if line.startswith("| eval_kernels")]
    assert len(rows) == 2 and "ratio 11.20" in rows[0] and "ratio 1.50" in rows[1]
