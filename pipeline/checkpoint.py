"""Self-describing checkpoints: save atomically, load safely, rebuild a model from its own args.

A checkpoint is a plain dict (so `torch.load(weights_only=True)` can read it):
    {"format": 1, "kind": "vae" | "flow_vae" | "temporal" | ..., "model": state_dict,
     "model_args": plain dict of constructor args, "arch": str | None,
     "optimizer": state_dict | None, "step": int, "params": plain dict | None, ...extra}
Only dicts, lists, tuples, str, int, float, bool, None and tensors may be stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pipeline.io import atomic_path

FORMAT = 1
REQUIRED = ("kind", "model", "model_args")

Builder = Callable[[dict, "str | None"], nn.Module]  # (model_args, arch) -> untrained model, e.g. models.vae.build_vae


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, of the wrong kind or does not fit its model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def make_checkpoint(*, kind: str, model: nn.Module, model_args: dict, arch: str | None = None,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                    params: dict | None = None, **extra: Any) -> dict:
    """Assemble a checkpoint dict (tensors moved to CPU); `extra` must hold plain values only."""
    if not isinstance(model_args, dict):
        raise TypeError(f"model_args must be a plain dict, got {type(model_args).__name__}")
    ckpt = {
        "format": FORMAT,
        "kind": kind,
        "model": _to_cpu(unwrap(model).state_dict()),
        "model_args": dict(model_args),
        "arch": arch,
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "step": int(step),
        "params": params,
    }
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Write a checkpoint dict atomically (nothing under `path` unless complete)."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint for {path} lacks keys {missing}")
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | Path, *, kind: str | None = None, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with weights_only=True; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # an untrusted file can fail in any way (text: KeyError, truncated: RuntimeError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated, or holding objects "
                              f"that weights_only loading refuses): {_reason(e)}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a pipeline checkpoint; need keys {list(REQUIRED)}, found {found}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: checkpoint kind is {ckpt['kind']!r}, expected {kind!r}")
    return ckpt


def _reason(e: Exception) -> str:
    """One short line out of torch.load's (often multi-paragraph) error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("WeightsUnpickler error") and i + 1 < len(lines):
            return f"{ln} {lines[i + 1]}"[:300]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def model_from_checkpoint(ckpt: dict, build: Builder, *, path: str | Path = "<checkpoint>",
                          map_location: Any = "cpu") -> nn.Module:
    """Rebuild the model of a loaded checkpoint dict with `build(model_args, arch)`, load its weights, eval mode."""
    try:
        model = build(dict(ckpt["model_args"]), ckpt.get("arch"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the {ckpt['kind']} model from its stored args: {e}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['kind']} model built from its args: {e}") from None
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def load_model(path: str | Path, kind: str, build: Builder, *, map_location: Any = "cpu") -> nn.Module:
    """Read a checkpoint of `kind`, rebuild its model with `build` from its own args, load the weights, eval mode."""
    ckpt = load_checkpoint(path, kind=kind, map_location=map_location)
    return model_from_checkpoint(ckpt, build, path=path, map_location=map_location)
