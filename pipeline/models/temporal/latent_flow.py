"""`latent_flow`: the `latent` transformer plus a flow head on (z_t, z_{t+1}), supervised by flow.h5.

The flow head reads the current latent and the *predicted* next latent, so the flow supervision
(EPE at latent resolution against resize_flow(flow.h5 bwd)) pushes the predictor towards next
latents that carry the true motion. The head takes no part in the prediction itself: rollout
ignores it (it is only used by training and by the TTT 'warp' loss).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from pipeline.flow.ops import resize_flow, warp
from pipeline.losses import flow_epe, l1
from pipeline.clips import stack_frames, stack_windows
from pipeline.models.heads import ResBlock, zero_init_
from pipeline.models.temporal.base import ttt_targets
from pipeline.models.temporal.latent import LatentTransformer


class LatentFlow(LatentTransformer):
    """`latent` + auxiliary flow head (z_t, z_{t+1}) -> backward flow t+1 -> t at latent resolution."""

    arch = "latent_flow"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module, flow_vae: nn.Module | None = None):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes, vae=vae)
        C, hid = self.latent_shape[0], self.model_cfg.hidden
        self.flow_head = nn.Sequential(nn.Conv2d(2 * C, hid, 3, padding=1), ResBlock(hid, hid), nn.SiLU(),
                                       zero_init_(nn.Conv2d(hid, 2, 3, padding=1)))

    def predict_flow(self, z_t: Tensor, z_next: Tensor) -> Tensor:
        """Latents [B,C,h,w] x2 -> flow [B,2,h,w] from frame t+1 to t, in latent pixels."""
        return self.flow_head(torch.cat([z_t, z_next], dim=1))

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """As `latent`, plus flow [B,R,2,h,w] predicted from (z_t, predicted z_{t+1})."""
        out = super().forward(batch)
        out["flow"] = self.predict_flow(out["z_prev"].flatten(0, 1), out["z"].flatten(0, 1)).view(
            *out["z"].shape[:2], 2, *out["z"].shape[-2:])
        return out

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """latent L1, flow EPE (latent resolution), collision focal (+ state L1)."""
        self._require(batch, ["collision", "flow_bwd"], min_frames=self.context + 1)
        c, R = self.context, out["z"].shape[1]
        terms = {"latent": l1(out["z"], self._latents(batch)[:, c:c + R]),
                 "flow": flow_epe(out["flow"], resize_flow(batch["flow_bwd"][:, c - 1:c - 1 + R],
                                                           tuple(self.latent_shape[1:])))}
        terms.update(self._aux_terms(batch, out, c))
        return self._with_total(terms)

    def _ttt_flow_head(self) -> None:
        # The flow head does not take part in prediction: adapting it alone cannot change a rollout.
        return None

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """'full' as `latent`; 'warp': frame t warped by the flow head's (z_t, predicted z_{t+1}) flow vs t+1."""
        self._check_ttt_kind(kind)
        if kind == "full":
            return super().ttt_loss(batch, kind)
        T = self._require(batch, ["frames"], min_frames=2)
        frames, targets = batch["frames"], ttt_targets(T, self.context)
        window = stack_windows(self._latents(batch), targets, self.context)  # [n*B,c,C,h,w]
        o = self.step(window)
        flow = resize_flow(self.predict_flow(window[:, -1], o["z"]), self.frame_size)  # [n*B,2,H,W]
        pred = warp(stack_frames(frames, [j - 1 for j in targets]), flow)
        return l1(pred, stack_frames(frames, targets))


__all__ = ["LatentFlow"]
