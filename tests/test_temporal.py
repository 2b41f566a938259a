"""Temporal architectures (pipeline/models/temporal), their training stage and the encoder loading path."""
from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_model, make_checkpoint, save_checkpoint
from pipeline.models.temporal import rebuild_temporal
from pipeline.config import params_from_dict
from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
from pipeline.models.temporal import ARCHS, build_temporal
from pipeline.pretrained import hub_path
from pipeline.models.vae import VAE, VAEConfig
from helpers import moving_squares, squares_splits, tiny_params_dict, write_flow_h5, write_frames_h5

ARCH_NAMES = ["clip_lstm", "latent", "latent_flow", "warp_occ", "warp_occ_latent", "dual_vae"]
# "warp_occ_latent" is warp_occ with model.warp_space=latent (the seed's latent warp); warp_occ is pixel space
K = 3  # boxes per clip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on this shared 2-core machine two OpenMP threads are ~100x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scenes(num_videos: int, frames: int, size: int, *, seed: int) -> dict[str, np.ndarray]:
    """Two textured squares per video at integer velocities over a static texture (the shared factory), with
    their exact flow, visibility, K boxes and collision labels."""
    return moving_squares(num_videos, frames, size, size, count=2, num_boxes=K, seed=seed)


def tiny_vaes(params) -> tuple[VAE, FlowVAE]:
    torch.manual_seed(0)
    v, f = params.vae, params.flow_vae
    vae = VAE(VAEConfig(latent_channels=v.latent_channels, hidden=v.hidden, downsample=v.downsample)).eval()
    flow_vae = FlowVAE(FlowVAEConfig(latent_channels=f.latent_channels, hidden=f.hidden, downsample=f.downsample)).eval()
    return vae, flow_vae


@pytest.fixture
def tiny_files(tmp_path):
    """params (tiny, paths under tmp_path) with frames.h5, flow.h5, latents.h5 and both VAE checkpoints."""
    raw = tiny_params_dict()
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["device"] = "cpu"
    params = params_from_dict(raw)
    vae, flow_vae = tiny_vaes(params)
    save_checkpoint(params.paths.vae, make_checkpoint(kind="vae", model=vae, model_args=vae.config.to_dict()))
    save_checkpoint(params.paths.flow_vae, make_checkpoint(kind="flow_vae", model=flow_vae,
                                                           model_args=flow_vae.config.to_dict()))
    size, T = params.data.resolution[0], params.data.frames
    splits = squares_splits(params.data.splits, T=T, H=size, W=size, count=2, num_boxes=K)
    write_frames_h5(params.paths.frames, splits)
    write_flow_h5(params.paths.flow, splits)
    with h5py.File(params.paths.latents, "w") as la:
        for split, s in splits.items():
            n = len(s["video"])
            with torch.no_grad():
                x = torch.from_numpy(s["video"]).permute(0, 1, 4, 2, 3).float().div(255).flatten(0, 1)
                z = vae.encode(x)[0].view(n, T, *vae.latent_shape(size, size))
                zf = flow_vae.encode(torch.from_numpy(s["bwd"]).flatten(0, 1))[0]
            g = la.create_group(split)
            g.create_dataset("z", data=z.numpy())
            g.create_dataset("zf", data=zf.view(n, T - 1, *zf.shape[1:]).numpy())
    return params


# ---- helpers -------------------------------------------------------------------------------------------

def make_batch(params, batch: int = 2, length: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A clip batch as ClipDataset yields it (moving squares, latents from the tiny untrained VAEs)."""
    length = length or params.model.context + params.train.rollout
    size = params.data.resolution[0]
    s = scenes(batch, length, size, seed=seed)
    vae, flow_vae = tiny_vaes(params)
    frames = torch.from_numpy(s["video"]).permute(0, 1, 4, 2, 3).float().div(255)
    with torch.no_grad():
        z = vae.encode(frames.flatten(0, 1))[0]
        zf = flow_vae.encode(torch.from_numpy(s["bwd"]).flatten(0, 1))[0]
    return {"frames": frames, "collision": torch.from_numpy(s["collision"]).float(),
            "boxes": torch.from_numpy(s["boxes"]), "box_mask": torch.from_numpy(s["box_mask"]).float(),
            "flow_bwd": torch.from_numpy(s["bwd"]), "flow_fwd": torch.from_numpy(s["fwd"]),
            "occ": torch.from_numpy(s["vis"]).float()[:, :, None],
            "z": z.view(batch, length, *z.shape[1:]), "zf": zf.view(batch, length - 1, *zf.shape[1:])}


def make_model(params, arch: str, **model_over):
    vae, flow_vae = tiny_vaes(params)
    if arch == "warp_occ_latent":
        arch, model_over = "warp_occ", {"warp_space": "latent", **model_over}
    model_cfg = {**params.model.__dict__, "arch": arch, "encoder": "cnn", **model_over}
    torch.manual_seed(1)
    return build_temporal(arch, model=model_cfg, loss=params.loss, frame_size=tuple(params.data.resolution),
                          num_boxes=K, vae=vae, flow_vae=flow_vae)


def context_only(batch, c):
    """The first c frames of a batch and what lies between them."""
    pairs = ("flow_bwd", "flow_fwd", "occ", "zf")
    return {k: (v[:, :c - 1] if k in pairs else v[:, :c]) for k, v in batch.items() if v.dim() >= 2}


# ---- registry --------------------------------------------------------------------------------------------

FIVE = [a for a in ARCH_NAMES if a != "warp_occ_latent"]


def test_registry_has_the_five_archs():
    assert sorted(ARCHS) == sorted(FIVE)


def test_unknown_arch_lists_the_five(tiny_params):
    with pytest.raises(ValueError) as err:
        build_temporal("transformerxl", model=tiny_params.model, loss=tiny_params.loss, frame_size=(32, 32),
                       num_boxes=K)
    for name in FIVE:
        assert name in str(err.value)


def test_latent_archs_need_their_vaes(tiny_params):
    vae, _ = tiny_vaes(tiny_params)
    latent = {**tiny_params.model.__dict__, "warp_space": "latent"}
    with pytest.raises(ValueError, match="frame VAE"):
        build_temporal("warp_occ", model=latent, loss=tiny_params.loss, frame_size=(32, 32), num_boxes=K)
    # pixel-space warp_occ reads frames and flow only
    assert build_temporal("warp_occ", model=tiny_params.model, loss=tiny_params.loss, frame_size=(32, 32),
                          num_boxes=K).frozen_modules() == []
    with pytest.raises(ValueError, match="flow VAE"):
        build_temporal("dual_vae", model=tiny_params.model, loss=tiny_params.loss, frame_size=(32, 32),
                       num_boxes=K, vae=vae)


# ---- per arch: forward / loss / rollout / TTT contract -----------------------------------------------------

EXPECTED_TERMS = {
    "clip_lstm": {"frame", "flow", "residual", "collision", "state"},
    "latent": {"latent", "collision", "state"},
    "latent_flow": {"latent", "flow", "collision", "state"},
    "warp_occ": {"frame", "flow", "occ", "collision", "state"},
    "warp_occ_latent": {"latent", "flow", "occ", "decode", "residual", "collision", "state"},
    "dual_vae": {"latent", "motion_latent", "appearance", "motion", "collision", "state"},
}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_forward_backward_finite_and_shapes(tiny_params, arch):
    p = tiny_params
    model = make_model(p, arch)
    batch = make_batch(p)
    B, c, R = 2, p.model.context, p.train.rollout
    H, W = p.data.resolution
    C, h, w = p.vae.latent_channels, H // p.vae.downsample, W // p.vae.downsample
    out = model(batch)
    n = c + R - 1 if arch == "clip_lstm" else R  # clip_lstm predicts every frame after the first
    expected = {
        "clip_lstm": {"frame": (B, n, 3, H, W), "warped": (B, n, 3, H, W), "residual": (B, n, 3, H, W),
                      "flow": (B, n, 2, H, W)},
        "latent": {"z": (B, n, C, h, w)},
        "latent_flow": {"z": (B, n, C, h, w), "flow": (B, n, 2, h, w)},
        "warp_occ": {"frame": (B, n, 3, H, W), "warped": (B, n, 3, H, W), "flow": (B, n, 2, H, W),
                     "mask_logit": (B, n, 1, H, W)},
        "warp_occ_latent": {"z": (B, n, C, h, w), "z_warp": (B, n, C, h, w), "residual": (B, n, C, h, w),
                            "flow": (B, n, 2, h, w), "occ_logit": (B, n, 1, h, w)},
        "dual_vae": {"z": (B, n, C, h, w), "zf": (B, n, p.flow_vae.latent_channels, h, w)},
    }[arch]
    expected.update({"collision": (B, n), "boxes": (B, n, K, 4)})
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
    terms = model.loss(batch, out)
    assert set(terms) == EXPECTED_TERMS[arch] | {"total"}
    assert all(torch.isfinite(v) for v in terms.values())
    weights = {name: getattr(p.loss, "latent" if name == "motion_latent" else name) for name in EXPECTED_TERMS[arch]}
    assert terms["total"].item() == pytest.approx(sum(weights[k] * terms[k].item() for k in weights), rel=1e-5)
    terms["total"].backward()
    grads = [q.grad for q in model.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) > (0.7 if arch == "warp_occ" else 0.9) * len(grads)
    for sub in model.frozen_modules():  # the VAEs stay frozen
        assert all(q.grad is None and not q.requires_grad for q in sub.parameters())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_rollout_reads_only_the_context(tiny_params, arch):
    p = tiny_params
    model = make_model(p, arch).eval()
    c = p.model.context
    batch = make_batch(p, length=c + 3)
    H, W = p.data.resolution
    with torch.no_grad():
        out = model.rollout(context_only(batch, c), 4)
        assert tuple(out["frames"].shape) == (2, 4, 3, H, W)
        assert tuple(out["collision"].shape) == (2, 4)
        assert out["frames"].min() >= 0 and out["frames"].max() <= 1
        # a longer context batch: only its last `context` frames matter
        longer = context_only(batch, c + 2)
        tampered = {k: v.clone() for k, v in longer.items()}
        tampered["frames"][:, 0] = 1.0 - tampered["frames"][:, 0]
        tampered["z"][:, 0] += 5.0
        a = model.rollout(longer, 2)["frames"]
        b = model.rollout(tampered, 2)["frames"]
        assert torch.allclose(a, b)
        # without latents in the batch, the latent archs encode the frames themselves
        if "z" in longer and arch != "clip_lstm":
            no_z = {k: v for k, v in longer.items() if k not in ("z", "zf")}
            assert torch.allclose(model.rollout(no_z, 2)["frames"], a, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_ttt_api(tiny_params, arch):
    p = tiny_params
    model = make_model(p, arch)
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 2), c + 1)
    head = model.ttt_parameters("flow_head")
    if arch in ("latent", "latent_flow"):
        assert head is None  # no flow head in the prediction path
    else:
        assert head and all(any(q is h for q in model.parameters()) for h in head)
        biases = model.ttt_parameters("flow_bias")
        assert biases and all(b.dim() == 1 for b in biases) and len(biases) < len(head)
        assert all(any(b is h for h in head) for b in biases)
    everything = model.ttt_parameters("all")
    assert len(everything) == len(model.trainable_parameters()) > len(head or [])
    with pytest.raises(ValueError, match="flow_head"):
        model.ttt_parameters("decoder")
    kinds = ["full"] if arch == "latent" else ["warp", "full"]
    for kind in kinds:
        loss = model.ttt_loss(ctx, kind)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert any(q.grad is not None for q in everything)
        model.zero_grad()
    if arch == "latent":
        with pytest.raises(ValueError, match="full"):
            model.ttt_loss(ctx, "warp")
    # the loss is a function of the context it is given, nothing else: an equal context gives the same loss,
    # another one (other videos) another loss
    loss = model.ttt_loss(ctx, "full")
    assert torch.equal(loss, model.ttt_loss({k: v.clone() for k, v in ctx.items()}, "full"))
    other = context_only(make_batch(p, length=c + 2, seed=1), c + 1)
    assert model.ttt_loss(other, "full").item() != pytest.approx(loss.item(), rel=1e-4)
    # the flow head moves the warp loss (where there is one in the prediction path)
    if head:
        before = model.ttt_loss(ctx, "warp").item()
        with torch.no_grad():
            head[-2].add_(0.5 * torch.randn_like(head[-2]))  # the zero-initialised last conv
        assert model.ttt_loss(ctx, "warp").item() != pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_ttt_objective_is_ttt_loss_at_the_current_weights(tiny_params, arch):
    """What TTT minimises (`ttt_objective`, which may precompute what the adapted weights do not reach) is
    `ttt_loss` at every step: same value and gradient, and it follows the adapted weights as they change."""
    p = tiny_params
    model = make_model(p, arch).eval()
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 2), c + 1)
    for which in ("flow_head", "all"):
        params = model.ttt_parameters(which)
        if params is None:
            continue
        objective = model.ttt_objective(ctx, "full", params)
        for _ in range(2):  # the trained weights, then moved ones
            ours, ref = objective(), model.ttt_loss(ctx, "full")
            assert torch.equal(ours, ref)
            for a, b in zip(torch.autograd.grad(ours, params, allow_unused=True),
                            torch.autograd.grad(ref, params, allow_unused=True)):
                assert (a is None and b is None) or torch.equal(a, b)
            with torch.no_grad():
                for q in params:
                    q.add_(0.05 * torch.randn_like(q))


def test_warp_occ_pixel_ttt_objective_runs_the_trunk_once(tiny_params):
    """With only the flow head adapted, the trunk runs once per context window, not once per TTT step."""
    p = tiny_params
    model = make_model(p, "warp_occ").eval()
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 2), c + 1)  # one window of c frames before the last context frame
    calls = []
    model.trunk.register_forward_hook(lambda *_: calls.append(1))
    objective = model.ttt_objective(ctx, "full", model.ttt_parameters("flow_head"))
    for _ in range(3):
        objective()
    assert len(calls) == 1
    calls.clear()
    objective = model.ttt_objective(ctx, "full", model.ttt_parameters("all"))  # the trunk is adapted: every step
    for _ in range(3):
        objective()
    assert len(calls) == 3


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_a_few_steps_lower_the_loss(tiny_params, arch):
    p = tiny_params
    model = make_model(p, arch)
    batch = make_batch(p, batch=4, seed=3)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        terms = model.loss(batch, model(batch))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_checkpoint_round_trip(tiny_params, arch, tmp_path):
    p = tiny_params
    model = make_model(p, arch).eval()
    with torch.no_grad():  # move every weight away from its initial value
        for q in model.trainable_parameters():
            q.add_(0.01 * torch.randn_like(q))
    path = tmp_path / "temporal.pt"
    save_checkpoint(path, make_checkpoint(kind="temporal", model=model, model_args=model.model_args(), arch=model.arch))
    loaded = load_model(path, "temporal", rebuild_temporal)
    assert type(loaded) is type(model) and loaded.arch == model.arch
    ctx = context_only(make_batch(p, length=p.model.context + 1), p.model.context)
    with torch.no_grad():
        assert torch.allclose(loaded.rollout(ctx, 2)["frames"], model.rollout(ctx, 2)["frames"], atol=1e-6)
    ckpt = torch.load(path, weights_only=True)
    assert json.dumps(ckpt["model_args"])  # plain values only


def test_warp_occ_pixel_starts_as_flow_advect(tiny_params):
    """Untrained, pixel-space warp_occ is constant motion carried with the content (the flow_advect baseline)."""
    from pipeline.baselines import flow_advection
    from pipeline.models.temporal.warp_occ_pixel import GATE_INIT_LOGIT

    p = tiny_params
    model = make_model(p, "warp_occ").eval()
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 1), c)
    gate = torch.sigmoid(torch.tensor(GATE_INIT_LOGIT))  # the share of the observed motion the untrained model keeps
    observed = {"frames": ctx["frames"][:, -2:], "flow_bwd": ctx["flow_bwd"][:, -1:]}
    with torch.no_grad():
        ours = model.rollout(ctx, 3)["frames"]
        gated = flow_advection({**observed, "flow_bwd": gate * observed["flow_bwd"]}, 3).clamp(0, 1)
        plain = flow_advection(observed, 3).clamp(0, 1)
    assert (ours - gated).abs().max() < 0.01  # the mask starts at ~1 (sigmoid(6)), the residual at 0
    # Against flow_advect of the observed motion itself: the squares move whole pixels, so flow_advect lands
    # every pixel exactly, while the gated motion (0.25% slower) puts ~0.5% of a bilinear weight on the pixel
    # behind, which softmax splatting (importance e^(10 |v|)) makes win over the static floor: a one-pixel band
    # behind each square differs (max 0.47-0.62, 2.5-3.2% of the pixels; mean 0.005-0.0067 over seeds 0-5).
    assert (ours - plain).abs().mean() < 0.01


@pytest.mark.parametrize("fill", ["none", "extrap"])
def test_warp_occ_pixel_composes_warp_mask_and_residual(tiny_params, fill):
    p = tiny_params
    model = make_model(p, "warp_occ", fill=fill)
    torch.manual_seed(0)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    out = model(make_batch(p))
    mask = torch.sigmoid(out["mask_logit"])
    ablated = make_model(p, "warp_occ", mask="ones", fill=fill)
    ablated.load_state_dict(model.state_dict())
    out_ones = ablated(make_batch(p))
    residual = out_ones["frame"] - out_ones["warped"]  # the mask fixed at 1: warp + residual, the fill unseen
    if fill == "none":
        assert torch.allclose(out["frame"], out["warped"] * mask + residual, atol=1e-5)
    else:
        # the fill is the context's last frame re-warped k times by the velocity held in place
        assert torch.allclose(out["frame"], out["warped"] * mask + out["fill"] * (1 - mask) + residual, atol=1e-5)
        assert not torch.allclose(out["fill"], out["warped"], atol=1e-3)


def test_warp_occ_pixel_fill_is_flow_extrap_where_the_mask_is_zero(tiny_params):
    """model.fill=extrap: with the mask at 0, the observed motion kept whole and no residual, the rollout is the
    flow_extrap baseline (the last frame re-warped by the field held in place); with the mask at its initial ~1
    it is the fill=none model."""
    from pipeline.baselines import flow_extrapolation

    p = tiny_params
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 1), c)
    plain = make_model(p, "warp_occ", fill="none").eval()
    filled = make_model(p, "warp_occ", fill="extrap").eval()
    with torch.no_grad():
        near = (filled.rollout(ctx, 3)["frames"] - plain.rollout(ctx, 3)["frames"]).abs().max()
        filled.flow_head.bias[2] = 30.0  # gate = 1: exactly the observed motion
        filled.mask_head.bias.fill_(-30.0)  # mask = 0 everywhere
        ours = filled.rollout(ctx, 3)["frames"]
        extrap = flow_extrapolation({"frames": ctx["frames"][:, -2:], "flow_bwd": ctx["flow_bwd"][:, -1:]}, 3)
    assert near < 0.01  # (1 - sigmoid(6)) of the fill
    assert torch.allclose(ours, extrap.clamp(0, 1), atol=1e-5)


def test_warp_occ_pixel_mask_steps_hands_over_to_the_fill(tiny_params):
    """model.mask_steps=K: steps 1..K as without it; after K the frame is the fill plus the same residual."""
    p = tiny_params
    c, K = p.model.context, 2
    batch = make_batch(p, length=c + 4)
    models = {k: make_model(p, "warp_occ", fill="extrap", mask_steps=k).eval() for k in (0, K)}
    for m in models.values():  # the same seeded weights, moved off their initial values so the mask is not ~1
        torch.manual_seed(0)
        with torch.no_grad():
            for q in m.parameters():
                q.add_(0.05 * torch.randn_like(q))
    with torch.no_grad():
        full, cut = models[0](batch), models[K](batch)
    assert torch.equal(cut["frame"][:, :K], full["frame"][:, :K])
    mask = torch.sigmoid(full["mask_logit"])
    residual = full["frame"] - full["warped"] * mask - full["fill"] * (1 - mask)
    assert torch.allclose(cut["frame"][:, K:], (full["fill"] + residual)[:, K:], atol=1e-5)
    assert not torch.allclose(cut["frame"][:, K:], full["frame"][:, K:], atol=1e-3)


def test_warp_occ_latent_starts_as_copy_last(tiny_params):
    p = tiny_params
    model = make_model(p, "warp_occ_latent")
    batch = make_batch(p)
    out = model(batch)
    assert out["flow"].abs().max() == 0 and out["residual"].abs().max() == 0
    assert torch.sigmoid(out["occ_logit"]).min() > 0.98
    c = p.model.context
    assert torch.allclose(out["z_warp"][:, 0], batch["z"][:, c - 1], atol=1e-5)


def test_warp_occ_latent_uses_the_literal_composition(tiny_params):
    p = tiny_params
    model = make_model(p, "warp_occ_latent")
    torch.manual_seed(0)
    with torch.no_grad():
        for q in model.parameters():
            if q.requires_grad:
                q.add_(0.05 * torch.randn_like(q))
    window = make_batch(p)["z"][:, :p.model.context]
    o = model.step(window)
    assert torch.allclose(o["z"], o["z_warp"] * torch.sigmoid(o["occ_logit"]) + o["residual"], atol=1e-6)


def test_dual_vae_needs_two_context_frames(tiny_params):
    with pytest.raises(ValueError, match="context >= 2"):
        make_model(tiny_params, "dual_vae", context=1)


def test_bad_batches_give_clear_errors(tiny_params):
    model = make_model(tiny_params, "warp_occ")
    batch = make_batch(tiny_params)
    with pytest.raises(KeyError, match="flow_bwd"):
        model.loss({k: v for k, v in batch.items() if k != "flow_bwd"}, model(batch))
    with pytest.raises(ValueError, match="needs >= 3"):
        model(context_only(batch, 2))
    with pytest.raises(ValueError, match=r"\[B,T,3,32,32\]"):
        model.rollout({"frames": torch.rand(2, 3, 3, 16, 16)}, 1)


# ---- clip_lstm encoder: real hub loading path with a locally made weights file -------------------------------

def test_clip_lstm_loads_resnet_weights_from_the_hub_cache(tiny_params, tmp_path, monkeypatch):
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    p = tiny_params
    path = hub_path("resnet18")
    assert str(path).startswith(str(tmp_path))
    # no file: explicit, recorded fallback to the trainable CNN
    model = make_model(p, "clip_lstm", encoder="resnet18")
    info = model.encoder_info
    assert info["used"] == "cnn" and not info["pretrained"] and "not found" in info["reason"]
    assert model.model_args()["model"]["encoder"] == "cnn"
    # a weights file in the cache: loaded through torchvision's hub path (no network)
    torch.manual_seed(5)
    reference = resnet18(weights=None)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = make_model(p, "clip_lstm", encoder="resnet18")
    assert model.encoder_info["used"] == "resnet18" and model.encoder_info["pretrained"]
    assert torch.equal(model.encoder.backbone.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
    args = model.model_args()
    assert args["model"]["encoder"] == "resnet18" and args["load_pretrained"] is False
    out = model(make_batch(p))
    assert torch.isfinite(model.loss(make_batch(p), out)["total"])


# ---- the stage ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["warp_occ", "clip_lstm"])
def test_train_temporal_stage(tiny_files, arch, tmp_path):
    from pipeline.temporal_training import evaluate_psnr, train_temporal
    from pipeline.data.datasets import ClipDataset

    params = tiny_files
    raw = copy.deepcopy(tiny_params_dict())
    raw["paths"] = {k: getattr(params.paths, k) for k in raw["paths"]}
    raw["device"] = "cpu"
    raw["model"]["arch"] = arch
    raw["model"]["encoder"] = "cnn"
    params = params_from_dict(raw)
    report = train_temporal(params)
    assert report["arch"] == arch and report["steps"] == params.train.steps
    assert set(report["loss"]) >= EXPECTED_TERMS[arch] - {"flow", "occ"} | {"total"}
    assert report["val_psnr_step1"] is not None and report["val_psnr_step1_copy_last"] is not None
    if arch == "clip_lstm":
        assert report["encoder"]["used"] == "cnn"
    model = load_model(params.paths.temporal, "temporal", rebuild_temporal)
    assert model.arch == arch
    metrics = json.loads((params.paths.report_dir("temporal") / "metrics.json").read_text())
    assert "train" in metrics  # dvclive summary of the logged terms
    test = ClipDataset(params.paths.frames, "test", params.model.context + 3, flow_h5=params.paths.flow,
                       latents_h5=params.paths.latents)
    scores = evaluate_psnr(model, test, context=params.model.context, horizon=3)
    assert len(scores["model"]) == 3 and scores["clips"] == len(test)
    assert all(np.isfinite(scores["model"]))


@pytest.mark.parametrize("decode", ["delta", "direct"])
def test_latent_frames_composition(tiny_params, decode):
    """At init `latent` predicts z_hat = z_last: 'delta' gives back the last frame exactly, 'direct' its decoding."""
    p = tiny_params
    model = make_model(p, "latent", decode=decode).eval()
    c = p.model.context
    ctx = context_only(make_batch(p, length=c + 1), c)
    with torch.no_grad():
        frames = model.rollout(ctx, 2)["frames"]
        last = ctx["frames"][:, -1]
        expected = last if decode == "delta" else model.vae.decode(ctx["z"][:, -1]).clamp(0, 1)
    assert torch.allclose(frames[:, 0], expected, atol=1e-5)
    assert torch.allclose(frames[:, 1], expected, atol=1e-5)


def test_dual_vae_warp_update_carries_the_appearance_by_its_motion(tiny_params):
    """model.dual_update=warp: untrained (zero-initialised heads), the next appearance latent is the last one
    warped by the decoded last motion latent, exactly; it trains like the delta update."""
    from pipeline.flow.ops import resize_flow, warp

    p = tiny_params
    model = make_model(p, "dual_vae", dual_update="warp")
    batch = make_batch(p)
    c = p.model.context
    z, zf = batch["z"][:, :c], batch["zf"][:, :c - 1]
    with torch.no_grad():
        out = model.step(z, zf)
        flow = resize_flow(model.flow_vae.decode(zf[:, -1]), tuple(z.shape[-2:]))
        assert torch.allclose(out["z"], warp(z[:, -1], flow), atol=1e-6)
        assert not torch.allclose(out["z"], z[:, -1], atol=1e-3)  # the motion did move it
    terms = model.loss(batch, model(batch))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()


@pytest.mark.parametrize("update", ["delta", "warp"])
def test_dual_vae_rollout_is_rollout_from_on_one_video(tiny_params, update):
    p = tiny_params
    model = make_model(p, "dual_vae", dual_update=update).eval()
    batch = make_batch(p, length=p.eval.context)
    c = p.model.context
    with torch.no_grad():
        a = model.rollout(context_only(batch, p.eval.context), 3)
        frames = batch["frames"]
        b = model.rollout_from(model.encode_appearance(frames[:, -c:]), model.encode_motion(batch["flow_bwd"][:, -(c - 1):]),
                               last_frame=frames[:, -1], horizon=3)
    assert torch.allclose(a["frames"], b["frames"], atol=1e-6)
    assert model.decode_motion(b["zf"]).shape == (2, 3, 2, *p.data.resolution)
