"""`warp_occ` (default): warp the frame latent by a predicted flow, mask occlusions, add a residual.

On the latest frame latent z_t (with the context window for motion), a U-Net at latent resolution
feeds three heads: flow (t+1 -> t, latent pixels) and occlusion mask in parallel, and a residual
head that reads the warped latent:  z_hat_{t+1} = warp(z_t, flow) * mask + residual.
The heads start as copy-last (flow 0, mask ~1, residual 0). Flow and mask are supervised by
flow.h5 brought to latent resolution (resize_flow; area-averaged visibility).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.flow.ops import resize_flow, warp
from pipeline.losses import flow_epe, l1, occlusion_bce
from pipeline.models.heads import CollisionHead, ResBlock, StateHead, UNet, unet_depth, zero_init_
from pipeline.clips import stack_frames, stack_windows
from pipeline.models.temporal.base import LatentIO, TemporalModel, freeze, ttt_targets, unroll

MASK_INIT_LOGIT = 4.0  # sigmoid(4) = 0.982: the mask starts (almost) fully visible


class WarpOcc(LatentIO, TemporalModel):
    """Latent warp + occlusion + residual predictor over the frozen frame VAE's latents."""

    arch = "warp_occ"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module, flow_vae: nn.Module | None = None):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes)
        if vae is None:
            raise ValueError("warp_occ needs the trained frame VAE (vae=...)")
        self.vae = freeze(vae)
        C, h, w = vae.latent_shape(*self.frame_size)
        self.latent_shape = (C, h, w)
        c, hid = self.context, self.model_cfg.hidden
        # input: the context latents and their successive differences (motion cues)
        self.trunk = UNet(c * C + (c - 1) * C, hid, depth=unet_depth(h, w))
        self.flow_head = nn.Sequential(nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU(),
                                       zero_init_(nn.Conv2d(hid, 2, 3, padding=1)))
        self.mask_head = nn.Sequential(nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU(),
                                       zero_init_(nn.Conv2d(hid, 1, 3, padding=1), bias=MASK_INIT_LOGIT))
        self.residual_head = nn.Sequential(ResBlock(hid + C, hid), nn.SiLU(),
                                           zero_init_(nn.Conv2d(hid, C, 3, padding=1)))
        self.collision_head = CollisionHead(hid)
        self.state_head = StateHead(hid, num_boxes) if num_boxes else None

    def step(self, window: Tensor) -> dict[str, Tensor]:
        """One prediction from latents window [B,c,C,h,w] -> z, z_warp, residual [B,C,h,w], flow [B,2,h,w], ..."""
        if window.dim() != 5 or window.shape[1] != self.context or tuple(window.shape[2:]) != self.latent_shape:
            raise ValueError(f"warp_occ: window must be [B,{self.context},{','.join(map(str, self.latent_shape))}], "
                             f"got {tuple(window.shape)}")
        z_t = window[:, -1]  # [B,C,h,w]
        x = torch.cat([window.flatten(1, 2), (window[:, 1:] - window[:, :-1]).flatten(1, 2)], dim=1)
        feats = self.trunk(x)  # [B,hid,h,w]
        flow = self.flow_head(feats)  # [B,2,h,w] latent pixels, t+1 -> t
        occ_logit = self.mask_head(feats)  # [B,1,h,w]
        z_warp = warp(z_t, flow)  # [B,C,h,w]
        residual = self.residual_head(torch.cat([feats, z_warp], dim=1))  # [B,C,h,w]
        out = {"z": z_warp * torch.sigmoid(occ_logit) + residual, "z_warp": z_warp, "residual": residual,
               "flow": flow, "occ_logit": occ_logit, "collision": self.collision_head(feats)}
        if self.state_head is not None:
            out["boxes"] = self.state_head(feats)  # [B,K,4]
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training clip [B,c+R,...] -> predictions of frames c..c+R-1 (each [B,R,...]), fed back."""
        R = self._rollout_len(batch)
        z = self._latents(batch)  # [B,L,C,h,w]
        return unroll(self.step, [z[:, :self.context]], ["z"], R)

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """latent L1, flow EPE, occlusion BCE, decode(warped) L1, residual L1, collision focal (+ state)."""
        self._require(batch, ["flow_bwd", "occ", "collision"], min_frames=self.context + 1)
        c, R = self.context, out["z"].shape[1]
        _, h, w = self.latent_shape
        z = self._latents(batch)  # [B,L,C,h,w]
        z_next, z_prev = z[:, c:c + R], z[:, c - 1:c - 1 + R]  # [B,R,C,h,w]
        flow_gt = resize_flow(batch["flow_bwd"][:, c - 1:c - 1 + R], (h, w))  # [B,R,2,h,w] latent pixels
        occ_gt = F.adaptive_avg_pool2d(batch["occ"][:, c - 1:c - 1 + R].flatten(0, 1), (h, w))
        occ_gt = occ_gt.view(*flow_gt.shape[:2], 1, h, w)  # [B,R,1,h,w]
        with torch.no_grad():
            true_residual = z_next - warp(z_prev, flow_gt) * occ_gt  # [B,R,C,h,w]
        terms = {
            "latent": l1(out["z"], z_next),
            "flow": flow_epe(out["flow"], flow_gt),
            "occ": occlusion_bce(out["occ_logit"], occ_gt),
            "decode": l1(self._decode(out["z_warp"]), batch["frames"][:, c:c + R]),
            "residual": l1(out["residual"], true_residual),
        }
        terms.update(self._aux_terms(batch, out, c))
        return self._with_total(terms)

    def rollout(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """From the last `context` frames of the batch, predict `horizon` frames [B,horizon,3,H,W] in [0,1]."""
        return self._rollout_latents(batch, horizon)

    def _ttt_flow_head(self) -> nn.Module:
        return self.flow_head

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """Self-supervised loss on the context frames: 'warp' (frame t warped by the flow) or 'full' (decoded prediction)."""
        self._check_ttt_kind(kind)
        T = self._require(batch, ["frames"], min_frames=2)
        frames = batch["frames"]
        targets = ttt_targets(T, self.context)
        window = stack_windows(self._latents(batch), targets, self.context)  # [n*B,c,C,h,w]
        o = self.step(window)
        truth = stack_frames(frames, targets)  # [n*B,3,H,W]
        previous = stack_frames(frames, [j - 1 for j in targets])
        if kind == "warp":
            pred = warp(previous, resize_flow(o["flow"], self.frame_size))  # flow [n*B,2,H,W] in pixels
        else:
            pred = self._to_frames(o["z"][:, None], previous, window[:, -1])[:, 0]
        return l1(pred, truth)


__all__ = ["WarpOcc", "MASK_INIT_LOGIT"]
