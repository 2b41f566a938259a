"""`dual_vae`: concatenated frame (appearance) and flow (motion) latents -> both next latents.

Input: the c context frame latents z and the c-1 flow latents zf between them (zf[t] encodes the
backward flow t+1 -> t), concatenated on channels. A U-Net at latent resolution feeds a motion head
(next motion latent zf_t = zf_{t-1} + delta) and an appearance head that also reads the predicted
motion latent (z_{t+1} = z_t + delta; with `model.dual_update: warp`, z_t warped by the decoded motion + delta,
so the appearance moves as the motion latent says by construction). Untrained, the motion latent is the last
one and the appearance the last one (delta) or the last one warped by the last motion (warp).
Losses: latent L1 on both latents; disentanglement terms: the frame decoded from the appearance
latent alone (frame VAE) vs frame t+1, the flow decoded from the motion latent alone (flow VAE)
vs the true flow (EPE); collision focal (+ state L1).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from pipeline.flow.ops import resize_flow, warp
from pipeline.losses import flow_epe, l1
from pipeline.models.heads import CollisionHead, ResBlock, StateHead, UNet, unet_depth, zero_init_
from pipeline.clips import stack_frames, stack_windows, window_indices
from pipeline.models.temporal.base import LatentIO, TemporalModel, freeze, ttt_targets, unroll


class DualVAE(LatentIO, TemporalModel):
    """Joint predictor of the next frame latent and the next flow latent."""

    arch = "dual_vae"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module, flow_vae: nn.Module):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes)
        if vae is None or flow_vae is None:
            raise ValueError("dual_vae needs both trained VAEs (vae=..., flow_vae=...)")
        if self.context < 2:
            raise ValueError(f"dual_vae needs model.context >= 2 (motion latents lie between frames), got {self.context}")
        self.vae, self.flow_vae = freeze(vae), freeze(flow_vae)
        C, h, w = vae.latent_shape(*self.frame_size)
        Cf, hf, wf = flow_vae.latent_shape(*self.frame_size)
        if (h, w) != (hf, wf):
            raise ValueError(f"dual_vae: frame latents {h}x{w} and flow latents {hf}x{wf} must share a grid "
                             f"(vae.downsample == flow_vae.downsample)")
        self.latent_shape, self.motion_shape = (C, h, w), (Cf, h, w)
        c, hid = self.context, self.model_cfg.hidden
        self.trunk = UNet(c * C + (c - 1) * Cf, hid, depth=unet_depth(h, w))
        self.motion_head = nn.Sequential(nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU(),
                                         zero_init_(nn.Conv2d(hid, Cf, 3, padding=1)))
        self.appearance_head = nn.Sequential(ResBlock(hid + Cf + C, hid), nn.SiLU(),
                                             zero_init_(nn.Conv2d(hid, C, 3, padding=1)))
        self.collision_head = CollisionHead(hid)
        self.state_head = StateHead(hid, num_boxes) if num_boxes else None

    # ---- inputs -----------------------------------------------------------------------------
    def _motion_latents(self, batch: Mapping[str, Tensor], last: int | None = None) -> Tensor:
        """Flow latents zf [B,T-1,Cf,h,w] (or the last `last`): batch['zf'] else flow_vae.encode(flow_bwd).mu."""
        if "zf" in batch:
            zf = batch["zf"]
        elif "flow_bwd" in batch:
            zf = self.encode_motion(batch["flow_bwd"] if last is None else batch["flow_bwd"][:, -last:])
        else:
            raise KeyError(f"dual_vae needs the context flow: batch key 'zf' or 'flow_bwd'; it has {sorted(batch)}")
        if zf.shape[1] != batch["frames"].shape[1] - 1 and last is None:
            raise ValueError(f"dual_vae: motion latents {tuple(zf.shape)} must hold one fewer step than frames "
                             f"{tuple(batch['frames'].shape)}")
        return zf[:, -last:] if last is not None else zf

    # ---- prediction -------------------------------------------------------------------------
    def step(self, z_win: Tensor, zf_win: Tensor) -> dict[str, Tensor]:
        """z_win [B,c,C,h,w], zf_win [B,c-1,Cf,h,w] -> z [B,C,h,w], zf [B,Cf,h,w], collision [B] (+ boxes)."""
        c = self.context
        if tuple(z_win.shape[1:]) != (c, *self.latent_shape) or tuple(zf_win.shape[1:]) != (c - 1, *self.motion_shape):
            raise ValueError(f"dual_vae: windows must be [B,{c},{','.join(map(str, self.latent_shape))}] and "
                             f"[B,{c - 1},{','.join(map(str, self.motion_shape))}], got {tuple(z_win.shape)}, "
                             f"{tuple(zf_win.shape)}")
        feats = self.trunk(torch.cat([z_win.flatten(1, 2), zf_win.flatten(1, 2)], dim=1))  # [B,hid,h,w]
        zf_next = zf_win[:, -1] + self.motion_head(feats)  # [B,Cf,h,w]
        base = z_win[:, -1]  # [B,C,h,w]
        if self.model_cfg.dual_update == "warp":  # carry the appearance by the motion it is told, then correct
            flow = self.flow_vae.decode(zf_next)  # [B,2,H,W] pixels, backward (next -> last)
            base = warp(base, resize_flow(flow, tuple(base.shape[-2:])))
        z_next = base + self.appearance_head(torch.cat([feats, zf_next, base], dim=1))
        out = {"z": z_next, "zf": zf_next, "collision": self.collision_head(feats)}
        if self.state_head is not None:
            out["boxes"] = self.state_head(feats)
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training clip [B,c+R,...] -> z [B,R,C,h,w] and zf [B,R,Cf,h,w] for frames c..c+R-1, fed back."""
        R, c = self._rollout_len(batch), self.context
        return unroll(self.step, [self._latents(batch)[:, :c], self._motion_latents(batch)[:, :c - 1]], ["z", "zf"], R)

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """latent + motion_latent L1, appearance (decoded frame) L1, motion (decoded flow) EPE, collision (+ state)."""
        self._require(batch, ["collision", "flow_bwd"], min_frames=self.context + 1)
        c, R = self.context, out["z"].shape[1]
        zf_true = self._motion_latents(batch)[:, c - 1:c - 1 + R]
        flow_true = batch["flow_bwd"][:, c - 1:c - 1 + R]  # [B,R,2,H,W] pixels
        flow_pred = self.decode_motion(out["zf"])  # [B,R,2,H,W]
        terms = {
            "latent": l1(out["z"], self._latents(batch)[:, c:c + R]),
            "motion_latent": l1(out["zf"], zf_true),
            "appearance": l1(self._decode(out["z"]), batch["frames"][:, c:c + R]),
            "motion": flow_epe(flow_pred, flow_true),
        }
        terms.update(self._aux_terms(batch, out, c))
        return self._with_total(terms)

    def rollout(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """From the last `context` frames (and the flows between them) predict `horizon` frames in [0,1]."""
        self._check_rollout(batch, horizon)
        c = self.context
        return self.rollout_from(self._latents(batch, last=c), self._motion_latents(batch, last=c - 1),
                                 last_frame=batch["frames"][:, -1], horizon=horizon)

    # ---- control: appearance and motion from different sources (pipeline.control) -----------
    def rollout_from(self, z_ctx: Tensor, zf_ctx: Tensor, *, last_frame: Tensor, horizon: int) -> dict[str, Tensor]:
        """Roll out from an appearance window z_ctx [B,c,C,h,w] and a motion window zf_ctx [B,c-1,Cf,h,w].

        The two windows may come from different videos (motion transfer) or z_ctx may repeat one still frame;
        last_frame [B,3,H,W] is the real frame behind z_ctx[:, -1] (model.decode=delta adds its detail back).
        Returns z [B,horizon,C,h,w], zf [B,horizon,Cf,h,w], frames [B,horizon,3,H,W], collision [B,horizon].
        """
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        out = unroll(self.step, [z_ctx, zf_ctx], ["z", "zf"], horizon)
        out["frames"] = self._to_frames(out["z"], last_frame, z_ctx[:, -1])  # [B,horizon,3,H,W]
        return out

    def encode_appearance(self, frames: Tensor) -> Tensor:
        """Frames [B,T,3,H,W] in [0,1] -> appearance latents [B,T,C,h,w] (frame VAE means)."""
        return self._latents({"frames": frames})

    def encode_motion(self, flow_bwd: Tensor) -> Tensor:
        """Backward flows [B,T-1,2,H,W] (pixels) -> motion latents [B,T-1,Cf,h,w] (flow VAE means)."""
        B, n = flow_bwd.shape[:2]
        with torch.no_grad():
            mu, _ = self.flow_vae.encode(flow_bwd.flatten(0, 1))
        return mu.view(B, n, *mu.shape[1:])

    def decode_motion(self, zf: Tensor) -> Tensor:
        """Motion latents [B,n,Cf,h,w] -> backward flows [B,n,2,H,W] in pixels (flow VAE decoder)."""
        flow = self.flow_vae.decode(zf.flatten(0, 1))
        return flow.view(*zf.shape[:2], *flow.shape[1:])

    def _ttt_flow_head(self) -> nn.Module:
        return self.motion_head

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """'warp': frame t warped by the decoded predicted motion latent vs t+1; 'full': decoded frame vs t+1."""
        self._check_ttt_kind(kind)
        T = self._require(batch, ["frames"], min_frames=2)
        c, frames = self.context, batch["frames"]
        targets = ttt_targets(T, c)
        z, zf = self._latents(batch), self._motion_latents(batch)  # [B,T,...], [B,T-1,...]
        # motion window before target j: flows into frames j-c+1..j-1, i.e. zf[j-c..j-2] (first repeated)
        zf_win = torch.cat([zf[:, [max(0, i - 1) for i in window_indices(j, c)[1:]]] for j in targets], dim=0)
        window = stack_windows(z, targets, c)  # [n*B,c,C,h,w]
        o = self.step(window, zf_win)
        truth = stack_frames(frames, targets)
        previous = stack_frames(frames, [j - 1 for j in targets])
        if kind == "warp":
            pred = warp(previous, self.flow_vae.decode(o["zf"]))
        else:
            pred = self._to_frames(o["z"][:, None], previous, window[:, -1])[:, 0]
        return l1(pred, truth)


__all__ = ["DualVAE"]
