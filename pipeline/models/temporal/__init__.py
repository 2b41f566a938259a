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
from pipeline.models.temporal.warp_occ_pixel import PixelWarpOcc

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


def arch_class(arch: str, model) -> type[TemporalModel]:
    """The class that implements `arch` with these model params (warp_occ: by model.warp_space)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown temporal arch {arch!r}; choices: {', '.join(ARCHS)}")
    warp_space = model["warp_space"] if isinstance(model, Mapping) else model.warp_space
    return PixelWarpOcc if arch == "warp_occ" and warp_space == "pixel" else ARCHS[arch]


def needs_vae(arch: str, model) -> tuple[bool, bool]:
    """(frame VAE, flow VAE): which trained VAEs `arch` with these model params is built on."""
    pixel = arch_class(arch, model) is PixelWarpOcc
    return arch in NEEDS_VAE and not pixel, arch in NEEDS_FLOW_VAE


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
    cls = arch_class(arch, model)
    vae, flow_vae = _vae(vae, "vae"), _vae(flow_vae, "flow_vae")
    want_vae, want_flow_vae = needs_vae(arch, model)
    if want_vae and vae is None:
        raise ValueError(f"arch {arch!r} needs the trained frame VAE (vae=...)")
    if want_flow_vae and flow_vae is None:
        raise ValueError(f"arch {arch!r} needs the trained flow VAE (flow_vae=...)")
    kwargs = dict(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes, vae=vae if want_vae else None,
                  flow_vae=flow_vae if want_flow_vae else None)
    if arch == "clip_lstm":
        kwargs["load_pretrained"] = load_pretrained
    return cls(**kwargs)


def rebuild_temporal(model_args: dict, arch: str | None) -> TemporalModel:
    """The temporal model a checkpoint's model_args and arch describe (the checkpoint Builder)."""
    return build_temporal(arch, **model_args)  # clip_lstm's args say load_pretrained=False: weights come after


__all__ = ["ARCHS", "arch_class", "needs_vae", "build_temporal", "rebuild_temporal", "PixelWarpOcc", "TemporalModel", "ClipLSTM", "LatentTransformer", "LatentFlow", "WarpOcc",
           "DualVAE"]
