"""`warp_occ` in pixel space (model.warp_space=pixel): the last real frame, warped once by an advected flow.

The seed's structure at full resolution: flow head, occlusion head, residual head, x_hat = warp * mask +
residual, collision and state heads. What is new is where the flow comes from and what it warps:

- Constant motion + learned correction. The observed backward flow into the last frame says how each of
  its pixels moved (v_obs = -bwd). A U-Net over the context frames and flows corrects it per pixel:
  v = sigmoid(gate) * v_obs + dv (the flow head; gate starts at ~1, dv at 0), so an untrained model is the
  `flow_advect` baseline. The correction is what TTT adapts per video.
- Warping the last real frame once. Content moving at v is at p + k v after k steps; splatting -k v there
  (pipeline.flow.ops.splat, faster content in front) gives the flow from frame k back to the last frame,
  which warps the last real frame: no blur piles up from re-warping predictions, and the field moves
  with the objects instead of staying where it was measured.
- Occlusion and residual per step. The context features, warped along with the frame, the warped frame,
  where nothing landed (coverage) and the step feed two convs that predict the mask (visible in the last
  frame; starts at ~1) and an RGB residual that paints what the warp cannot give (disoccluded floor, shadows).
  model.mask=ones fixes the mask at 1 (the ablation): x_hat = warp + residual.
- What the mask's complement shows (model.fill). `none`: nothing, x_hat = warp * mask + residual. `extrap`:
  x_hat = warp * mask + fill * (1 - mask) + residual, where fill is the last frame re-warped k times by the
  corrected velocity held in place (the `flow_extrap` baseline's field): it pulls what lies behind a moving
  object into the place it left, and it also feeds the refine net, which learns where to trust it.
  model.mask_steps=K (> 0) sets the mask to 0 after step K: over long horizons the advected content is
  wherever constant motion puts it, collisions or not, and a mask trained on short rollouts keeps trusting it.

Losses (weights loss.*): frame L1 (`frame`), EPE of the accumulated flow against the chained observed
flows of the true future (`flow`), BCE of the mask against their chained soft visibility (`occ`),
collision focal and state L1 (their heads read detached per-step features).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from pipeline.clips import clip_slice
from pipeline.flow.ops import ADVECT_IMPORTANCE, compose_backward, splat, warp
from pipeline.losses import flow_epe, l1, occlusion_bce
from pipeline.models.heads import CollisionHead, ResBlock, StateHead, UNet, unet_depth, zero_init_
from pipeline.models.temporal.base import TemporalModel

FLOW_SCALE = 2.0         # pixels per unit the networks see
GATE_INIT_LOGIT = 6.0    # sigmoid(6) = 0.9975: the observed motion is kept at first
MASK_INIT_LOGIT = 6.0    # the mask starts (almost) fully visible


class PixelWarpOcc(TemporalModel):
    """Advected warp of the last real frame, with a learned motion correction, occlusion mask and residual."""

    arch = "warp_occ"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module | None = None,
                 flow_vae: nn.Module | None = None):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes)
        c, hid = self.context, self.model_cfg.hidden
        if c < 2:
            raise ValueError(f"warp_occ (pixel) needs model.context >= 2 (the observed flow into the last frame), "
                             f"got {c}")
        H, W = self.frame_size
        depth = unet_depth(H, W, most=3)
        self.trunk = UNet(3 * c + 2 * (c - 1), hid, depth=depth)
        self.flow_head = zero_init_(nn.Conv2d(hid, 3, 3, padding=1))  # dv (2), gate logit (1)
        with torch.no_grad():
            self.flow_head.bias[2] = GATE_INIT_LOGIT
        # per step: the context features carried with the content, the warped frame, the fill, coverage, the step
        fill_channels = 3 if self.model_cfg.fill == "extrap" else 0
        self.refine = nn.Sequential(nn.Conv2d(hid + 3 + fill_channels + 1 + 1, hid, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU())
        self.mask_head = zero_init_(nn.Conv2d(hid, 1, 3, padding=1), bias=MASK_INIT_LOGIT)
        self.residual_head = zero_init_(nn.Conv2d(hid, 3, 3, padding=1))
        # collisions: a small net of its own over where the content will be (warped frame, coverage: two
        # moving things landing on one pixel) and the detached step features, at half and quarter resolution
        self.collision_net = nn.Sequential(nn.Conv2d(hid + 3 + 1, hid, 3, stride=2, padding=1), ResBlock(hid, hid),
                                           nn.Conv2d(hid, 2 * hid, 3, stride=2, padding=1), ResBlock(2 * hid, 2 * hid))
        self.collision_head = CollisionHead(2 * hid)
        self.state_head = StateHead(hid, num_boxes) if num_boxes else None

    # ---- prediction -------------------------------------------------------------------------
    def features(self, frames: Tensor, flows: Tensor) -> Tensor:
        """Context frames [B,c,3,H,W] and the flows between them [B,c-1,2,H,W] -> trunk features [B,hid,H,W]."""
        c = self.context
        if frames.shape[1:] != (c, 3, *self.frame_size) or flows.shape[1:] != (c - 1, 2, *self.frame_size):
            raise ValueError(f"warp_occ: need frames [B,{c},3,{self.frame_size[0]},{self.frame_size[1]}] and flows "
                             f"[B,{c - 1},2,...], got {tuple(frames.shape)} and {tuple(flows.shape)}")
        return self.trunk(torch.cat([frames.flatten(1, 2) * 2 - 1, flows.flatten(1, 2) / FLOW_SCALE], dim=1))

    def velocity(self, frames: Tensor, flows: Tensor, feats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Context frames and flows (and their trunk features, computed when None) -> (velocity [B,2,H,W], feats)."""
        if feats is None:
            feats = self.features(frames, flows)
        out = self.flow_head(feats)  # [B,3,H,W]
        v_obs = -flows[:, -1]  # how each pixel of the last frame moved into it
        return torch.sigmoid(out[:, 2:3]) * v_obs + out[:, :2] * FLOW_SCALE, feats

    def _unroll(self, frames: Tensor, flows: Tensor, steps: int, feats: Tensor | None = None) -> dict[str, Tensor]:
        """Predict `steps` frames after the context (from the trunk features `feats` if given); stacked on dim 1."""
        last = frames[:, -1]  # [B,3,H,W]
        v, feats = self.velocity(frames, flows, feats)
        importance = ADVECT_IMPORTANCE * v.detach().norm(dim=1, keepdim=True)  # order only: no gradient
        use_fill = self.model_cfg.fill == "extrap"
        fill = last  # [B,3,H,W] the last frame re-warped k times by the field held in place (model.fill=extrap)
        outs = []
        for k in range(1, steps + 1):
            back, coverage = splat(-k * v, k * v, importance=importance)  # [B,2,H,W] frame k -> last
            warped = warp(last, back)  # [B,3,H,W]
            inputs = [warp(feats, back), warped * 2 - 1]
            if use_fill:
                fill = warp(fill, -v.detach())  # what the advection does not answer for: no gradient to v
                inputs.append(fill * 2 - 1)
            g = self.refine(torch.cat(inputs + [coverage.clamp(0, 2) - 1, torch.full_like(coverage, k / 10)],
                                      dim=1))  # [B,hid,H,W] on frame k's grid
            mask_logit = self.mask_head(g)  # [B,1,H,W]
            mask = torch.sigmoid(mask_logit) if self.model_cfg.mask == "learned" else torch.ones_like(mask_logit)
            if 0 < self.model_cfg.mask_steps < k:  # past the steps the mask is trusted for: the fill (+ residual)
                mask = torch.zeros_like(mask_logit)
            residual = self.residual_head(g)  # [B,3,H,W]
            frame = warped * mask + residual + (fill * (1 - mask) if use_fill else 0)
            # the collision and state heads read the features without steering them: their losses must not
            # trade frame quality for box or event accuracy
            events = self.collision_net(torch.cat([g.detach(), warped.detach() * 2 - 1, coverage.clamp(0, 2) - 1], dim=1))
            o = {"frame": frame, "warped": warped, "flow": back, "mask_logit": mask_logit,
                 "collision": self.collision_head(events)}
            if use_fill:
                o["fill"] = fill
            if self.state_head is not None:
                o["boxes"] = self.state_head(g.detach())
            outs.append(o)
        return {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}

    def _context(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        c = self.context
        return batch["frames"][:, :c], batch["flow_bwd"][:, :c - 1]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training clip [B,c+R,...] -> predictions of frames c..c+R-1 (each [B,R,...])."""
        R = self._rollout_len(batch)
        self._require(batch, ["flow_bwd"], min_frames=self.context + 1)
        return self._unroll(*self._context(batch), R)

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """frame L1, flow EPE and occlusion BCE against the chained future flows, collision focal (+ state)."""
        self._require(batch, ["flow_bwd", "occ", "collision"], min_frames=self.context + 1)
        c, R = self.context, out["frame"].shape[1]
        target_flow, target_vis = compose_backward(batch["flow_bwd"][:, c - 1:c - 1 + R],
                                                   batch["occ"][:, c - 1:c - 1 + R])  # [B,R,2|1,H,W]
        terms = {"frame": l1(out["frame"], batch["frames"][:, c:c + R]),
                 "flow": flow_epe(out["flow"], target_flow),
                 "occ": occlusion_bce(out["mask_logit"], target_vis)}
        terms.update(self._aux_terms(batch, out, c))
        return self._with_total(terms)

    def rollout(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """From the last `context` frames and their flows, predict `horizon` frames [B,horizon,3,H,W] in [0,1]."""
        self._check_rollout(batch, horizon)
        self._require(batch, ["flow_bwd"], min_frames=self.context)
        T, c = batch["frames"].shape[1], self.context
        window = clip_slice(batch, T - c, T) if T > c else batch
        out = self._unroll(window["frames"], window["flow_bwd"], horizon)
        out["frames"] = out.pop("frame").clamp(0.0, 1.0)
        return out

    # ---- test-time training ---------------------------------------------------------------
    def _ttt_flow_head(self) -> nn.Module:
        return self.flow_head

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """Rollouts inside the context, as the real rollout runs: from every window of `context` frames,
        predict the remaining context frames; 'warp' scores the warped frames, 'full' the predictions."""
        return self._ttt_loss(batch, kind, features=None)

    def ttt_objective(self, batch: Mapping[str, Tensor], kind: str, params) -> Callable[[], Tensor]:
        """`ttt_loss` as a function of the current weights. When TTT adapts none of the trunk's weights, the
        trunk features of every window are computed once here: each TTT step then runs only what it changes
        (same values: the trunk sees the same inputs and weights every step)."""
        trunk = {id(p) for p in self.trunk.parameters()}
        if any(id(p) in trunk for p in params):
            return super().ttt_objective(batch, kind, params)
        with torch.no_grad():
            features = [self.features(w["frames"], w["flow_bwd"]) for w in self._ttt_windows(batch)]
        return lambda: self._ttt_loss(batch, kind, features=features)

    def _ttt_windows(self, batch: Mapping[str, Tensor]) -> list[Mapping[str, Tensor]]:
        """Every window of `context` frames that leaves a context frame after it."""
        T = self._require(batch, ["frames", "flow_bwd"], min_frames=2)
        c = self.context
        if T <= c:
            raise ValueError(f"warp_occ TTT needs more than model.context={c} context frames, got {T}")
        return [clip_slice(batch, start, start + c) for start in range(0, T - c)]

    def _ttt_loss(self, batch: Mapping[str, Tensor], kind: str, *, features: list[Tensor] | None) -> Tensor:
        self._check_ttt_kind(kind)
        key = "warped" if kind == "warp" else "frame"
        c, T = self.context, batch["frames"].shape[1]
        losses = []
        for start, window in enumerate(self._ttt_windows(batch)):
            feats = None if features is None else features[start]
            out = self._unroll(window["frames"], window["flow_bwd"], T - c - start, feats)
            losses.append(l1(out[key], batch["frames"][:, start + c:]))
        return torch.stack(losses).mean()


__all__ = ["PixelWarpOcc", "FLOW_SCALE", "GATE_INIT_LOGIT", "MASK_INIT_LOGIT"]
