"""The CUDA path (skipped without a GPU): mixed-precision training steps, RAFT's forward, a temporal rollout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import moving_squares, tiny_params_dict, train_tiny_vae
from pipeline.config import params_from_dict
from pipeline.models.temporal import build_temporal

pytestmark = pytest.mark.gpu


@pytest.fixture
def full_precision():
    """CUDA without TF32 (on by default for cuDNN convolutions): CPU and CUDA then agree to float32 rounding."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_amp_training_on_cuda_is_finite_and_close_to_fp32(tmp_path):
    """A few AMP steps on CUDA train the same tiny VAE as fp32 on CUDA does, up to low-precision rounding."""
    results = {}
    for amp in (True, False):
        result = train_tiny_vae(tmp_path / f"amp{amp}", steps=6, ckpt_every=0, amp=amp, device="cuda")
        assert next(result.model.parameters()).device.type == "cuda"
        assert all(torch.isfinite(p).all() for p in result.model.parameters())
        results[amp] = result.metrics["total"]
    assert results[True] == pytest.approx(results[False], rel=0.05), results


def test_raft_forward_on_cuda_matches_cpu(full_precision):
    """torchvision RAFT (random weights) gives the same flow on CUDA as on the CPU."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    img1, img2 = torch.rand(2, 1, 3, 128, 128) * 2 - 1  # [1,3,128,128] each
    with torch.inference_mode():
        cpu = model(img1, img2, num_flow_updates=2)[-1]  # [1,2,128,128]
        cuda = model.cuda()(img1.cuda(), img2.cuda(), num_flow_updates=2)[-1].cpu()
    assert cuda.shape == (1, 2, 128, 128)
    np.testing.assert_allclose(cuda.numpy(), cpu.numpy(), atol=1e-2)


def test_warp_occ_rollout_on_cuda_matches_cpu(full_precision):
    """The default arch's rollout runs on CUDA and agrees with the CPU one."""
    params = params_from_dict(tiny_params_dict())
    H, W = params.data.resolution
    c = params.model.context
    torch.manual_seed(0)
    model_cfg = {**params.model.__dict__, "arch": "warp_occ"}
    model = build_temporal("warp_occ", model=model_cfg, loss=params.loss, frame_size=(H, W), num_boxes=2).eval()
    scenes = moving_squares(1, c + 1, H, W, seed=0)
    batch = {"frames": torch.from_numpy(scenes["video"]).permute(0, 1, 4, 2, 3).float().div(255),  # [B,T,C,H,W]
             "flow_bwd": torch.from_numpy(scenes["bwd"]), "flow_fwd": torch.from_numpy(scenes["fwd"]),  # [B,T-1,2,H,W]
             "occ": torch.from_numpy(scenes["vis"]).float()[:, :, None]}  # [B,T-1,1,H,W]
    with torch.no_grad():
        cpu = model.rollout(batch, 2)["frames"]
        cuda = model.cuda().rollout({k: v.cuda() for k, v in batch.items()}, 2)["frames"].cpu()
    assert torch.isfinite(cuda).all()
    torch.testing.assert_close(cuda, cpu, atol=1e-3, rtol=1e-3)


def test_dual_vae_motion_transfer_on_cuda_matches_cpu(full_precision):
    """The control stage's rollout (dual_vae, A's appearance with B's motion) runs on CUDA and agrees with the CPU."""
    from pipeline.control import generate
    from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
    from pipeline.models.vae import VAE, VAEConfig

    params = params_from_dict(tiny_params_dict())
    H, W = params.data.resolution
    c = params.model.context
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_channels=4, hidden=16, downsample=4)).eval()
    flow_vae = FlowVAE(FlowVAEConfig(latent_channels=2, hidden=8, downsample=4)).eval()
    model = build_temporal("dual_vae", model={**params.model.__dict__, "arch": "dual_vae"}, loss=params.loss,
                           frame_size=(H, W), num_boxes=0, vae=vae, flow_vae=flow_vae).eval()
    scenes = moving_squares(2, c, H, W, seed=0)
    a = {"frames": torch.from_numpy(scenes["video"]).permute(0, 1, 4, 2, 3).float().div(255),  # [2,c,3,H,W]
         "flow_bwd": torch.from_numpy(scenes["bwd"])}  # [2,c-1,2,H,W]
    b = {k: v.flip(0) for k, v in a.items()}
    cpu = generate(model, a, b, mode="transfer", horizon=2)
    cuda = generate(model.cuda(), a, b, mode="transfer", horizon=2)  # generate moves the clips to the model
    assert torch.isfinite(cuda["frames"]).all()
    torch.testing.assert_close(cuda["frames"], cpu["frames"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(cuda["motion"], cpu["motion"], atol=1e-3, rtol=1e-3)
