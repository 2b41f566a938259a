"""warp / occlusion / resize_flow: exact cases with known answers."""
import pytest
import torch

from pipeline.flow import occlusion, resize_flow, warp
from pipeline.flow.ops import base_grid


def const_flow(shape, dx, dy):
    flow = torch.zeros(*shape[:-3], 2, *shape[-2:])
    flow[..., 0, :, :] = dx
    flow[..., 1, :, :] = dy
    return flow


@pytest.mark.parametrize("dx,dy", [(2, 1), (-3, 0), (0, -2)])
def test_warp_integer_shift_is_exact(dx, dy):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 17)  # [B,C,H,W]
    out = warp(x, const_flow(x.shape, dx, dy))
    H, W = x.shape[-2:]
    ys, xs = slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx))
    src_y, src_x = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    # out(p) = x(p + flow): inside the image the shift is exact
    torch.testing.assert_close(out[..., ys, xs], x[..., src_y, src_x], atol=1e-6, rtol=0)


def test_warp_border_padding_and_fractional_shift_of_a_ramp():
    H, W = 9, 11
    grid = base_grid(H, W)  # [2,H,W]
    ramp = (0.3 * grid[0] + 0.7 * grid[1]).expand(1, 1, H, W)  # bilinear is exact on a linear ramp
    out = warp(ramp, const_flow((1, 1, H, W), 0.25, 0.5))
    torch.testing.assert_close(out[..., : H - 1, : W - 1], ramp[..., : H - 1, : W - 1] + 0.3 * 0.25 + 0.7 * 0.5,
                               atol=1e-5, rtol=0)
    far = warp(ramp, const_flow((1, 1, H, W), 100.0, 0.0))  # border padding: clamps to the last column
    torch.testing.assert_close(far[0, 0, :, 0], ramp[0, 0, :, W - 1])


def test_warp_leading_dims_and_unbatched():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 8, 8)  # [B,T,C,H,W]
    flow = torch.randn(2, 3, 2, 8, 8)  # [B,T,2,H,W]
    out = warp(x, flow)
    assert out.shape == x.shape
    torch.testing.assert_close(out[1, 2], warp(x[1, 2:3], flow[1, 2:3])[0])
    torch.testing.assert_close(warp(x[0, 0], flow[0, 0]), out[0, 0])  # [C,H,W] with [2,H,W]


def test_warp_rejects_bad_shapes_with_the_shapes_in_the_message():
    with pytest.raises(ValueError, match=r"\[\*, 2, H, W\], got \(1, 3, 8, 8\)"):
        warp(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 2, 8, 9\)"):
        warp(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 9))
    with pytest.raises(ValueError, match="leading dims"):
        warp(torch.rand(2, 3, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        warp(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.rand(1, 2, 8, 8))


def moving_square(H=24, W=32, top=6, left=8, size=8, d=3):
    """Exact flows of a size x size square moving right by d px over a static background."""
    fwd = torch.zeros(1, 2, H, W)  # frame t's grid
    fwd[0, 0, top:top + size, left:left + size] = d
    bwd = torch.zeros(1, 2, H, W)  # frame t+1's grid
    bwd[0, 0, top:top + size, left + d:left + d + size] = -d
    occluded = torch.zeros(1, 1, H, W, dtype=torch.bool)  # background uncovered behind the square
    occluded[0, 0, top:top + size, left:left + d] = True
    return fwd, bwd, occluded


@pytest.mark.parametrize("d", [1, 3, 5])
def test_occlusion_marks_exactly_the_disoccluded_band(d):
    fwd, bwd, occluded = moving_square(d=d)
    soft, hard = occlusion(bwd, fwd)
    assert soft.shape == hard.shape == (1, 1, 24, 32)
    assert torch.equal(hard == 0, occluded)
    assert torch.equal(soft > 0.5, hard == 1)  # soft crosses 0.5 exactly at the threshold
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.all(soft[~occluded] >= 0.5) and torch.all(soft[occluded] < 0.5)
    assert soft[0, 0, 0, 0] == 1.0  # perfectly consistent static background


def test_occlusion_checks_source_pixels_not_the_blended_flow():
    """Half-pixel motion: the leading column's source point lies between the square's last column and the
    background, where interpolated forward flow is half the motion; one source pixel is consistent."""
    H, W, top, left, size, d = 16, 24, 4, 6, 6, 2.5
    fwd = torch.zeros(1, 2, H, W)
    fwd[0, 0, top:top + size, left:left + size] = d
    bwd = torch.zeros(1, 2, H, W)
    bwd[0, 0, top:top + size, left + 3:left + size + 3] = -d  # covers columns whose source is in [left+0.5, left+size-0.5]
    soft, hard = occlusion(bwd, fwd)
    assert torch.all(hard[0, 0, top:top + size, left + 3:left + size + 3] == 1)  # every square pixel is visible
    blended = warp(fwd, bwd)[0, 0, top, left + size + 2]  # [] forward flow interpolated at the leading edge
    assert blended == pytest.approx(d / 2)  # the blend alone would fail the check: (2.5 - 1.25)^2 > 0.5 + ...
    assert torch.equal(soft > 0.5, hard == 1)


def test_occlusion_small_motion_is_below_the_alpha2_threshold():
    fwd, bwd, _ = moving_square(d=1)
    _, hard = occlusion(bwd * 0.5, fwd * 0.5)  # 0.5 px of inconsistency: 0.25 < 0.5 -> visible
    assert torch.all(hard == 1)


def test_occlusion_leading_dims_and_errors():
    fwd, bwd, occluded = moving_square()
    soft, hard = occlusion(bwd.expand(2, 3, 2, 24, 32), fwd.expand(2, 3, 2, 24, 32))  # [B,T,2,H,W]
    assert hard.shape == (2, 3, 1, 24, 32)
    assert torch.equal(hard[1, 2] == 0, occluded[0])
    with pytest.raises(ValueError, match="same shape"):
        occlusion(bwd, fwd[..., :-1])
    with pytest.raises(ValueError, match="alpha2 > 0"):
        occlusion(bwd, fwd, alpha2=0.0)


def test_resize_flow_rescales_vectors_per_axis():
    flow = const_flow((1, 2, 32, 48), 3.0, -2.0)
    down = resize_flow(flow, (16, 12))  # y by 1/2, x by 1/4
    torch.testing.assert_close(down[0, :, 5, 5], torch.tensor([0.75, -1.0]))
    up = resize_flow(flow, (64, 96))
    torch.testing.assert_close(up[0, :, 7, 9], torch.tensor([6.0, -4.0]))
    assert resize_flow(flow, (32, 48)) is flow
    assert resize_flow(torch.zeros(3, 4, 2, 8, 8), (4, 4)).shape == (3, 4, 2, 4, 4)
    assert resize_flow(flow.half(), (16, 24)).dtype == torch.float16
    with pytest.raises(ValueError, match="size"):
        resize_flow(flow, (0, 4))


def test_resize_flow_area_average_of_a_linear_field():
    """A flow that is linear in x stays linear after an area downsample (cell averages), rescaled."""
    H, W = 8, 16
    u = base_grid(H, W)[0]  # u(x) = x on the fine grid
    flow = torch.stack([u, torch.zeros_like(u)])[None]  # [1,2,H,W]
    down = resize_flow(flow, (4, 8))  # coarse cell j averages fine x = 2j, 2j+1 -> 2j + 0.5, times 1/2
    expected = (2 * torch.arange(8.0) + 0.5) / 2
    torch.testing.assert_close(down[0, 0, 0], expected)


def test_occlusion_marks_pixels_whose_source_is_outside_frame_t():
    """A band entering the view from the left by d px: its new pixels were outside frame t."""
    H, W, d = 16, 20, 3
    fwd = torch.zeros(1, 2, H, W)
    fwd[0, 0, 4:10, 0:5] = d  # the part of the object already in view at t
    bwd = torch.zeros(1, 2, H, W)
    bwd[0, 0, 4:10, 0:5 + d] = -d  # at t+1 it covers columns 0..5+d-1
    soft, hard = occlusion(bwd, fwd)
    expected = torch.zeros(1, 1, H, W, dtype=torch.bool)
    expected[0, 0, 4:10, 0:d] = True  # sources at x - d < -0.5: outside frame t
    assert torch.equal(hard == 0, expected)
    assert torch.equal(soft > 0.5, hard == 1)
    _, hard_fb_only = occlusion(bwd, fwd, out_of_frame=False)  # border padding hides these
    assert torch.all(hard_fb_only[0, 0, 4:10, 0:d] == 1)
    _, hard_edge = occlusion(torch.full((1, 2, H, W), -0.4), torch.full((1, 2, H, W), 0.4))
    assert torch.all(hard_edge == 1)  # 0.4 px past the pixel centre is still inside the frame
