"""`latent`: next-latent predictor, a transformer over latent patches of a temporal context window.

Each context latent [C,h,w] is cut into p x p patches; a token embeds a patch together with its change
since the previous frame (the motion cue). With learned space and time position
embeddings the c*n tokens attend to each other (full spatio-temporal attention, pre-norm blocks),
and the tokens of the latest frame are projected to a patch-wise update: z_hat_{t+1} = z_t + delta
(delta starts at 0, i.e. copy-last). Loss: latent L1 (+ collision focal, state L1).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from pipeline.losses import l1
from pipeline.models.heads import CollisionHead, StateHead, zero_init_
from pipeline.clips import stack_frames, stack_windows
from pipeline.models.temporal.base import LatentIO, TemporalModel, freeze, ttt_targets, unroll

LAYERS, HEADS = 3, 4


class LatentTransformer(LatentIO, TemporalModel):
    """Spatio-temporal transformer over latent patches predicting the next frame latent."""

    arch = "latent"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module, flow_vae: nn.Module | None = None):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes)
        if vae is None:
            raise ValueError(f"{self.arch} needs the trained frame VAE (vae=...)")
        self.vae = freeze(vae)
        C, h, w = vae.latent_shape(*self.frame_size)
        self.latent_shape = (C, h, w)
        self.patch = p = 2 if h % 2 == 0 and w % 2 == 0 else 1
        self.grid = (h // p, w // p)
        n, dim = self.grid[0] * self.grid[1], self.model_cfg.hidden
        if dim % HEADS:
            raise ValueError(f"{self.arch}: model.hidden={dim} must be divisible by {HEADS} attention heads")
        self.embed = nn.Linear(2 * C * p * p, dim)  # a patch and its change since the previous frame
        self.pos_space = nn.Parameter(torch.randn(1, 1, n, dim) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(1, self.context, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, HEADS, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = zero_init_(nn.Linear(dim, C * p * p))
        self.collision_head = CollisionHead(dim)
        self.state_head = StateHead(dim, num_boxes) if num_boxes else None

    # ---- patches ----------------------------------------------------------------------------
    def _patchify(self, z: Tensor) -> Tensor:
        """[B,T,C,h,w] -> tokens [B,T,n,C*p*p]."""
        B, T, C, h, w = z.shape
        p, (gh, gw) = self.patch, self.grid
        x = z.reshape(B, T, C, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)  # [B,T,gh,gw,C,p,p]
        return x.reshape(B, T, gh * gw, C * p * p)

    def _unpatchify(self, tokens: Tensor) -> Tensor:
        """[B,n,C*p*p] -> [B,C,h,w]."""
        B = tokens.shape[0]
        C, h, w = self.latent_shape
        p, (gh, gw) = self.patch, self.grid
        x = tokens.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5)  # [B,C,gh,p,gw,p]
        return x.reshape(B, C, h, w)

    # ---- prediction -------------------------------------------------------------------------
    def step(self, window: Tensor) -> dict[str, Tensor]:
        """Latents window [B,c,C,h,w] -> next latent z [B,C,h,w], token map feats [B,D,gh,gw], collision [B]."""
        if window.dim() != 5 or window.shape[1] != self.context or tuple(window.shape[2:]) != self.latent_shape:
            raise ValueError(f"{self.arch}: window must be [B,{self.context},{','.join(map(str, self.latent_shape))}], "
                             f"got {tuple(window.shape)}")
        B, c = window.shape[:2]
        n = self.grid[0] * self.grid[1]
        change = torch.cat([torch.zeros_like(window[:, :1]), window[:, 1:] - window[:, :-1]], dim=1)
        patches = torch.cat([self._patchify(window), self._patchify(change)], dim=-1)  # [B,c,n,2*C*p*p]
        tokens = self.embed(patches) + self.pos_space + self.pos_time  # [B,c,n,D]
        tokens = self.norm(self.blocks(tokens.reshape(B, c * n, -1)))[:, -n:]  # [B,n,D] latest frame
        z = window[:, -1] + self._unpatchify(self.out(tokens))  # [B,C,h,w]
        feats = tokens.transpose(1, 2).reshape(B, -1, *self.grid)  # [B,D,gh,gw]
        out = {"z": z, "z_prev": window[:, -1], "feats": feats, "collision": self.collision_head(feats)}
        if self.state_head is not None:
            out["boxes"] = self.state_head(feats)  # [B,K,4]
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training clip [B,c+R,...] -> predicted latents z [B,R,C,h,w] of frames c..c+R-1, fed back."""
        R = self._rollout_len(batch)
        return unroll(self.step, [self._latents(batch)[:, :self.context]], ["z"], R)

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """latent L1 + collision focal (+ state L1)."""
        self._require(batch, ["collision"], min_frames=self.context + 1)
        c, R = self.context, out["z"].shape[1]
        terms = {"latent": l1(out["z"], self._latents(batch)[:, c:c + R])}
        terms.update(self._aux_terms(batch, out, c))
        return self._with_total(terms)

    def rollout(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """From the last `context` frames of the batch, predict `horizon` frames [B,horizon,3,H,W] in [0,1]."""
        out = self._rollout_latents(batch, horizon)
        out.pop("feats")
        return out

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """'full': L1 of the decoded prediction vs the real next context frame ('warp' needs a flow head)."""
        self._check_ttt_kind(kind)
        if kind == "warp":
            raise ValueError(f"{self.arch} has no flow head, so ttt loss 'warp' is undefined; use ttt.loss=full")
        T = self._require(batch, ["frames"], min_frames=2)
        targets = ttt_targets(T, self.context)
        window = stack_windows(self._latents(batch), targets, self.context)  # [n*B,c,C,h,w]
        o = self.step(window)
        previous = stack_frames(batch["frames"], [j - 1 for j in targets])
        pred = self._to_frames(o["z"][:, None], previous, window[:, -1])[:, 0]
        return l1(pred, stack_frames(batch["frames"], targets))


__all__ = ["LatentTransformer"]
