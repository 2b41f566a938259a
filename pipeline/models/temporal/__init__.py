"""Temporal next-frame models, one module per architecture, selected by params `model.arch`.

`ARCHS` maps each name to its class; `build_temporal` builds one (unknown name -> ValueError listing
the choices). Every arch: forward(batch) -> dict of named predictions, loss(batch, out) -> dict
('total' + each named term), rollout(batch, horizon) -> {'frames' [B,horizon,3,H,W], 'collision'
[B,horizon], ...}, ttt_parameters(which) and ttt_loss(batch, kind). See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from pipeline.models.temporal.base import TemporalModel
from pipeline.models.temporal.clip_lstm import ClipLSTM
from pipeline.models.temporal.dual_vae import DualVAE
from pipeline.models.temporal.latent import LatentTransformer
from pipeline.models.temporal.latent_flow import LatentFlow
from pipeline.models.temporal.warp_occ import WarpOcc

ARCHS: dict[str, type[TemporalModel]] = {
    "clip_lstm": ClipLSTM,
    "latent": LatentTransformer,
    "latent_flow": LatentFlow,
    "warp_occ": WarpOcc,
    "dual_vae": DualVAE,
}

# archs that need the trained VAEs passed in (and hold them as frozen submodules)
NEEDS_VAE = {"latent", "latent_flow", "warp_occ", "dual_vae"}
NEEDS_FLOW_VAE = {"dual_vae"}


def _vae(value: Any, kind: str) -> nn.Module | None:
    """A VAE module from a module or its stored config dict (checkpoint reload)."""
    if value is None or isinstance(value, nn.Module):
        return value
    if isinstance(value, Mapping):
        if kind == "flow_vae":
            from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
            return FlowVAE(FlowVAEConfig(**value))
        from pipeline.models.vae import VAE, VAEConfig
        return VAE(VAEConfig(**value))
    raise TypeError(f"{kind} must be a module, a config dict or None, got {type(value).__name__}")


def build_temporal(arch: str | None, *, model, loss, frame_size, num_boxes: int, vae=None, flow_vae=None,
                   load_pretrained: bool = True) -> TemporalModel:
    """Build the temporal model `arch` (one of ARCHS); vae / flow_vae may be modules or config dicts.

    load_pretrained only concerns clip_lstm's image encoder (False when rebuilding from a checkpoint).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown temporal arch {arch!r}; choices: {', '.join(ARCHS)}")
    vae, flow_vae = _vae(vae, "vae"), _vae(flow_vae, "flow_vae")
    if arch in NEEDS_VAE and vae is None:
        raise ValueError(f"arch {arch!r} needs the trained frame VAE (vae=...)")
    if arch in NEEDS_FLOW_VAE and flow_vae is None:
        raise ValueError(f"arch {arch!r} needs the trained flow VAE (flow_vae=...)")
    kwargs = dict(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes, vae=vae, flow_vae=flow_vae)
    if arch == "clip_lstm":
        kwargs["load_pretrained"] = load_pretrained
    return ARCHS[arch](**kwargs)


def rebuild_temporal(model_args: dict, arch: str | None) -> TemporalModel:
    """The temporal model a checkpoint's model_args and arch describe (the checkpoint Builder)."""
    return build_temporal(arch, **model_args)  # clip_lstm's args say load_pretrained=False: weights come after


__all__ = ["ARCHS", "build_temporal", "rebuild_temporal", "TemporalModel", "ClipLSTM", "LatentTransformer", "LatentFlow", "WarpOcc",
           "DualVAE"]
