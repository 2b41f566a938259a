"""Non-learned predictors scored beside the model, and the VAE reference (DESIGN §7).

Every predictor has the temporal models' rollout signature: `predict(observed, horizon)` reads only the
observed clip (`frames` [B,n,3,H,W] and `flow_bwd` [B,n-1,2,H,W], the flow between those frames) and
returns `horizon` frames [B,horizon,3,H,W] that follow it. Teacher-forced (1-step) predictions are the
same call on a window of real history with horizon 1.

- `copy_last`: the last observed frame, repeated.
- `flow_extrapolation` (`flow_extrap`): the last frame warped again and again by the last observed
  backward flow: constant motion, but the field stays where it was measured, so objects smear.
- `flow_advection` (`flow_advect`): constant velocity with the field carried along with the content.
  The last flow says where each pixel of the last frame came from; moving on at that velocity, it is at
  p + k v(p) after k steps (v = -bwd). Splatting the displacements there (moving content in front of
  static, `ADVECT_IMPORTANCE`) gives the accumulated backward flow from frame k to the last frame, and
  the last frame is warped once by it. Holes (disoccluded background nobody moved into) keep flow 0,
  i.e. the last frame's pixel: nothing is inpainted.
- `vae_reconstruction` (`vae_recon`): decode(encode(true frame).mu), the frame VAE's reconstruction of
  the truth; what any prediction decoded from latents is limited by. Not a predictor: it reads the truth.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from pipeline.flow.ops import ADVECT_IMPORTANCE, splat, warp

__all__ = ["Predictor", "PREDICTORS", "copy_last", "flow_extrapolation", "flow_advection",
           "advected_flow", "vae_reconstruction"]

Predictor = Callable[[Mapping[str, Tensor], int], Tensor]


def _observed(observed: Mapping[str, Tensor], horizon: int, *, flows: int) -> tuple[Tensor, Tensor | None]:
    frames = observed["frames"]
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"observed frames must be [B,n,3,H,W], got {tuple(frames.shape)}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not flows:
        return frames, None
    if "flow_bwd" not in observed or frames.shape[1] < 2:
        raise ValueError(f"flow baselines need >= 2 observed frames and their flow_bwd; got frames "
                         f"{tuple(frames.shape)} and keys {sorted(observed)}")
    flow = observed["flow_bwd"]
    if flow.shape[:2] != (frames.shape[0], frames.shape[1] - 1) or flow.shape[-2:] != frames.shape[-2:]:
        raise ValueError(f"flow_bwd {tuple(flow.shape)} must be [B,n-1,2,H,W] for frames {tuple(frames.shape)}")
    return frames, flow


def copy_last(observed: Mapping[str, Tensor], horizon: int) -> Tensor:
    """The last observed frame repeated: [B,horizon,3,H,W]."""
    frames, _ = _observed(observed, horizon, flows=0)
    return frames[:, -1:].expand(-1, horizon, -1, -1, -1).contiguous()


def flow_extrapolation(observed: Mapping[str, Tensor], horizon: int) -> Tensor:
    """The last frame warped `horizon` times by the last backward flow (field fixed in place)."""
    frames, flow = _observed(observed, horizon, flows=1)
    motion, current, out = flow[:, -1], frames[:, -1], []  # [B,2,H,W], [B,3,H,W]
    for _ in range(horizon):
        current = warp(current, motion)
        out.append(current)
    return torch.stack(out, dim=1)  # [B,Hz,3,H,W]


def advected_flow(velocity: Tensor, steps: int, *, importance: float = ADVECT_IMPORTANCE) -> Tensor:
    """Accumulated backward flow [B,steps,2,H,W] from frame k to frame 0 for content moving at `velocity`.

    velocity [B,2,H,W] (pixels per frame, on frame 0's grid): pixel p is at p + k v(p) after k steps;
    the displacement -k v is splatted there (faster content in front), holes get 0.
    """
    z = importance * velocity.norm(dim=1, keepdim=True)  # [B,1,H,W]
    out = []
    for k in range(1, steps + 1):
        back, _ = splat(-k * velocity, k * velocity, importance=z)
        out.append(back)
    return torch.stack(out, dim=1)


def flow_advection(observed: Mapping[str, Tensor], horizon: int) -> Tensor:
    """Constant velocity carried with the content: the last frame warped once by the advected flow."""
    frames, flow = _observed(observed, horizon, flows=1)
    back = advected_flow(-flow[:, -1], horizon)  # [B,Hz,2,H,W]
    last = frames[:, -1:].expand(-1, horizon, -1, -1, -1)
    return warp(last, back)  # [B,Hz,3,H,W]


PREDICTORS: dict[str, Predictor] = {"copy_last": copy_last, "flow_extrap": flow_extrapolation,
                                    "flow_advect": flow_advection}


@torch.no_grad()
def vae_reconstruction(vae: nn.Module, frames: Tensor) -> Tensor:
    """decode(encode(frames).mu) for frames [B,T,3,H,W] -> [B,T,3,H,W] in [0,1]."""
    B, T = frames.shape[:2]
    mu, _ = vae.encode(frames.flatten(0, 1))  # [B*T,C,h,w]
    return vae.decode(mu).view(B, T, *frames.shape[2:]).clamp(0, 1)
