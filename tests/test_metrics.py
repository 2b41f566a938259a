"""PSNR / SSIM agree with scikit-image; LPIPS runs its real code path or is refused; AP / F1 on known cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics import (PSNR_MAX_DB, SSIM_CHUNK, LPIPSUnavailable, average_precision, f1_score, histogram_distance,
                              hue_histogram, load_lpips, lpips_backbone_path, lpips_distance, psnr, region_psnr,
                              region_ssim, ssim, ssim_map)


def skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """skimage reference on one [3,H,W] pair."""
    return structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                 channel_axis=-1)


def scene_like(seed: int, H: int = 48, W: int = 64) -> torch.Tensor:
    """A CLEVRER-looking frame: smooth grey floor, a few shaded coloured blobs, sensor noise -> [3,H,W]."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    img = (0.35 + 0.25 * ys).expand(3, H, W).clone()
    for _ in range(4):
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.15]) + torch.tensor([0, 0, 0.05])
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r ** 2))
        img = img * (1 - blob) + blob * torch.rand(3, 1, 1, generator=g)
    return (img + 0.02 * torch.randn(3, H, W, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("kind", ["random", "scene"])
def test_psnr_and_ssim_match_skimage(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "random":
        a = torch.rand(2, 3, 3, 32, 40, generator=g)  # [B,T,3,H,W]
        b = (a + 0.15 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    else:
        a = torch.stack([scene_like(s) for s in range(4)]).view(2, 2, 3, 48, 64)
        b = torch.stack([torch.roll(scene_like(s), shifts=(1, 2), dims=(-2, -1)) for s in range(4)]).view(a.shape)
        b = (b * 255).round() / 255  # uint8-quantised, as predictions are stored
    ours_psnr, ours_ssim = psnr(a, b), ssim(a, b)
    assert ours_psnr.shape == ours_ssim.shape == (2, a.shape[1])
    for i in range(2):
        for t in range(a.shape[1]):
            ref_p = peak_signal_noise_ratio(a[i, t].double().numpy(), b[i, t].double().numpy(), data_range=1.0)
            assert float(ours_psnr[i, t]) == pytest.approx(ref_p, abs=1e-4)
            assert float(ours_ssim[i, t]) == pytest.approx(skimage_ssim(a[i, t], b[i, t]), abs=1e-4)


def test_ssim_odd_sizes_and_extremes():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 11, 13, generator=g)  # the smallest size the 11-tap window allows
    b = torch.rand(3, 11, 13, generator=g)
    assert float(ssim(a, b)) == pytest.approx(skimage_ssim(a, b), abs=1e-4)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 17))


def test_ssim_over_many_images_scores_each_on_its_own():
    """More images than one float64 block: each score matches skimage and does not depend on its neighbours."""
    g = torch.Generator().manual_seed(3)
    n = 2 * SSIM_CHUNK // 3 + 1  # videos: 3 channels each, so the images span three blocks, the last one partial
    a = torch.rand(n, 3, 16, 20, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    batched = ssim(a, b)
    assert batched.shape == (n,)
    for i in (0, SSIM_CHUNK // 3, n - 1):  # first block, the block edge, the partial block
        assert float(batched[i]) == pytest.approx(skimage_ssim(a[i], b[i]), abs=1e-4)
        assert float(batched[i]) == float(ssim(a[i], b[i]))
    assert ssim(a[:0], b[:0]).shape == (0,)


def test_psnr_identical_images_is_capped():
    a = torch.rand(2, 3, 8, 8)
    assert torch.equal(psnr(a, a), torch.full((2,), PSNR_MAX_DB))
    assert float(psnr(torch.zeros(3, 4, 4), torch.ones(3, 4, 4))) == pytest.approx(0.0)


def test_lpips_without_backbone_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for net in ("alex", "vgg"):
        with pytest.raises(LPIPSUnavailable, match="backbone weights not found"):
            load_lpips(net)
    with pytest.raises(ValueError, match="alex"):
        lpips_backbone_path("squeeze_random")


def test_lpips_runs_its_real_code_path_with_a_cached_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_path("alex")
    assert path.name == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(backbone, path)
    model = load_lpips("alex")
    # the backbone really is the file's weights (not a fresh random init), the linear layers lpips' own
    torch.testing.assert_close(model.net.slice1[0].weight, backbone["features.0.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    a = torch.stack([scene_like(s, 32, 32) for s in range(4)]).view(2, 2, 3, 32, 32)
    b = a.flip(-1)
    d = lpips_distance(model, a, b, batch=3)  # batch smaller than the 4 images: chunking is exercised
    assert d.shape == (2, 2) and (d > 0).all()
    assert torch.allclose(lpips_distance(model, a, a), torch.zeros(2, 2), atol=1e-6)
    # same numbers as calling the package directly with inputs scaled to [-1, 1]
    direct = model(a.view(-1, 3, 32, 32) * 2 - 1, b.view(-1, 3, 32, 32) * 2 - 1).flatten()
    torch.testing.assert_close(d.flatten(), direct)


def test_lpips_refuses_a_corrupt_backbone_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSUnavailable, match="could not load"):
        load_lpips("alex")


def test_average_precision_known_cases():
    # ranking: 0.9(+) 0.8(-) 0.7(+) 0.1(-): precision at the positives 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.1, 0.2, 0.9], [0, 0, 1]) == pytest.approx(1.0)
    assert average_precision([0.9, 0.2, 0.1], [0, 0, 1]) == pytest.approx(1 / 3)
    # ties form one threshold: all tied -> precision = prevalence
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == pytest.approx(0.25)
    assert average_precision(np.zeros(5), np.zeros(5)) is None
    assert average_precision(torch.tensor([[0.2, 0.6], [0.9, 0.1]]), torch.tensor([[0, 1], [1, 0]])) == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        average_precision([0.1, 0.2], [0, 2])


def test_f1_known_cases():
    # threshold 0.5: predictions 1,1,0,0 vs labels 1,0,1,0 -> tp=1 fp=1 fn=1 -> F1 = 0.5
    assert f1_score([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0], threshold=0.5) == pytest.approx(0.5)
    assert f1_score([0.9, 0.6, 0.4, 0.1], [1, 1, 0, 0], threshold=0.5) == pytest.approx(1.0)
    assert f1_score([0.5], [1], threshold=0.5) == 1.0  # the threshold itself counts as positive
    assert f1_score([0.1, 0.2], [0, 0], threshold=0.5) is None
    assert f1_score([0.9, 0.2], [0, 0], threshold=0.5) == 0.0


def test_region_scores_read_only_the_masked_pixels():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=g)
    b = a.clone()
    b[:, :, :, 12:] = torch.rand(2, 3, 24, 12, generator=g)  # the right half differs
    left = torch.zeros(2, 24, 24, dtype=torch.bool)
    left[:, :, :6] = True  # far enough from the right half for the 11x11 SSIM window
    assert torch.allclose(region_psnr(a, b, left), torch.full((2,), PSNR_MAX_DB))
    assert torch.allclose(region_ssim(a, b, left), torch.ones(2))
    everywhere = torch.ones(2, 24, 24, dtype=torch.bool)
    assert torch.allclose(region_psnr(a, b, everywhere), psnr(a, b))
    assert torch.allclose(region_ssim(a, b, everywhere), ssim(a, b), atol=1e-6)
    assert ssim_map(a, b).shape == (2, 14, 14)
    assert torch.isnan(region_psnr(a, b, torch.zeros_like(left))).all()
    with pytest.raises(ValueError, match="mask must be"):
        region_psnr(a, b, left[:, :5])


def test_hue_histogram_counts_coloured_pixels_by_hue():
    red, blue, gray = (torch.tensor(c).view(3, 1, 1).expand(3, 4, 4) for c in
                       ([0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.5, 0.52, 0.5]))
    frame = torch.cat([red, blue, gray], dim=-1)  # [3,4,12]: 16 red, 16 blue, 16 gray pixels
    h = hue_histogram(frame, chroma=0.1, bins=6)
    assert h.tolist() == [16.0, 0.0, 0.0, 0.0, 16.0, 0.0]  # gray left out; red hue 0, blue 2/3
    assert float(histogram_distance(h, hue_histogram(red, chroma=0.1, bins=6))) == pytest.approx(0.5)
    assert float(histogram_distance(h, 3 * h)) == pytest.approx(0.0)  # normalised: only the shape counts
    empty = hue_histogram(gray, chroma=0.1, bins=6)
    assert float(histogram_distance(empty, empty)) == 0.0 and float(histogram_distance(empty, h)) == 1.0
