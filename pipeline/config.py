"""Typed, validated params: one frozen dataclass per params.yaml section.

params.yaml is the one source of every default: the dataclasses have none, and a key missing from the
file is an error naming it. Longer than 400 lines on purpose: each section's fields sit next to the checks
that make its values valid, and splitting the sections apart would separate the cross-section checks in
`Params` from what they check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params file with an unknown key, a missing key or a bad value."""


@dataclass(frozen=True)
class Paths:
    raw: str
    frames: str
    flow: str
    latents: str
    predictions: str
    vae: str
    flow_vae: str
    temporal: str
    pretrained: str
    reports: str

    def report_dir(self, stage: str) -> Path:
        """Directory of one stage's report: reports/<stage>/."""
        return Path(self.reports) / stage


@dataclass(frozen=True)
class Videos:
    train: int
    val: int
    test: int

    def __post_init__(self):
        for split in ("train", "val", "test"):
            _check(getattr(self, split) >= 0, f"data.videos.{split}", getattr(self, split), "must be >= 0")
        _check(self.train > 0, "data.videos.train", self.train, "must be > 0")
        _check(self.test > 0, "data.videos.test", self.test, "must be > 0")


@dataclass(frozen=True)
class Clevrer:
    url: str
    proposals: bool

    def __post_init__(self):
        _check(self.url.startswith(("http://", "https://", "file://")), "data.clevrer.url", self.url,
               "must start with http://, https:// or file://")


@dataclass(frozen=True)
class Data:
    source: Literal["synthetic", "clevrer"]
    seed: int
    videos: Videos
    frames: int
    stride: int
    resolution: tuple[int, int]
    max_bad_fraction: float
    workers: int
    clevrer: Clevrer

    def __post_init__(self):
        _check(self.frames >= 2, "data.frames", self.frames, "must be >= 2")
        _check(self.stride >= 1, "data.stride", self.stride, "must be >= 1")
        _check(len(self.resolution) == 2 and all(r >= 8 for r in self.resolution), "data.resolution",
               self.resolution, "must be [height, width], each >= 8")
        _check(all(r % 8 == 0 for r in self.resolution), "data.resolution", self.resolution,
               "height and width must be divisible by 8 (the VAEs downsample by up to 8)")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction,
               "must be in [0, 1]")
        _check(self.workers >= 1, "data.workers", self.workers, "must be >= 1")

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> number of videos, in a fixed order, empty splits left out."""
        counts = {"train": self.videos.train, "val": self.videos.val, "test": self.videos.test}
        return {k: v for k, v in counts.items() if v > 0}


@dataclass(frozen=True)
class Synthetic:
    width: int
    height: int
    frames: int
    fps: int
    min_objects: int
    max_objects: int
    enter_fraction: float

    def __post_init__(self):
        _check(self.width >= 16 and self.height >= 16, "synthetic.width/height", (self.width, self.height),
               "must be >= 16")
        _check(self.width % 2 == 0 and self.height % 2 == 0, "synthetic.width/height", (self.width, self.height),
               "must be even (H.264 yuv420p)")
        _check(self.frames >= 2, "synthetic.frames", self.frames, "must be >= 2")
        _check(self.fps >= 1, "synthetic.fps", self.fps, "must be >= 1")
        _check(1 <= self.min_objects <= self.max_objects <= 10, "synthetic.min_objects/max_objects",
               (self.min_objects, self.max_objects), "need 1 <= min_objects <= max_objects <= 10")
        _check(0.0 <= self.enter_fraction <= 1.0, "synthetic.enter_fraction", self.enter_fraction,
               "must be in [0, 1]")


@dataclass(frozen=True)
class Flow:
    backend: Literal["raft_large", "raft_small", "dis", "gt"]
    fallback: Literal["dis", "gt"]
    num_updates: int
    cpu_raft: Literal["raft_large", "raft_small"]  # RAFT variant when running on CPU
    cpu_num_updates: int  # RAFT iterations when running on CPU
    batch: int
    dis_preset: Literal["ultrafast", "fast", "medium"]
    dis_scale: int  # DIS runs on frames upscaled by this factor (patches smaller than the objects)
    occ_alpha1: float
    occ_alpha2: float

    def __post_init__(self):
        _check(self.num_updates >= 1, "flow.num_updates", self.num_updates, "must be >= 1")
        _check(self.cpu_num_updates >= 1, "flow.cpu_num_updates", self.cpu_num_updates, "must be >= 1")
        _check(self.batch >= 1, "flow.batch", self.batch, "must be >= 1")
        _check(self.dis_scale in (1, 2, 3, 4), "flow.dis_scale", self.dis_scale, "valid: 1, 2, 3, 4")
        _check(self.occ_alpha1 >= 0, "flow.occ_alpha1", self.occ_alpha1, "must be >= 0")
        _check(self.occ_alpha2 > 0, "flow.occ_alpha2", self.occ_alpha2, "must be > 0")


@dataclass(frozen=True)
class VAE:
    latent_channels: int
    downsample: int
    hidden: int
    beta: float
    kl_warmup: int
    lr: float
    steps: int
    batch: int
    workers: int
    patch: int  # pixel-unshuffle stem: convs start at H/patch; must divide downsample
    res_blocks: int  # residual blocks per resolution level
    lr_warmup: int  # linear LR warm-up steps, then cosine decay
    clip_grad: float  # max gradient norm; 0 disables clipping
    ckpt_every: int  # steps between resume checkpoints; 0 disables them
    log_every: int  # steps between logged training metrics
    seed: int

    section: ClassVar[str] = "vae"  # the params.yaml section, for error messages

    def __post_init__(self):
        k = self.section
        _check(self.downsample in (1, 2, 4, 8), f"{k}.downsample", self.downsample, "valid: 1, 2, 4, 8")
        _check(self.patch in (1, 2, 4, 8) and self.downsample % self.patch == 0, f"{k}.patch", self.patch,
               f"valid: 1, 2, 4, 8 and dividing downsample ({self.downsample})")
        _check(self.latent_channels >= 1, f"{k}.latent_channels", self.latent_channels, "must be >= 1")
        _check(self.hidden >= 1, f"{k}.hidden", self.hidden, "must be >= 1")
        _check(self.res_blocks >= 0, f"{k}.res_blocks", self.res_blocks, "must be >= 0")
        _check(self.steps >= 1, f"{k}.steps", self.steps, "must be >= 1")
        _check(self.batch >= 1, f"{k}.batch", self.batch, "must be >= 1")
        _check(self.beta >= 0, f"{k}.beta", self.beta, "must be >= 0")
        _check(self.lr > 0, f"{k}.lr", self.lr, "must be > 0")
        for name in ("workers", "lr_warmup", "kl_warmup", "ckpt_every"):
            _check(getattr(self, name) >= 0, f"{k}.{name}", getattr(self, name), "must be >= 0")
        _check(self.clip_grad >= 0, f"{k}.clip_grad", self.clip_grad, "must be >= 0")
        _check(self.log_every >= 1, f"{k}.log_every", self.log_every, "must be >= 1")


@dataclass(frozen=True)
class FlowVAE(VAE):
    """flow_vae section: the VAE knobs plus the fixed flow normalisation."""
    flow_scale: float  # pixels; the network sees flow / flow_scale
    moving_weight: float  # EPE weight of moving pixels (|flow| > 0.5 px); static ones weigh 1

    section: ClassVar[str] = "flow_vae"

    def __post_init__(self):
        super().__post_init__()
        _check(self.flow_scale > 0, "flow_vae.flow_scale", self.flow_scale, "must be > 0")
        _check(self.moving_weight >= 1, "flow_vae.moving_weight", self.moving_weight, "must be >= 1")


@dataclass(frozen=True)
class Model:
    arch: Literal["clip_lstm", "latent", "latent_flow", "warp_occ", "dual_vae"]
    hidden: int
    context: int
    encoder: Literal["resnet18", "vit_b_16", "cnn"]
    decode: Literal["delta", "direct"]  # latent archs' frames: last frame + D(z_hat) - D(z_last), or D(z_hat)
    warp_space: Literal["pixel", "latent"]  # warp_occ: warp the last real frame (pixel) or the latent (latent)
    mask: Literal["learned", "ones"]  # warp_occ: the occlusion mask, or fixed at 1 (the ablation)
    fill: Literal["none", "extrap"]  # warp_occ (pixel): what shows where the mask is 0: nothing, or the fixed-field re-warp
    mask_steps: int  # warp_occ (pixel, fill extrap): steps the learned mask is used for, then 0 (the fill); 0 = every step
    dual_update: Literal["delta", "warp"]  # dual_vae: next appearance = last + delta, or last warped by the motion + delta

    def __post_init__(self):
        _check(self.hidden >= 1, "model.hidden", self.hidden, "must be >= 1")
        _check(self.context >= 1, "model.context", self.context, "must be >= 1")
        _check(self.mask_steps >= 0, "model.mask_steps", self.mask_steps, "must be >= 0 (0 = the mask at every step)")
        if self.mask_steps:
            pixel = self.arch == "warp_occ" and self.warp_space == "pixel" and self.fill == "extrap"
            _check(pixel, "model.mask_steps", self.mask_steps,
                   "needs model.arch=warp_occ, model.warp_space=pixel and model.fill=extrap (after mask_steps the "
                   f"prediction is the fill); got arch {self.arch}, warp_space {self.warp_space}, fill {self.fill}")


@dataclass(frozen=True)
class Loss:
    latent: float
    frame: float  # clip_lstm: pixel L1 of the predicted frame
    flow: float
    occ: float
    decode: float
    residual: float
    collision: float
    state: float
    appearance: float
    motion: float
    focal_alpha: float
    focal_gamma: float

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name) >= 0, f"loss.{f.name}", getattr(self, f.name), "must be >= 0")
        _check(self.focal_alpha <= 1, "loss.focal_alpha", self.focal_alpha, "must be in [0, 1]")


@dataclass(frozen=True)
class Train:
    steps: int
    lr: float
    batch: int
    rollout: int
    warmup: int  # linear LR warm-up steps, then cosine decay to lr/10
    clip_grad: float  # max gradient norm; 0 disables clipping
    ckpt_every: int  # steps between resume checkpoints; 0 disables them
    log_every: int  # steps between logged training metrics
    seed: int
    workers: int

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(self.batch >= 1, "train.batch", self.batch, "must be >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(self.rollout >= 1, "train.rollout", self.rollout, "must be >= 1")
        for name in ("warmup", "ckpt_every", "workers"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _check(self.clip_grad >= 0, "train.clip_grad", self.clip_grad, "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")


@dataclass(frozen=True)
class TTT:
    enabled: bool
    steps: int
    lr: float
    params: Literal["flow_head", "flow_bias", "all"]
    loss: Literal["warp", "full"]
    grad_clip: float  # max global gradient norm per TTT step (divergence guard)

    def __post_init__(self):
        _check(self.steps >= 0, "ttt.steps", self.steps, "must be >= 0")
        _check(self.lr > 0, "ttt.lr", self.lr, "must be > 0")
        _check(self.grad_clip > 0, "ttt.grad_clip", self.grad_clip, "must be > 0")


@dataclass(frozen=True)
class Eval:
    split: Literal["val", "test"]
    context: int
    horizon: int
    protocol: Literal["default", "slotformer"]
    lpips_net: Literal["alex", "vgg"]
    figures: int
    collision_threshold: float
    batch: int  # videos per forward pass in infer (rollouts without TTT, baselines)
    bootstrap: int  # bootstrap resamples of the videos for every interval
    confidence: float  # level of the intervals
    seed: int  # seed of the bootstrap draws

    def __post_init__(self):
        _check(self.context >= 2, "eval.context", self.context, "must be >= 2")
        _check(self.horizon >= 1, "eval.horizon", self.horizon, "must be >= 1")
        _check(self.figures >= 0, "eval.figures", self.figures, "must be >= 0")
        _check(0.0 <= self.collision_threshold <= 1.0, "eval.collision_threshold", self.collision_threshold,
               "must be a probability in [0, 1]")
        _check(self.batch >= 1, "eval.batch", self.batch, "must be >= 1")
        _check(self.bootstrap >= 100, "eval.bootstrap", self.bootstrap, "must be >= 100 resamples")
        _check(0.5 <= self.confidence < 1.0, "eval.confidence", self.confidence, "must be in [0.5, 1)")


@dataclass(frozen=True)
class Control:
    pairs: int  # (A, B) pairs of eval.split videos: A = video i, B = video i + 1 of the first `pairs`
    constant_flow: tuple[float, float]  # animate a still: constant motion (x right, y down), pixels per frame
    probe_videos: int  # train videos whose windows fit the leakage probes
    probe_ridge: float  # ridge penalty of the probes (standardised features)
    chroma: float  # object pixels of the colour histograms: max - min of RGB above this
    figures: int  # pairs drawn as strips and GIFs

    def __post_init__(self):
        _check(self.pairs >= 2, "control.pairs", self.pairs, "must be >= 2 (each video needs a partner)")
        _check(all(math.isfinite(v) for v in self.constant_flow), "control.constant_flow", list(self.constant_flow),
               "must be two finite numbers [dx, dy]")
        _check(self.probe_videos >= 1, "control.probe_videos", self.probe_videos, "must be >= 1")
        _check(self.probe_ridge >= 0, "control.probe_ridge", self.probe_ridge, "must be >= 0")
        _check(0.0 <= self.chroma < 1.0, "control.chroma", self.chroma, "must be in [0, 1)")
        _check(self.figures >= 0, "control.figures", self.figures, "must be >= 0")


@dataclass(frozen=True)
class Weights:
    download: bool  # fetch pretrained weights missing from the torch hub cache (the pretrained stage)
    url: str  # a mirror base for them (http(s):// or file://); "" = torchvision's own URLs

    def __post_init__(self):
        _check(self.url == "" or self.url.startswith(("http://", "https://", "file://")), "weights.url", self.url,
               'must be "" (torchvision\'s URLs) or start with http://, https:// or file://')


@dataclass(frozen=True)
class Params:
    paths: Paths
    device: Literal["auto", "cpu", "cuda"]
    weights: Weights
    data: Data
    synthetic: Synthetic
    flow: Flow
    vae: VAE
    flow_vae: FlowVAE
    model: Model
    loss: Loss
    train: Train
    ttt: TTT
    eval: Eval
    control: Control

    def __post_init__(self):
        _check(getattr(self.data.videos, self.eval.split) > 0, "eval.split", self.eval.split,
               f"data.videos.{self.eval.split} is 0: nothing to evaluate")
        needed = self.eval.context + self.eval.horizon
        _check(needed <= self.data.frames, "eval.context + eval.horizon", needed,
               f"must be <= data.frames ({self.data.frames})")
        _check(self.model.context <= self.eval.context, "model.context", self.model.context,
               f"must be <= eval.context ({self.eval.context})")
        for name in ("vae", "flow_vae"):
            down = getattr(self, name).downsample
            _check(all(r % down == 0 for r in self.data.resolution), f"{name}.downsample", down,
                   f"must divide data.resolution {list(self.data.resolution)}")
        if self.data.source == "synthetic":
            needed_native = (self.data.frames - 1) * self.data.stride + 1
            _check(self.synthetic.frames >= needed_native, "synthetic.frames", self.synthetic.frames,
                   f"must be >= (data.frames - 1) * data.stride + 1 = {needed_native}")
        if self.flow.backend == "gt" or self.flow.fallback == "gt":
            _check(self.data.source == "synthetic", "flow.backend/fallback", "gt",
                   "needs data.source=synthetic (real CLEVRER has no exact flow)")
        if self.eval.protocol == "slotformer":
            expected = {"data.resolution": (self.data.resolution, (64, 64)), "data.stride": (self.data.stride, 2),
                        "eval.context": (self.eval.context, 6)}
            wrong = [f"{k}={want} (got {got})" for k, (got, want) in expected.items() if got != want]
            _check(not wrong, "eval.protocol", "slotformer", "requires " + ", ".join(wrong))


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"bad param {key}={value!r}: {why}")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"bad param {where or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown param {', '.join(prefix + k for k in unknown)}; valid keys: {', '.join(valid)}")
    missing = [k for k in valid if k not in raw]
    if missing:
        raise ConfigError(f"missing param {', '.join(prefix + k for k in missing)} (params.yaml holds every default; "
                          f"there is no fallback in the code)")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"bad param {where}={value!r}; valid values: {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad param {where}={value!r}: expected a list")
        args = typing.get_args(hint)
        if len(args) != len(value):
            raise ConfigError(f"bad param {where}={value!r}: expected {len(args)} values")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"bad param {where}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"bad param {where}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad param {where}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"bad param {where}={value!r}: must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"bad param {where}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported param type {hint} at {where}")


def params_from_dict(raw: dict) -> Params:
    """Validate a params mapping (as in params.yaml) into Params."""
    try:
        return _build(Params, raw or {}, "")
    except TypeError as e:  # a dataclass validator compared incompatible values
        raise ConfigError(str(e)) from e


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj: Any) -> dict:
    """Params (or a section) as plain JSON-able dicts, e.g. for checkpoints and HDF5 attrs."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def params_hash(*sections: Any) -> str:
    """Short stable hash of some params sections, recorded in output attrs."""
    blob = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
