"""bench_published: the re-implemented published archs, their training schedule and the paired scoring."""
import numpy as np
import pytest
import torch

from bench.bench_published import build, frame_scores, lr_at, sample_windows, summarize, teacher_prob, train
from bench.published_models import MVFN, ConvLSTM, ConvLSTMConfig, MVFNConfig, SimVP, SimVPConfig
from pipeline.metrics import PSNR_MAX_DB


def tiny_simvp(context: int = 3) -> SimVP:
    return SimVP(SimVPConfig(context=context, hid_spatial=4, hid_temporal=8, spatial_layers=2, temporal_layers=2,
                             kernel=7, mlp_ratio=2.0))


def tiny_convlstm() -> ConvLSTM:
    return ConvLSTM(ConvLSTMConfig(patch=2, hidden=4, layers=2, kernel=3))


def tiny_mvfn() -> MVFN:
    return MVFN(MVFNConfig(scales=(2, 1), features=(8, 4)))


def test_simvp_maps_t_frames_to_the_next_t_and_chains_them_for_longer_horizons():
    torch.manual_seed(0)
    model = tiny_simvp().eval()
    context = torch.rand(2, 3, 3, 16, 16)  # [B,T,3,H,W]
    with torch.no_grad():
        first = model(context)
        out = model.rollout(context, 5)
        assert first.shape == (2, 3, 3, 16, 16) and out.shape == (2, 5, 3, 16, 16)
        assert torch.equal(out[:, :3], first)
        assert torch.allclose(out[:, 3:], model(first)[:, :2])
    with pytest.raises(ValueError, match=r"\[B,3,3,H,W\]"):
        model(torch.rand(2, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="spatial_layers"):
        SimVP(SimVPConfig(spatial_layers=3))


def test_convlstm_teacher_forcing_feeds_the_true_frame_back():
    torch.manual_seed(0)
    model = tiny_convlstm().eval()
    context, truth = torch.rand(2, 3, 3, 8, 8), torch.rand(2, 4, 3, 8, 8)
    with torch.no_grad():
        free = model.rollout(context, 4)
        forced = model.rollout(context, 4, truth, teacher_prob=1.0)
        # with the first true frame fed back, step 2 is what the model predicts from context + that frame
        after_truth = model.rollout(torch.cat([context, truth[:, :1]], dim=1), 1)
    assert free.shape == forced.shape == (2, 4, 3, 8, 8)
    assert torch.equal(free[:, 0], forced[:, 0])
    assert torch.allclose(forced[:, 1], after_truth[:, 0], atol=1e-6)
    assert not torch.allclose(free[:, 1], forced[:, 1])
    with pytest.raises(ValueError, match="truth must be"):
        model.rollout(context, 4, truth[:, :2], teacher_prob=1.0)
    with pytest.raises(ValueError, match="divisible by patch"):
        model.rollout(torch.rand(1, 3, 3, 9, 9), 2)


def test_mvfn_starts_as_the_blend_of_the_last_two_frames_and_feeds_its_output_back():
    model = tiny_mvfn().eval()
    context = torch.rand(2, 3, 3, 16, 16)
    with torch.no_grad():
        out = model.rollout(context, 3)
        assert out.shape == (2, 3, 3, 16, 16)
        assert torch.allclose(out[:, 0], 0.5 * (context[:, -2] + context[:, -1]), atol=1e-5)
        assert torch.allclose(out[:, 1], 0.5 * (context[:, -1] + out[:, 0]), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by 4"):
        model.rollout(torch.rand(1, 3, 3, 18, 18), 1)
    with pytest.raises(ValueError, match="one length"):
        MVFN(MVFNConfig(scales=(2, 1), features=(8,)))


def test_schedules_and_windows():
    assert lr_at(0, steps=100, lr=1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, steps=100, lr=1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, steps=100, lr=1.0, warmup=10) == pytest.approx(0.1)
    assert teacher_prob(0, steps=100) == 1.0 and teacher_prob(25, steps=100) == 0.5 and teacher_prob(60, steps=100) == 0.0
    videos = np.arange(2 * 6 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 6, 2, 2, 3)
    clip = sample_windows(videos, 4, 5, np.random.default_rng(0))
    assert clip.shape == (4, 5, 3, 2, 2)
    with pytest.raises(ValueError, match="needs 7"):
        sample_windows(videos, 1, 7, np.random.default_rng(0))


@pytest.mark.parametrize("make", [tiny_simvp, tiny_mvfn, tiny_convlstm])
def test_train_is_a_pure_function_of_its_arguments(make):
    videos = np.random.default_rng(1).integers(0, 256, size=(3, 8, 16, 16, 3), dtype=np.uint8)
    weights = []
    for _ in range(2):
        torch.manual_seed(99)  # the same initial weights; train() seeds the rest
        model = make()
        run = train(model, videos, context=3, horizon=2, batch=2, lr=1e-3, seed=0, steps=3, warmup=2,
                    log=lambda _: None)
        assert run["steps"] == 3 and np.isfinite(run["loss_last_50"]) and not model.training
        weights.append(torch.cat([q.detach().flatten() for q in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_build_applies_overrides_and_refuses_unknown_fields():
    model = build("simvp", {"hid_spatial": "8", "temporal_layers": "2"}, context=4)
    assert model.config.context == 4 and model.config.hid_spatial == 8 and model.config.temporal_layers == 2
    assert build("convlstm", {}, context=6).config == ConvLSTMConfig()
    with pytest.raises(SystemExit, match="unknown config fields"):
        build("convlstm", {"context": "3"}, context=6)
    with pytest.raises(SystemExit, match="unknown arch"):
        build("predrnn", {}, context=6)


def test_frame_scores_and_paired_summary():
    truth = torch.rand(3, 3, 16, 16)
    perfect = frame_scores(truth, truth)
    assert perfect["psnr"] == pytest.approx(PSNR_MAX_DB) and perfect["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[Hz,3,H,W\]"):
        frame_scores(truth, truth[:2])
    scores = {"model": [{"psnr": 30.0 + i, "ssim": 0.9, "psnr_step1": 40.0} for i in range(5)],
              "other": [{"psnr": 28.0 + i, "ssim": 0.8, "psnr_step1": 41.0} for i in range(5)]}
    out = summarize(scores, reference="model", resamples=200, seed=0, level=0.95)
    diff = out["model_minus"]["other"]
    assert out["videos"] == 5 and out["methods"]["model"]["psnr"]["mean"] == pytest.approx(32.0)
    assert diff["psnr"] == {"mean": 2.0, "lo": 2.0, "hi": 2.0} and diff["psnr_step1"]["mean"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="scored on 4 videos"):
        summarize({"model": scores["model"], "other": scores["other"][:4]}, reference="model", resamples=10, seed=0,
                  level=0.95)
