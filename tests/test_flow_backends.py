"""Flow backends: known motions recovered by DIS and GT; RAFT loaded offline from a local weights file; fallback."""
import cv2
import numpy as np
import pytest
import torch

from helpers import section

from pipeline.flow import warp
from pipeline.flow.backends import DISBackend, GTBackend, PairBatch, RAFTBackend, build_backend, raft_input_size
from pipeline.pretrained import hub_path

CPU = torch.device("cpu")
MARGIN = 8  # interior used for error statistics (motion near the border is ill-posed)
DIS_EPE_TOL = 0.25  # px, mean endpoint error on the interior


def texture(size=128, seed=0) -> np.ndarray:
    """Smooth random RGB texture, uint8 [size,size,3] (blurred noise at two scales)."""
    rng = np.random.default_rng(seed)
    img = sum(cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (0, 0), s) * w
              for s, w in ((1.5, 1.0), (4.0, 2.0)))
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def affine_pair(M: np.ndarray, size=64, pad=32, seed=0):
    """Frames t, t+1 where t+1 = t moved by the affine map M (2x3, pixel coords); exact fwd and bwd flow."""
    big = texture(size + 2 * pad, seed)
    Mb = M.copy()
    Mb[:, 2] += pad - M[:, :2] @ np.array([pad, pad])  # the same map in the big canvas' coordinates
    moved = cv2.warpAffine(big, Mb, big.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    p = np.stack([xs, ys, np.ones_like(xs)])  # [3,H,W]
    fwd = np.einsum("ij,jhw->ihw", M, p) - p[:2]  # t -> t+1: M p - p
    bwd = np.einsum("ij,jhw->ihw", cv2.invertAffineTransform(M), p) - p[:2]  # t+1 -> t: M^-1 q - q
    return big[crop], moved[crop], fwd.astype(np.float32), bwd.astype(np.float32)


def translation(dx=2.0, dy=-1.0):
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def rotation(deg=6.0, size=64):
    return cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), deg, 1.0)


def interior_epe(est: torch.Tensor, ref: np.ndarray) -> float:
    err = (est.cpu().numpy() - ref)[..., MARGIN:-MARGIN, MARGIN:-MARGIN]
    return float(np.linalg.norm(err, axis=-3).mean())


MOTIONS = {"translation": translation(), "rotation": rotation(), "subpixel": translation(0.5, 1.25)}


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_dis_recovers_known_motion(motion):
    a, b, fwd, bwd = affine_pair(MOTIONS[motion])
    est_fwd, est_bwd = DISBackend(CPU, preset="medium")(PairBatch.from_pairs(a[None], b[None]))
    assert est_fwd.shape == est_bwd.shape == (1, 2, 64, 64) and est_fwd.dtype == torch.float32
    assert interior_epe(est_fwd[0], fwd) < DIS_EPE_TOL
    assert interior_epe(est_bwd[0], bwd) < DIS_EPE_TOL
    assert interior_epe(torch.zeros(2, 64, 64), bwd) > 4 * DIS_EPE_TOL  # the motion is not trivially small


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_gt_backend_returns_the_exact_flow_which_warps_t_onto_t1(motion):
    a, b, fwd, bwd = affine_pair(MOTIONS[motion])
    pairs = PairBatch.from_pairs(a[None], b[None], gt_fwd=fwd[None].astype(np.float16), gt_bwd=bwd[None])
    est_fwd, est_bwd = GTBackend(CPU)(pairs)
    assert interior_epe(est_fwd[0], fwd) < 1e-2  # float16 storage
    assert interior_epe(est_bwd[0], bwd) == 0
    # the convention: frame t sampled at q + bwd(q) is frame t+1
    img_a = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    img_b = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255
    err = (warp(img_a, est_bwd) - img_b)[..., MARGIN:-MARGIN, MARGIN:-MARGIN].abs().mean()
    base = (img_a - img_b)[..., MARGIN:-MARGIN, MARGIN:-MARGIN].abs().mean()
    assert err < 0.01 and err < base / 5


def test_gt_backend_without_exact_flow_is_an_error():
    a = texture(32)[None]
    with pytest.raises(RuntimeError, match="gt_fwd/gt_bwd"):
        GTBackend(CPU)(PairBatch.from_pairs(a, a))


def test_pair_batch_from_clips_shares_frames():
    clip = np.zeros((5, 8, 8, 3), np.uint8)
    clip[:, 0, 0, 0] = np.arange(5)
    pb = PairBatch.from_clips([clip[:3], clip[2:]])  # pairs (0,1), (1,2) | (2,3), (3,4)
    assert len(pb) == 4 and pb.frames.shape[0] == 6
    assert pb.first[:, 0, 0, 0].tolist() == [0, 1, 2, 3] and pb.second[:, 0, 0, 0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"gt_fwd must be \[4, 2, 8, 8\]"):
        PairBatch.from_clips([clip], gt_fwd=np.zeros((3, 2, 8, 8)))


@pytest.mark.parametrize("hw,up", [((64, 64), (128, 128)), ((37, 50), (128, 173)), ((200, 304), (200, 304)),
                                   ((130, 131), (130, 131))])
def test_raft_input_size(hw, up):
    got_up, padded = raft_input_size(*hw)
    assert got_up == up
    assert min(padded) >= 128 and padded[0] % 8 == 0 and padded[1] % 8 == 0
    assert padded[0] - up[0] < 8 and padded[1] - up[1] < 8


# --- RAFT: the real loading path, offline, from a weights file created in a temporary torch hub cache ---

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("a weights download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


@pytest.fixture
def raft_small_weights(torch_home):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    state = raft_small(weights=None).state_dict()
    path = hub_path("raft_small")
    assert path == torch_home / "hub" / "checkpoints" / "raft_small_C_T_V2-01064c6d.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


def test_raft_loads_the_cached_weights_file(raft_small_weights):
    path, state = raft_small_weights
    backend, info = build_backend(section("flow", backend="raft_small", cpu_num_updates=2), CPU)
    assert isinstance(backend, RAFTBackend)
    assert (info.backend, info.backend_used, info.fallback_reason) == ("raft_small", "raft_small", None)
    assert info.weights == str(path) and info.num_updates == 2
    loaded = backend.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # these weights, not a fresh init


def test_raft_on_cpu_runs_the_cpu_variant_and_says_so(raft_small_weights):
    backend, info = build_backend(section("flow", backend="raft_large", cpu_raft="raft_small", cpu_num_updates=3), CPU)
    assert info.backend == "raft_large" and info.backend_used == "raft_small" and info.num_updates == 3
    assert "flow.cpu_raft=raft_small" in info.note and "flow.cpu_num_updates=3" in info.note
    assert backend.num_updates == 3


@pytest.mark.parametrize("hw", [(37, 50), (24, 40), (64, 64)])
def test_raft_odd_and_small_sizes(raft_small_weights, hw):
    backend, _ = build_backend(section("flow", backend="raft_small", cpu_num_updates=1), CPU)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (3, *hw, 3), dtype=np.uint8)
    fwd, bwd = backend(PairBatch.from_clips([clip]))
    assert fwd.shape == bwd.shape == (2, 2, *hw)
    assert torch.isfinite(fwd).all() and torch.isfinite(bwd).all()


def test_raft_shared_encoding_equals_torchvision_forward(raft_small_weights):
    """`_pairs` encodes each frame once; it must compute exactly what RAFT.forward computes."""
    backend, _ = build_backend(section("flow", backend="raft_small", cpu_num_updates=2), CPU)
    rng = np.random.default_rng(1)
    pairs = PairBatch.from_clips([rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)])
    x = backend._to_raft_input(pairs.frames)  # [F,3,h,w]
    src, dst = torch.as_tensor(pairs.src), torch.as_tensor(pairs.dst)
    ours = backend._pairs(x, torch.cat([src, dst]), torch.cat([dst, src]))
    ref = backend._raft(torch.cat([x[src], x[dst]]), torch.cat([x[dst], x[src]]))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_raft_crops_padding_and_rescales_to_the_frame_grid(raft_small_weights, monkeypatch):
    """A constant flow at RAFT's input resolution comes back scaled by frame size / RAFT size per axis."""
    backend, _ = build_backend(section("flow", backend="raft_small", cpu_num_updates=1), CPU)
    H, W = 37, 50
    (uh, uw), (ph, pw) = raft_input_size(H, W)
    seen = {}

    def constant_flow(x, src, dst):
        seen["shape"] = tuple(x.shape[-2:])
        flow = torch.zeros(len(src), 2, *x.shape[-2:])
        flow[:, 0], flow[:, 1] = 8.0, -4.0
        flow[..., uh:, :] = 1e3  # padding rows/cols must be cropped away
        flow[..., uw:] = 1e3
        return flow

    monkeypatch.setattr(backend, "_pairs", constant_flow)
    fwd, bwd = backend(PairBatch.from_clips([np.zeros((2, H, W, 3), np.uint8)]))
    assert seen["shape"] == (ph, pw)
    torch.testing.assert_close(fwd[0, 0], torch.full((H, W), 8.0 * W / uw))
    torch.testing.assert_close(bwd[0, 1], torch.full((H, W), -4.0 * H / uh))


def test_missing_weights_fall_back_loudly_and_are_recorded(torch_home):
    with pytest.warns(RuntimeWarning, match=r"FLOW BACKEND FALLBACK.*raft_small_C_T_V2-01064c6d\.pth"):
        backend, info = build_backend(section("flow", backend="raft_large"), CPU)
    assert isinstance(backend, DISBackend)
    assert info.backend == "raft_large" and info.backend_used == "dis"
    # on CPU the raft_small file is the one looked for (flow.cpu_raft); the reason names it and where it goes
    assert str(torch_home / "hub" / "checkpoints" / "raft_small_C_T_V2-01064c6d.pth") in info.fallback_reason
    assert "download.pytorch.org" in info.fallback_reason


def test_missing_weights_fallback_to_gt(torch_home):
    with pytest.warns(RuntimeWarning, match="flow.fallback=gt"):
        backend, info = build_backend(section("flow", backend="raft_small", fallback="gt"), CPU)
    assert isinstance(backend, GTBackend) and info.backend_used == "gt"


def test_corrupt_weights_fall_back_with_the_load_error(torch_home):
    path = hub_path("raft_small")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="could not load raft_small weights"):
        _, info = build_backend(section("flow", backend="raft_small"), CPU)
    assert info.backend_used == "dis" and str(path) in info.fallback_reason


def test_wrong_state_dict_is_not_used(torch_home):
    from torchvision.models.optical_flow import raft_large

    path = hub_path("raft_small")
    path.parent.mkdir(parents=True)
    torch.save(raft_large(weights=None).state_dict(), path)  # a file under the right name with the wrong model
    with pytest.warns(RuntimeWarning, match="state_dict"):
        _, info = build_backend(section("flow", backend="raft_small"), CPU)
    assert info.backend_used == "dis"


def test_dis_odd_sizes_and_presets():
    clip = np.stack([texture(64, s)[:30, :45] for s in range(3)])
    for preset in ("ultrafast", "fast", "medium"):
        fwd, bwd = DISBackend(CPU, preset=preset)(PairBatch.from_clips([clip]))
        assert fwd.shape == bwd.shape == (2, 2, 30, 45)
        assert torch.isfinite(fwd).all() and torch.isfinite(bwd).all()
    with pytest.raises(ValueError, match="unknown DIS preset"):
        DISBackend(CPU, preset="slow")
