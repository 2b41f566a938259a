"""infer + evaluate on tiny HDF5 files with a small real contract model: files, keys, baselines, leaks, figures."""
from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch

from helpers import ToyTemporal, write_clip_files
from pipeline.baselines import copy_last, flow_advection, flow_extrapolation
from pipeline.config import params_from_dict
from pipeline.data.datasets import ClipDataset
from pipeline.evaluation import SCORES, evaluate, write_plot_tables
from pipeline.inference import InferenceSettings, run_inference
from pipeline.metrics import average_precision
from pipeline.models.vae import VAE, VAEConfig

METHODS = ["model", "model_ttt", "copy_last", "flow_extrap", "flow_advect", "vae_recon"]
INTERVAL_KEYS = {f"{k}{suffix}" for k in SCORES for suffix in ("", "_lo", "_hi")}


def tiny_settings(**kw):
    base = dict(split="test", context=3, horizon=4, batch=2, ttt_enabled=True, ttt_steps=2, ttt_lr=1e-3,
                ttt_params="flow_head", ttt_loss="full", ttt_grad_clip=1.0)
    return InferenceSettings(**{**base, **kw})


class Poisoned(torch.utils.data.Dataset):
    """A dataset whose every frame after the context (and each flow or latent touching one) is NaN."""

    def __init__(self, dataset, context):
        self.dataset, self.context = dataset, context

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        C = self.context
        item["frames"] = item["frames"].clone()
        item["frames"][C:] = float("nan")
        for key in ("flow_bwd", "flow_fwd", "occ"):
            item[key] = item[key].clone()
            item[key][C - 1:] = float("nan")
        return item


def run_tiny_infer(tmp_path, settings, model=None, *, poison=False, teacher_forced=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    frames_h5, flow_h5, videos = write_clip_files(tmp_path)
    torch.manual_seed(0)
    model = model or ToyTemporal(context=2)
    vae = VAE(VAEConfig(hidden=8, latent_channels=2, downsample=4, min_channels=8))
    dataset = ClipDataset(frames_h5, "test", 8, flow_h5=flow_h5, first_window_only=True)
    if poison:
        dataset = Poisoned(dataset, settings.context)
    pred_h5 = tmp_path / "predictions.h5"
    summary = run_inference(model=model, vae=vae, dataset=dataset, out_path=pred_h5, settings=settings, arch="toy",
                            model_context=model.context, flow_backend="gt", teacher_forced=teacher_forced,
                            log=lambda s: None)
    return frames_h5, pred_h5, summary, videos["test"], model


def square_clip(L=7, size=16, speed=1):
    """One video of a bright square moving `speed` px right per frame, with its exact backward flow."""
    base = torch.zeros(1, 1, 3, size, size)
    base[..., 5:9, 3:6] = 1.0
    clip = torch.cat([torch.roll(base, speed * t, dims=-1) for t in range(L)], dim=1)  # [1,L,3,H,W]
    bwd = torch.zeros(1, L - 1, 2, size, size)
    bwd[:, :, 0] = -speed
    return clip, bwd


def test_baselines_on_known_motion():
    clip, bwd = square_clip()
    observed = {"frames": clip[:, :3], "flow_bwd": bwd[:, :2]}
    ro = copy_last(observed, 3)
    assert ro.shape == (1, 3, 3, 16, 16) and torch.equal(ro[:, 2], clip[:, 2])
    # a field moving 1 px right: the extrapolation shifts the last context frame by 1, 2, 3 px
    torch.testing.assert_close(flow_extrapolation(observed, 3)[0, :, :, :, 4:15], clip[0, 3:6, :, :, 4:15])


def test_flow_advection_carries_the_motion_with_the_object():
    clip, _ = square_clip(L=8, size=24, speed=2)
    bwd = torch.zeros(1, 7, 2, 24, 24)
    moving = clip[0, :, 0] > 0.5  # [L,H,W] where the square is
    bwd[0, :, 0][moving[1:]] = -2.0  # only the square moves: the flow lives on it
    observed = {"frames": clip[:, :3], "flow_bwd": bwd[:, :2]}
    advected = flow_advection(observed, 4)
    extrapolated = flow_extrapolation(observed, 4)
    for k in range(4):
        truth = clip[0, 3 + k]
        # the square is where it will be, whole, at every step (the fixed field loses it after one)
        torch.testing.assert_close(advected[0, k][:, moving[3 + k]], truth[:, moving[3 + k]])
        if k >= 1:
            assert (extrapolated[0, k] - truth).abs()[:, moving[3 + k]].mean() > 0.2
    # what it vacates (a hole nothing moved into) keeps the last frame's pixel: nothing is inpainted
    hole = moving[2] & ~moving[3]
    torch.testing.assert_close(advected[0, 0][:, hole], clip[0, 2][:, hole])


def test_infer_writes_every_method(tmp_path):
    _, pred_h5, summary, video, model = run_tiny_infer(tmp_path, tiny_settings())
    assert summary["methods"] == METHODS
    with h5py.File(pred_h5) as f:
        assert f["model/rollout"].shape == (3, 4, 32, 32, 3) and f["model/rollout"].dtype == np.uint8
        assert f["model_ttt/step1"].shape == (3, 4, 32, 32, 3)
        assert f["model/collision"].shape == (3, 4)
        assert f["model/collision_teacher"].shape == (3, 8 - 2)  # frames 2..7 have 2 frames of history
        np.testing.assert_array_equal(f["copy_last/rollout"][:, 2], video[:, 2])
        np.testing.assert_array_equal(f["copy_last/step1"][:, 1], video[:, 3])
        assert f.attrs["split"] == "test" and f.attrs["frames"] == 8 and f.attrs["flow_backend"] == "gt"
        assert "timing" not in f.attrs  # nothing time-dependent inside a DVC output
        ttt = json.loads(f.attrs["ttt"])
        assert ttt["supported"] and ttt["loss_before_mean"] is not None
    assert summary["frames_per_second"]["model"] > 0 and summary["frames_per_second"]["model_ttt"] > 0
    # rollouts see model.context frames, TTT the eval.context ones
    assert set(model.seen_lengths) == {2, 3}
    assert not list(tmp_path.glob(".predictions.h5.tmp*"))


def test_rollouts_never_read_a_frame_they_predict(tmp_path):
    """Every frame after the context is NaN: every rollout (TTT included) is finite and unchanged."""
    settings = tiny_settings(ttt_steps=3, ttt_params="all")
    _, clean_h5, _, _, _ = run_tiny_infer(tmp_path / "clean", settings, teacher_forced=False)
    _, pred_h5, summary, _, model = run_tiny_infer(tmp_path / "poisoned", settings, poison=True,
                                                   teacher_forced=False)
    assert not model.saw_nonfinite
    with h5py.File(pred_h5) as f, h5py.File(clean_h5) as clean:
        for m in ("model", "model_ttt", "copy_last", "flow_extrap", "flow_advect"):
            np.testing.assert_array_equal(f[m]["rollout"][:], clean[m]["rollout"][:])
        assert np.isfinite(f["model_ttt/ttt_loss_after"][:]).all()
        assert not f["model_ttt/ttt_diverged"][:].any()
        assert "step1" not in f["model"]  # teacher-forced predictions read real history: left out here


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
        np.testing.assert_array_equal(f["model/step1"][:], f["model_ttt/step1"][:])


@pytest.fixture
def eval_params(tmp_path, tiny_params_dict_fixture):
    d = tiny_params_dict_fixture
    d["paths"] = {k: str(tmp_path / v) for k, v in d["paths"].items()}
    d["paths"]["frames"] = str(tmp_path / "frames.h5")
    d["paths"]["predictions"] = str(tmp_path / "predictions.h5")
    d["device"] = "cpu"
    d["eval"].update(figures=2, bootstrap=200)
    return params_from_dict(d)


def test_evaluate_writes_intervals_differences_and_collision_scores(tmp_path, eval_params, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no backbone: LPIPS must be null
    frames_h5, _, _, _, _ = run_tiny_infer(tmp_path, tiny_settings())
    metrics = evaluate(eval_params, log=lambda s: None)
    on_disk = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    assert (metrics["split"], metrics["videos"], metrics["flow_backend"]) == ("test", 3, "gt")
    for m in METHODS:
        assert set(metrics[m]) == INTERVAL_KEYS
        assert metrics[m]["lpips"] is None
        assert metrics[m]["psnr_lo"] <= metrics[m]["psnr"] <= metrics[m]["psnr_hi"]
        assert 0 < metrics[m]["psnr"] <= 100 and -1 <= metrics[m]["ssim"] <= 1
    for pair in ("model_minus_copy_last", "model_minus_flow_extrap", "model_minus_flow_advect",
                 "model_ttt_minus_model"):
        d = metrics[pair]
        assert d["psnr_lo"] <= d["psnr"] <= d["psnr_hi"]
    a, b = metrics["model_minus_flow_advect"]["psnr"], metrics["model"]["psnr"] - metrics["flow_advect"]["psnr"]
    assert a == pytest.approx(b, abs=2e-5)  # a paired difference of means is the difference of the means
    assert "backbone weights not found" in metrics["lpips_note"]
    col = metrics["collision"]
    assert col["events"] == 1 and col["frames"] == 3 * 6 and col["prevalence"] == pytest.approx(1 / 18, abs=1e-5)
    with h5py.File(frames_h5) as f:
        labels = f["test/collision"][:, 2:]  # the frames scored: each has the model's 2 frames of history
    assert np.argwhere(labels).tolist() == [[0, 3]]  # the one event: video 0, frame 5
    # a constant score ranks every frame alike: its AP is the prevalence
    assert col["ap_constant"] == pytest.approx(average_precision(np.full(labels.shape, 0.5), labels), abs=1e-5)
    assert 0 <= col["ap"] <= 1 and 0 <= col["best_f1"] <= 1
    assert metrics["arch"] == "toy"
    # the known 2 px/frame motion makes both flow baselines beat copying the last frame, significantly
    assert metrics["flow_extrap"]["psnr_lo"] > metrics["copy_last"]["psnr_hi"]
    assert metrics["flow_advect"]["psnr"] > metrics["copy_last"]["psnr"] + 3
    reports = tmp_path / "reports"
    psnr_rows = (reports / "plots" / "psnr.tsv").read_text().splitlines()
    assert psnr_rows[0] == "step\tpsnr\tmethod" and len(psnr_rows) == 1 + len(METHODS) * 4
    assert (reports / "plots" / "lpips.tsv").read_text().splitlines() == ["step\tlpips\tmethod"]
    for name in ("psnr.png", "ssim.png", "lpips.png"):
        assert (reports / "plots" / name).stat().st_size > 1000
    figures = sorted(p.name for p in (reports / "figures").iterdir())
    assert figures == ["video_10000.gif", "video_10000.png", "video_10001.gif", "video_10001.png"]
    details = json.loads((reports / "evaluate" / "details.json").read_text())
    curve = details["per_step"]["model"]
    assert len(curve["psnr"]) == 4 and all(lo <= m <= hi for lo, m, hi in zip(curve["psnr_lo"], curve["psnr"],
                                                                               curve["psnr_hi"]))
    per_video = json.loads((reports / "evaluate" / "per_video.json").read_text())
    assert per_video["video_index"] == [10000, 10001, 10002]
    assert np.mean(per_video["scores"]["model"]["psnr"]) == pytest.approx(metrics["model"]["psnr"], abs=1e-4)


def test_evaluate_is_a_pure_function_of_the_predictions(tmp_path, eval_params, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    evaluate(eval_params, log=lambda s: None)
    first = {p.name: p.read_bytes() for p in (tmp_path / "reports").rglob("*.json")}
    evaluate(eval_params, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "reports").rglob("*.json")} == first


def test_evaluate_computes_lpips_with_the_pretrained_stages_backbone(tmp_path, eval_params, monkeypatch):
    import torchvision

    from pipeline.pretrained import hub_dir, weights_dir
    from pipeline.metrics import lpips_backbone_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty: the backbone comes from paths.pretrained
    with hub_dir(weights_dir(eval_params.paths.pretrained, "lpips")):
        path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    metrics = evaluate(eval_params, log=lambda s: None)
    assert "lpips_note" not in metrics and metrics["lpips_computed"] == 1
    assert metrics["model_ttt"]["psnr"] is None and metrics["model_ttt_minus_model"]["psnr"] is None
    assert metrics["ttt_note"] == "ttt.enabled is false"
    for m in ("model", "copy_last", "flow_extrap", "flow_advect", "vae_recon"):
        assert metrics[m]["lpips"] is not None and metrics[m]["lpips_lo"] <= metrics[m]["lpips"]
    rows = (tmp_path / "reports" / "plots" / "lpips.tsv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 4


def test_evaluate_refuses_predictions_for_other_videos(tmp_path, eval_params):
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    with h5py.File(tmp_path / "frames.h5", "a") as f:
        f["test/video_index"][0] = 42
    with pytest.raises(ValueError, match="other test videos"):
        evaluate(eval_params, log=lambda s: None)
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_evaluate_refuses_predictions_of_another_split(tmp_path, eval_params):
    run_tiny_infer(tmp_path, tiny_settings(ttt_enabled=False))
    with h5py.File(tmp_path / "predictions.h5", "a") as f:
        f.attrs["split"] = "val"
    with pytest.raises(ValueError, match="no split 'val'"):
        evaluate(eval_params, log=lambda s: None)


def test_plot_tables_long_format(tmp_path):
    details = {"per_step": {"model": {"psnr": [30.0, 28.5], "psnr_lo": [29.0, 27.5], "ssim": [0.9, 0.8]},
                            "copy_last": {"psnr": [25.0, None], "ssim": [0.7, 0.6]}}}
    write_plot_tables(details, tmp_path)
    assert (tmp_path / "psnr.tsv").read_text().splitlines() == [
        "step\tpsnr\tmethod", "1\t30.0\tmodel", "2\t28.5\tmodel", "1\t25.0\tcopy_last"]


def test_inference_settings_from_params(tiny_params):
    s = InferenceSettings.from_params(tiny_params)
    assert (s.split, s.context, s.horizon, s.ttt_steps) == (tiny_params.eval.split, tiny_params.eval.context,
                                                            tiny_params.eval.horizon, tiny_params.ttt.steps)
    assert dataclasses.asdict(s)["ttt_grad_clip"] == tiny_params.ttt.grad_clip


def test_to_uint8_quantises_any_leading_shape_and_names_a_bad_one():
    """The one frame quantiser (predictions.h5, control's flow and figures): rounded, clipped, channels last."""
    from pipeline.predictions import to_uint8

    frames = torch.tensor([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.2]).view(1, 1, 1, 7, 1).expand(2, 3, 3, 7, 1)
    out = to_uint8(frames)  # [B,T,H,W,3]
    assert out.dtype == np.uint8 and out.shape == (2, 3, 7, 1, 3)
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # torch.round: half to even
    assert np.array_equal(to_uint8(frames[1]), out[1])  # [T,3,H,W] -> [T,H,W,3], the same bytes
    with pytest.raises(ValueError, match=r"\[\.\.\.,3,H,W\], got \(2, 3, 7, 1, 3\)"):
        to_uint8(torch.from_numpy(out).float())
