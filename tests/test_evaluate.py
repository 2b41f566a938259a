"""infer + evaluate on tiny HDF5 files with a small real contract model: files, keys, baselines, figures."""
from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import params_from_dict
from pipeline.data.datasets import ClipDataset
from pipeline.evaluation import evaluate, write_plot_tables
from pipeline.inference import InferenceSettings, copy_last, flow_extrapolation, run_inference
from pipeline.models.vae import VAE, VAEConfig
from test_ttt import ToyTemporal

METHOD_KEYS = {"psnr", "ssim", "lpips", "psnr_step1", "ssim_step1"}


def write_tiny_data(tmp_path, *, N=3, T=8, H=32, W=32):
    """frames.h5 and flow.h5 (test split only, the formats of docs/ARCHITECTURE.md) with moving squares."""
    rng = np.random.default_rng(0)
    video = (rng.random((N, T, H, W, 3)) * 40).astype(np.uint8)
    bwd = np.zeros((N, T - 1, 2, H, W), np.float16)
    for n in range(N):
        for t in range(T):
            video[n, t, 8 + n:16 + n, 2 + 2 * t:10 + 2 * t] = (220, 60 + 40 * n, 30)
        bwd[n, :, 0] = -2.0  # everything moved 2 px right: frame t+1 samples frame t at x - 2
    collision = np.zeros((N, T), np.uint8)
    collision[0, 5] = 1
    frames_h5, flow_h5 = tmp_path / "frames.h5", tmp_path / "flow.h5"
    with h5py.File(frames_h5, "w") as f:
        g = f.create_group("test")
        g["video"] = video
        g["collision"] = collision
        g["boxes"] = np.zeros((N, T, 2, 4), np.float32)
        g["box_mask"] = np.zeros((N, T, 2), np.uint8)
        g["video_index"] = np.arange(10000, 10000 + N, dtype=np.int64)
    with h5py.File(flow_h5, "w") as f:
        g = f.create_group("test")
        g["bwd"] = bwd
        g["fwd"] = -bwd
        g["occ"] = np.full((N, T - 1, H, W), 255, np.uint8)
    return frames_h5, flow_h5, video


def tiny_settings(**kw):
    base = dict(context=3, horizon=4, batch=2, ttt_enabled=True, ttt_steps=2, ttt_lr=1e-3, ttt_params="flow_head",
                ttt_loss="full", ttt_grad_clip=1.0)
    return InferenceSettings(**{**base, **kw})


def run_tiny_infer(tmp_path, settings, model=None):
    frames_h5, flow_h5, video = write_tiny_data(tmp_path)
    torch.manual_seed(0)
    model = model or ToyTemporal(context=2)
    vae = VAE(VAEConfig(hidden=8, latent_channels=2, downsample=4, min_channels=8))
    dataset = ClipDataset(frames_h5, "test", settings.context + settings.horizon, flow_h5=flow_h5,
                          first_window_only=True)
    pred_h5 = tmp_path / "predictions.h5"
    summary = run_inference(model=model, vae=vae, dataset=dataset, out_path=pred_h5, settings=settings,
                            arch="toy", log=lambda s: None)
    return frames_h5, pred_h5, summary, video, model


def test_baselines_on_known_motion():
    frames = torch.rand(1, 6, 3, 16, 16)
    ro, s1 = copy_last(frames, context=3, horizon=3)
    assert torch.equal(ro[:, 2], frames[:, 2]) and torch.equal(s1[:, 1], frames[:, 3])
    # a field moving 1 px right: the extrapolation shifts the last context frame by 1, 2, 3 px
    base = torch.zeros(1, 1, 3, 16, 16)
    base[..., 5:9, 3:6] = 1.0
    clip = torch.cat([torch.roll(base, t, dims=-1) for t in range(6)], dim=1)  # [1,6,3,16,16]
    bwd = torch.zeros(1, 5, 2, 16, 16)
    bwd[:, :, 0] = -1.0
    ro, s1 = flow_extrapolation(clip, bwd, context=3, horizon=3)
    torch.testing.assert_close(ro[0, :, :, :, 4:15], clip[0, 3:6, :, :, 4:15])
    torch.testing.assert_close(s1[0, :, :, :, 4:15], clip[0, 3:6, :, :, 4:15])


def test_flow_extrapolation_uses_no_future_flow():
    frames = torch.rand(1, 7, 3, 16, 16)
    bwd = torch.zeros(1, 6, 2, 16, 16)
    bwd[:, 3:] = float("nan")  # flows touching frames >= 4 (the horizon of context=4)
    ro, _ = flow_extrapolation(frames, bwd, context=4, horizon=3)
    assert torch.isfinite(ro).all()


def test_infer_writes_all_methods(tmp_path):
    frames_h5, pred_h5, summary, video, model = run_tiny_infer(tmp_path, tiny_settings())
    assert summary["methods"] == ["model", "model_ttt", "copy_last", "flow_extrap", "vae_ceiling"]
    with h5py.File(pred_h5) as f:
        assert f["model/rollout"].shape == (3, 4, 32, 32, 3) and f["model/rollout"].dtype == np.uint8
        assert f["model_ttt/step1"].shape == (3, 4, 32, 32, 3)
        assert f["model/collision"].shape == (3, 4)
        np.testing.assert_array_equal(f["copy_last/rollout"][:, 2], video[:, 2])
        np.testing.assert_array_equal(f["copy_last/step1"][:, 1], video[:, 3])
        timing = json.loads(f.attrs["timing"])
        assert timing["fps_model"] > 0 and timing["fps_model_ttt"] > 0
        ttt = json.loads(f.attrs["ttt"])
        assert ttt["supported"] and ttt["loss_before_mean"] is not None
        assert f["model_ttt/ttt_loss_after"][:].max() <= f["model_ttt/ttt_loss_before"][:].max() + 1e-6
    # the rollout saw model.context frames, TTT the eval.context frames, 1-step windows model.context frames
    assert set(model.seen_lengths) == {2, 3}
    assert not list(tmp_path.glob(".predictions.h5.tmp*"))


def test_infer_without_ttt_support_skips_and_says_so(tmp_path):
    _, pred_h5, summary, _, _ = run_tiny_infer(tmp_path, tiny_settings(), model=ToyTemporal(flow_head=False))
    assert "model_ttt" not in summary["methods"]
    assert "no parameters" in summary["ttt"]["reason"]
    with h5py.File(pred_h5) as f:
        assert "model_ttt" not in f


def test_infer_model_ttt_equals_model_with_zero_steps(tmp_path):
    _, pred_h5, _, _, _ = run_tiny_infer(tmp_path, tiny_settings(ttt_steps=0))
    with h5py.File(pred_h5) as f:
        np.testing.assert_array_equal(f["model/rollout"][:], f["model_ttt/rollout"][:])


@pytest.fixture
def eval_params(tmp_path, tiny_params_dict_fixture):
    d = tiny_params_dict_fixture
    d["paths"] = {k: str(tmp_path / v) for k, v in d["paths"].items()}
    d["paths"]["frames"] = str(tmp_path / "frames.h5")
    d["paths"]["predictions"] = str(tmp_path / "predictions.h5")
    d["device"] = "cpu"
    d["eval"]["figures"] = 2
    return params_from_dict(d)


def test_evaluate_writes_documented_metrics(tmp_path, eval_params, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no backbone: LPIPS must be null
    run_tiny_infer(tmp_path, tiny_settings())
    metrics = evaluate(eval_params, log=lambda s: None)
    on_disk = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    for m in ("model", "model_ttt", "copy_last", "flow_extrap", "vae_ceiling"):
        assert set(metrics[m]) == METHOD_KEYS
        assert metrics[m]["lpips"] is None
        assert 0 < metrics[m]["psnr"] <= 100 and -1 <= metrics[m]["ssim"] <= 1
    assert "backbone weights not found" in metrics["lpips_note"]
    assert set(metrics["collision"]) == {"ap", "f1"} and 0 <= metrics["collision"]["ap"] <= 1
    assert metrics["arch"] == "toy"
    assert metrics["ttt_gain_psnr"] == pytest.approx(metrics["model_ttt"]["psnr"] - metrics["model"]["psnr"],
                                                     abs=1e-4)
    # the VAE ceiling is a reconstruction: its rollout and 1-step scores coincide
    assert metrics["vae_ceiling"]["psnr"] == metrics["vae_ceiling"]["psnr_step1"]
    # the known 2 px/frame motion makes flow extrapolation beat copying the last frame
    assert metrics["flow_extrap"]["psnr"] > metrics["copy_last"]["psnr"] + 3
    reports = tmp_path / "reports"
    psnr_rows = (reports / "plots" / "psnr.tsv").read_text().splitlines()
    assert psnr_rows[0] == "step\tpsnr\tmethod" and len(psnr_rows) == 1 + 5 * 4
    assert (reports / "plots" / "lpips.tsv").read_text().splitlines() == ["step\tlpips\tmethod"]
    for name in ("psnr.png", "ssim.png", "lpips.png"):
        assert (reports / "plots" / name).stat().st_size > 1000
    figures = sorted(p.name for p in (reports / "figures").iterdir())
    assert figures == ["video_10000.gif", "video_10000.png", "video_10001.gif", "video_10001.png"]
    details = json.loads((reports / "evaluate" / "details.json").read_text())
    assert len(details["per_step"]["model"]["psnr"]) == 4


def test_evaluate_computes_lpips_with_a_cached_backbone(tmp_path, eval_params, monkeypatch):
    import torchvision

    from pipeline.metrics import lpips_backbone_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    metrics = evaluate(eval_params, log=lambda s: None)
    assert "lpips_note" not in metrics
    assert metrics["model_ttt"]["psnr"] is None and metrics["ttt_gain_psnr"] is None
    assert metrics["ttt_note"] == "ttt.enabled is false"
    for m in ("model", "copy_last", "flow_extrap", "vae_ceiling"):
        assert metrics[m]["lpips"] is not None and metrics[m]["lpips"] >= 0
    rows = (tmp_path / "reports" / "plots" / "lpips.tsv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 4


def test_evaluate_refuses_predictions_for_other_videos(tmp_path, eval_params):
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    with h5py.File(tmp_path / "frames.h5", "a") as f:
        f["test/video_index"][0] = 42
    with pytest.raises(ValueError, match="other test videos"):
        evaluate(eval_params, log=lambda s: None)
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_plot_tables_long_format(tmp_path):
    details = {"per_step": {"model": {"psnr": [30.0, 28.5], "ssim": [0.9, 0.8]},
                            "copy_last": {"psnr": [25.0, None], "ssim": [0.7, 0.6]}}}
    write_plot_tables(details, tmp_path)
    assert (tmp_path / "psnr.tsv").read_text().splitlines() == [
        "step\tpsnr\tmethod", "1\t30.0\tmodel", "2\t28.5\tmodel", "1\t25.0\tcopy_last"]


def test_inference_settings_from_params(tiny_params):
    s = InferenceSettings.from_params(tiny_params)
    assert (s.context, s.horizon, s.ttt_steps) == (tiny_params.eval.context, tiny_params.eval.horizon,
                                                   tiny_params.ttt.steps)
    assert dataclasses.asdict(s)["ttt_grad_clip"] == tiny_params.ttt.grad_clip


def test_pr_tiny_params_are_valid(tmp_path):
    from pipeline.config import load_params
    from pipeline.pr_report import TINY_PARAMS, apply_tiny

    target = tmp_path / "params.yaml"
    target.write_text((repo_root() / "params.yaml").read_text())
    assert apply_tiny(target) == []
    params = load_params(target)
    assert params.data.videos.test == TINY_PARAMS["data"]["videos"]["test"] and params.flow.backend == "dis"
    # keys an older params.yaml lacks are skipped, not added (it would reject them)
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  context: 6\n")
    skipped = apply_tiny(old)
    assert "eval.batch" in skipped and "data" in skipped
    assert yaml_load(old) == {"eval": {"context": 4}}


def test_pr_report_markdown(tmp_path, monkeypatch):
    import subprocess

    from pipeline.pr_report import main

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: 'true'\n    params: [eval]\n"
                                       "    metrics:\n      - reports/metrics.json:\n          cache: false\n")
    (tmp_path / "reports").mkdir()
    base = {"arch": "warp_occ", "model": {"psnr": 20.0, "ssim": 0.8, "lpips": None, "psnr_step1": 22.0,
                                          "ssim_step1": 0.85},
            "collision": {"ap": 0.5, "f1": 0.4}, "ttt_gain_psnr": 0.1}
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(base))
    (tmp_path / "params.yaml").write_text("eval:\n  horizon: 10\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    head = json.loads(json.dumps(base))
    head["model"]["psnr"] = 21.5
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(head))
    (tmp_path / "params.yaml").write_text("eval:\n  horizon: 12\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pr.md"
    assert main(["--base", "main", "--output", str(out)]) == 0
    text = out.read_text()
    assert "| model | 21.5000 (+1.5000) | 0.8000 |" in text
    assert "eval.horizon" in text and "12" in text
    assert "collision AP: 0.5000" in text
    assert main(["--base", "no-such-rev", "--output", str(out)]) == 1


def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
