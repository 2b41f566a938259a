"""Frame and flow VAEs: shapes, KL, losses, bad configs, and the train_vae / train_flow_vae stages."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from pipeline.checkpoint import load_checkpoint, load_model
from pipeline.models.flow_vae import build_flow_vae
from pipeline.models.vae import build_vae
from pipeline.config import ConfigError, params_from_dict
from pipeline.losses import end_point_error
from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig, flow_vae_loss, moving_weights
from pipeline.models.vae import VAE, VAEConfig, frame_vae_loss, kl_divergence, kl_weight

from helpers import override, squares_splits, tiny_params_dict, write_flow_h5, write_frames_h5


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (16, 128)])
@pytest.mark.parametrize("downsample,patch", [(1, 1), (2, 1), (4, 2), (4, 4), (8, 2)])
def test_vae_shapes(size, downsample, patch):
    H, W = size
    model = VAE(VAEConfig(hidden=16, latent_channels=3, downsample=downsample, patch=patch))
    x = torch.rand(2, 3, H, W)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 3, H // downsample, W // downsample)
    assert model.latent_shape(H, W) == (3, H // downsample, W // downsample)
    recon = model.decode(mu)
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid output
    recon2, mu2, _ = model.eval()(x)
    assert torch.equal(mu2, mu) and torch.allclose(recon2, recon)  # eval forward decodes mu


def test_vae_train_forward_samples_eval_forward_is_deterministic():
    model = VAE(VAEConfig(hidden=16, latent_channels=4))
    x = torch.rand(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    ref = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    assert torch.allclose(kl_divergence(mu, logvar, reduction="none"), ref, atol=1e-6)
    assert torch.allclose(kl_divergence(mu, logvar), ref.mean(), atol=1e-6)
    assert torch.allclose(kl_divergence(mu, logvar, reduction="sum"), ref.flatten(1).sum(1).mean(), atol=1e-4)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(mu, logvar, reduction="max")


def test_kl_warmup_schedule():
    assert kl_weight(0, beta=0.1, warmup=10) == 0.0
    assert kl_weight(5, beta=0.1, warmup=10) == pytest.approx(0.05)
    assert kl_weight(50, beta=0.1, warmup=10) == pytest.approx(0.1)
    assert kl_weight(0, beta=0.1, warmup=0) == pytest.approx(0.1)


def test_frame_loss_terms_and_a_few_steps_lower_it():
    torch.manual_seed(0)
    model = VAE(VAEConfig(hidden=16, latent_channels=4))
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=16, mode="bilinear")  # smooth images
    out = frame_vae_loss(model, x, beta=0.01, warmup=0)
    assert set(out) == {"total", "l1", "kl", "kl_weight"}
    assert torch.allclose(out["total"], out["l1"] + 0.01 * out["kl"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # compare deterministic losses (decode of mu)
    first = frame_vae_loss(model, x, beta=0.01)["total"].item()
    model.train()
    for _ in range(30):
        loss = frame_vae_loss(model, x, beta=0.01)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert frame_vae_loss(model, x, beta=0.01)["total"].item() < 0.7 * first


def test_flow_vae_scale_epe_and_loss():
    model = FlowVAE(FlowVAEConfig(hidden=16, latent_channels=2, flow_scale=4.0))
    flow = torch.randn(2, 2, 16, 16) * 3
    mu, logvar = model.encode(flow)
    assert mu.shape == (2, 2, 4, 4)
    # the network sees flow / flow_scale: encoding flow equals the bare VAE encoding flow / scale
    assert torch.allclose(mu, VAE.encode(model, flow / 4.0)[0])
    assert torch.allclose(model.decode(mu), VAE.decode(model, mu) * 4.0)
    target = torch.zeros(1, 2, 3, 3)
    pred = target.clone()
    pred[:, 0], pred[:, 1] = 3.0, 4.0
    assert end_point_error(pred, target).item() == pytest.approx(5.0, abs=1e-5)
    out = flow_vae_loss(model, flow, beta=0.0)
    assert set(out) == {"total", "epe", "epe_weighted", "kl", "kl_weight"}
    assert torch.allclose(out["total"], out["epe"] / 4.0) and torch.equal(out["epe_weighted"], out["epe"])
    with pytest.raises(ValueError, match="shape"):
        end_point_error(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_flow_loss_weights_moving_pixels():
    flow = torch.zeros(2, 2, 4, 4)
    flow[0, 0, :2, :2] = 2.0  # 4 of 32 pixels move (|flow| = 2 > MOVING_PX); the rest is static
    flow[1, 1, 3, 3] = 0.4    # below MOVING_PX: counts as static
    w = moving_weights(flow, 5.0)
    assert w.shape == (2, 4, 4) and w.sum().item() == 28 + 4 * 5.0 and w[0, :2, :2].eq(5.0).all()
    pred = torch.zeros_like(flow)  # zero flow: error 2 on the moving pixels, 0.4 on one static pixel
    assert end_point_error(pred, flow).item() == pytest.approx((4 * 2.0 + 0.4) / 32, abs=1e-5)
    assert end_point_error(pred, flow, w).item() == pytest.approx((4 * 5 * 2.0 + 0.4) / 48, abs=1e-5)
    with pytest.raises(ValueError, match=r"weight of shape \(2, 4, 4\)"):
        end_point_error(pred, flow, w[:, None])

    torch.manual_seed(0)
    model = FlowVAE(FlowVAEConfig(hidden=16, latent_channels=2, flow_scale=0.5)).eval()
    out = flow_vae_loss(model, flow, beta=0.0, moving_weight=5.0)
    recon = model.decode(model.encode(flow)[0])
    assert torch.allclose(out["epe"], end_point_error(recon, flow))
    assert torch.allclose(out["epe_weighted"], end_point_error(recon, flow, w))
    assert torch.allclose(out["total"], out["epe_weighted"] / 0.5) and not torch.allclose(out["epe_weighted"], out["epe"])


@pytest.mark.parametrize("kwargs,match", [
    ({"downsample": 3}, "power of 2"),
    ({"downsample": 4, "patch": 8}, "patch"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"output": "tanh"}, "output"),
])
def test_bad_vae_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_bad_inputs_fail_with_shapes():
    model = VAE(VAEConfig(hidden=16, downsample=8, patch=2))
    with pytest.raises(ValueError, match=r"36x32 is not divisible .* 8"):
        model.encode(torch.rand(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\].*\(1, 2, 32, 32\)"):
        model.encode(torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"latent \[B,8,h,w\]"):
        model.decode(torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match="in_channels must be 2"):
        FlowVAEConfig(in_channels=3)


def test_bad_vae_params_fail_clearly():
    with pytest.raises(ConfigError, match="patch"):
        params_from_dict(override(tiny_params_dict(), {"vae": {"downsample": 2, "patch": 4}}))
    with pytest.raises(ConfigError, match="flow_scale"):
        params_from_dict(override(tiny_params_dict(), {"flow_vae": {"flow_scale": 0.0}}))
    with pytest.raises(ConfigError, match="moving_weight"):
        params_from_dict(override(tiny_params_dict(), {"flow_vae": {"moving_weight": 0.5}}))
    with pytest.raises(ConfigError, match="unknown param vae.flow_scale"):
        params_from_dict(override(tiny_params_dict(), {"vae": {"flow_scale": 2.0}}))


# --- stages on a tiny synthetic HDF5 --------------------------------------------------------------

def tiny_stage_params(tmp_path, **sections):
    raw = tiny_params_dict()
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["device"] = "cpu"
    return params_from_dict(override(raw, sections))


def test_train_vae_stage(tmp_path):
    from pipeline.vae_training import train_vae

    params = tiny_stage_params(tmp_path, vae={"steps": 12, "ckpt_every": 5, "log_every": 4})
    write_frames_h5(params.paths.frames, squares_splits({"train": 4, "test": 2}))
    metrics = train_vae(params)
    report = tmp_path / "reports" / "vae"
    saved = json.loads((report / "metrics.json").read_text())
    assert saved == {k: v for k, v in metrics.items() if k != "run"}  # run facts (time) are logged, not saved
    assert saved["step"] == 12 and 0 < saved["test"]["psnr"] < 100 and -1 <= saved["test"]["ssim"] <= 1
    assert saved["test"]["frames"] == 2 * 8 and saved["latent_shape"] == [4, 8, 8]
    assert (report / "figures" / "recon.png").stat().st_size > 1000
    tsv = (report / "plots" / "metrics" / "train" / "l1.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[0] == "step" and [r.split("\t")[0] for r in tsv[1:]] == ["4", "8", "12"]
    ckpt = load_checkpoint(params.paths.vae, kind="vae")
    assert ckpt["step"] == 12 and ckpt["params"]["vae"]["steps"] == 12 and ckpt["latent_shape"] == [4, 8, 8]
    model = load_model(params.paths.vae, "vae", build_vae)
    assert model.config == VAEConfig(**ckpt["model_args"]) and model.config.latent_channels == 4
    assert not (tmp_path / "models" / ".vae.pt.resume").exists()


def test_train_vae_stage_rejects_a_resolution_the_latent_does_not_divide(tmp_path):
    from pipeline.vae_training import train_vae

    params = tiny_stage_params(tmp_path)
    params = dataclasses.replace(params, vae=dataclasses.replace(params.vae, downsample=8, patch=2))
    write_frames_h5(params.paths.frames, squares_splits({"train": 4, "test": 2}, H=36, W=36))
    with pytest.raises(ValueError, match=r"frames\.h5: input size 36x36 is not divisible"):
        train_vae(params)


def test_train_flow_vae_stage(tmp_path):
    from pipeline.vae_training import train_flow_vae

    params = tiny_stage_params(tmp_path, flow_vae={"steps": 10, "flow_scale": 1.5, "moving_weight": 4.0})
    write_flow_h5(params.paths.flow, squares_splits({"train": 4, "test": 2}))  # squares at 1-2 px per frame
    metrics = train_flow_vae(params)
    report = tmp_path / "reports" / "flow_vae"
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["train"]["epe_weighted"] > 0 and saved["train"]["epe"] > 0  # both EPEs are logged
    test = saved["test"]
    assert test == metrics["test"] and test["fields"] == 2 * 7
    assert 0 < test["epe"] and test["epe_zero_flow"] > 0 and 0 < test["moving_fraction"] <= 1
    assert test["epe_moving_zero_flow"] >= 0.5 and test["epe_moving"] > 0
    assert (report / "figures" / "recon.png").is_file()
    model = load_model(params.paths.flow_vae, "flow_vae", build_flow_vae)
    assert isinstance(model, FlowVAE) and model.config.flow_scale == 1.5
