"""What every temporal architecture shares: config, frozen VAEs, loss bookkeeping, TTT windows.

The architectures themselves (their networks, predictions and losses) live one per module next to
this file. A model sees a batch dict (docs/ARCHITECTURE.md "Tensors seen by models"): training
clips hold `model.context + train.rollout` frames; `rollout` and `ttt_loss` use context frames only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from pipeline.config import Loss, Model
from pipeline.losses import box_l1, focal_loss, weighted_total

# loss term name -> the params `loss.*` weight it uses
TERM_WEIGHT = {
    "latent": "latent", "motion_latent": "latent", "frame": "frame", "flow": "flow", "occ": "occ",
    "decode": "decode", "residual": "residual", "collision": "collision", "state": "state",
    "appearance": "appearance", "motion": "motion",
}


def as_config(cls: type, value: object, name: str):
    """A config dataclass from an instance or a plain dict (as stored in checkpoints)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a (pre-trained) submodule: no gradients to its weights, always in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def unroll(step: Callable[..., dict], windows: list[Tensor], feeds: list[str], steps: int) -> dict[str, Tensor]:
    """Call `step(*windows)` `steps` times, sliding each window [B,c,...] on by the step's output named in `feeds`.

    The rollout loop of the latent archs: each prediction is fed back as the newest frame of its window.
    Returns every output of `step`, stacked on dim 1: [B,steps,...].
    """
    outs = []
    for _ in range(steps):
        o = step(*windows)
        outs.append(o)
        windows = [torch.cat([w[:, 1:], o[key][:, None]], dim=1) for w, key in zip(windows, feeds)]
    return {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}


def ttt_targets(num_frames: int, context: int) -> list[int]:
    """Context frames a TTT loss predicts: those with a full history when any, else the last one."""
    if num_frames < 2:
        raise ValueError(f"TTT needs at least 2 context frames, got {num_frames}")
    return list(range(min(context, num_frames - 1), num_frames))


class TemporalModel(nn.Module):
    """Base of the temporal archs: holds the configs and the shared loss / TTT plumbing."""

    arch: str = ""

    def __init__(self, *, model: Model | dict, loss: Loss | dict, frame_size: tuple[int, int] | list[int],
                 num_boxes: int):
        super().__init__()
        self.model_cfg = as_config(Model, model, "model")
        self.loss_cfg = as_config(Loss, loss, "loss")
        if len(frame_size) != 2 or any(int(s) < 1 for s in frame_size):
            raise ValueError(f"frame_size must be (height, width), got {frame_size}")
        if num_boxes < 0:
            raise ValueError(f"num_boxes must be >= 0, got {num_boxes}")
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.num_boxes = int(num_boxes)
        self.context = self.model_cfg.context

    # ---- checkpoints ------------------------------------------------------------------------
    def model_args(self) -> dict:
        """Keyword args of build_temporal that rebuild this model (plain values, for checkpoints)."""
        args = {"model": dataclasses.asdict(self.model_cfg), "loss": dataclasses.asdict(self.loss_cfg),
                "frame_size": list(self.frame_size), "num_boxes": self.num_boxes}
        for name in ("vae", "flow_vae"):
            sub = getattr(self, name, None)
            args[name] = sub.config.to_dict() if sub is not None else None
        return args

    def frozen_modules(self) -> list[nn.Module]:
        """Pre-trained submodules kept frozen (the VAEs)."""
        return [m for m in (getattr(self, "vae", None), getattr(self, "flow_vae", None)) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that training updates (frozen VAEs excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- batches ----------------------------------------------------------------------------
    def _require(self, batch: Mapping[str, Tensor], keys: Iterable[str], *, min_frames: int) -> int:
        """Check batch keys and frame count; return the number of frames T."""
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"{self.arch}: batch lacks {missing}; it has {sorted(batch)}")
        frames = batch["frames"]
        if frames.dim() != 5 or frames.shape[2] != 3 or tuple(frames.shape[-2:]) != self.frame_size:
            raise ValueError(f"{self.arch}: frames must be [B,T,3,{self.frame_size[0]},{self.frame_size[1]}], "
                             f"got {tuple(frames.shape)}")
        if frames.shape[1] < min_frames:
            raise ValueError(f"{self.arch}: batch has {frames.shape[1]} frames, needs >= {min_frames} "
                             f"(model.context={self.context})")
        return frames.shape[1]

    def _check_rollout(self, batch: Mapping[str, Tensor], horizon: int) -> None:
        """A rollout needs horizon >= 1 and at least `context` frames."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self._require(batch, ["frames"], min_frames=self.context)

    def _rollout_len(self, batch: Mapping[str, Tensor]) -> int:
        """Training steps to unroll: clip length - context (>= 1)."""
        T = self._require(batch, ["frames"], min_frames=self.context + 1)
        return T - self.context

    # ---- losses -----------------------------------------------------------------------------
    def _aux_terms(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor], start: int) -> dict[str, Tensor]:
        """Collision focal loss and (with boxes) state L1 for predictions of frames start..start+R-1."""
        R = out["collision"].shape[1]
        terms = {"collision": focal_loss(out["collision"], batch["collision"][:, start:start + R],
                                         alpha=self.loss_cfg.focal_alpha, gamma=self.loss_cfg.focal_gamma)}
        if "boxes" in out:
            terms["state"] = box_l1(out["boxes"], batch["boxes"][:, start:start + R],
                                    batch["box_mask"][:, start:start + R])
        return terms

    def _with_total(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """{'total': weighted sum (weights from params loss.*), **terms}."""
        weights = {name: getattr(self.loss_cfg, TERM_WEIGHT[name]) for name in terms}
        return {"total": weighted_total(terms, weights), **terms}

    # ---- test-time training -----------------------------------------------------------------
    def ttt_parameters(self, which: str) -> list[nn.Parameter] | None:
        """Parameters TTT adapts: 'flow_head', 'flow_bias' (its biases only: a per-video motion offset and
        scale) or 'all' (frozen VAEs excluded); None when the arch has no flow head."""
        if which == "all":
            return self.trainable_parameters()
        if which in ("flow_head", "flow_bias"):
            head = self._ttt_flow_head()
            if head is None:
                return None
            return [p for n, p in head.named_parameters() if which == "flow_head" or n.endswith("bias")]
        raise ValueError(f"ttt params must be 'flow_head', 'flow_bias' or 'all', got {which!r}")

    def _ttt_flow_head(self) -> nn.Module | None:
        return None

    def ttt_objective(self, batch: Mapping[str, Tensor], kind: str, params) -> Callable[[], Tensor]:
        """`ttt_loss(batch, kind)` as a function of the current weights, for TTT adapting `params`; an arch
        may precompute here what those weights do not reach."""
        return lambda: self.ttt_loss(batch, kind)

    @staticmethod
    def _check_ttt_kind(kind: str) -> None:
        if kind not in ("warp", "full"):
            raise ValueError(f"ttt loss must be 'warp' or 'full', got {kind!r}")


class LatentIO:
    """Mixin for latent archs: latents from the batch or the frozen VAE; frames from latents."""

    vae: nn.Module

    def _latents(self, batch: Mapping[str, Tensor], last: int | None = None) -> Tensor:
        """Frame latents z [B,T,C,h,w] (or only the last `last` frames): batch['z'] else vae.encode(frames).mu."""
        frames = batch["frames"]
        if last is not None:
            frames = frames[:, -last:]
        if "z" in batch:
            z = batch["z"]
            if z.shape[1] != batch["frames"].shape[1]:
                raise ValueError(f"batch z {tuple(z.shape)} and frames {tuple(batch['frames'].shape)} "
                                 f"must hold the same number of frames")
            return z[:, -last:] if last is not None else z
        B, T = frames.shape[:2]
        with torch.no_grad():
            mu, _ = self.vae.encode(frames.flatten(0, 1))  # [B*T,C,h,w]
        return mu.view(B, T, *mu.shape[1:])

    def _to_frames(self, z_pred: Tensor, x_last: Tensor, z_last: Tensor) -> Tensor:
        """Predicted latents [B,n,C,h,w] -> frames [B,n,3,H,W] in [0,1], per params model.decode.

        'direct': D(z_hat). 'delta': x_last + D(z_hat) - D(z_last), the last real frame plus the change the
        decoder sees; it keeps the exact pixels wherever the prediction equals the last latent, so the VAE's
        reconstruction error does not cap the prediction (x_last [B,3,H,W], z_last [B,C,h,w] its latent).
        """
        frames = self._decode(z_pred)  # [B,n,3,H,W]
        if self.model_cfg.decode == "delta":
            frames = frames + (x_last - self.vae.decode(z_last))[:, None]
        return frames.clamp(0.0, 1.0)

    def _rollout_latents(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """The latent archs' rollout: `step` fed back from the last `context` latents, decoded to frames."""
        self._check_rollout(batch, horizon)
        z_ctx = self._latents(batch, last=self.context)  # [B,c,C,h,w]
        out = unroll(self.step, [z_ctx], ["z"], horizon)
        out["frames"] = self._to_frames(out["z"], batch["frames"][:, -1], z_ctx[:, -1])  # [B,horizon,3,H,W]
        return out

    def _decode(self, z: Tensor) -> Tensor:
        """Latents [*,C,h,w] -> frames [*,3,H,W] through the frozen VAE decoder."""
        lead = z.shape[:-3]
        x = self.vae.decode(z.reshape(-1, *z.shape[-3:]))
        return x.view(*lead, *x.shape[1:])
