"""`clip_lstm`: pretrained image encoder -> ConvLSTM -> flow / residual / state / collision heads, no VAE.

Each frame is encoded (torchvision ResNet-18 up to layer2 or ViT-B/16 tokens, ImageNet weights from
the torch hub cache; a trainable CNN when those weights are not on disk or when asked for), a
ConvLSTM integrates the features over time and, after each frame t, predicts frame t+1 in pixel
space: a backward flow (at feature resolution, resized to the frame with resize_flow) warps frame
t, and a residual is added: x_hat_{t+1} = warp(x_t, flow) + residual. At rollout the predicted frame
is fed back through the encoder. Trained end to end on frames (L1), flow (EPE vs flow.h5), residual
(L1 vs x_{t+1} - warp(x_t, true flow)), collision (focal) and boxes (L1).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from pipeline.flow.ops import resize_flow, warp
from pipeline.losses import flow_epe, l1
from pipeline.clips import stack_frames, stack_windows
from pipeline.models.heads import CollisionHead, ConvLSTMCell, ResBlock, StateHead, group_norm, zero_init_
from pipeline.models.temporal.base import TemporalModel, ttt_targets
from pipeline.pretrained import hub_path, torchvision_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CNNEncoder(nn.Module):
    """Trainable conv encoder: frames [B,3,H,W] in [0,1] -> features [B,hidden,H/4,W/4]."""

    stride = 4

    def __init__(self, hidden: int):
        super().__init__()
        width = max(16, hidden // 2)
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), group_norm(width), nn.SiLU(),
                                 ResBlock(width, width),
                                 nn.Conv2d(width, hidden, 3, stride=2, padding=1), ResBlock(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2.0 - 1.0)


class ResNetEncoder(nn.Module):
    """torchvision ResNet-18 stem..layer2 (ImageNet-normalised input) -> [B,hidden,H/8,W/8]."""

    stride = 8

    def __init__(self, hidden: int):
        super().__init__()
        from torchvision.models import resnet18
        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.proj = nn.Conv2d(128, hidden, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_pretrained(self, state: dict) -> None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        self.backbone.load_state_dict(state, strict=False)

    def forward(self, x: Tensor) -> Tensor:
        b = self.backbone
        x = (x - self.mean) / self.std
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return self.proj(b.layer2(b.layer1(x)))


class ViTEncoder(nn.Module):
    """torchvision ViT-B/16 at the frame size (position embeddings interpolated) -> [B,hidden,H/16,W/16]."""

    stride = 16

    def __init__(self, hidden: int, frame_size: tuple[int, int]):
        super().__init__()
        from torchvision.models import vit_b_16
        H, W = frame_size
        if H != W or H % 16:
            raise ValueError(f"encoder vit_b_16 needs square frames divisible by 16, got {H}x{W}; use resnet18 or cnn")
        self.vit = vit_b_16(weights=None, image_size=H)
        self.vit.heads = nn.Identity()
        self.proj = nn.Conv2d(self.vit.hidden_dim, hidden, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_pretrained(self, state: dict) -> None:
        from torchvision.models.vision_transformer import interpolate_embeddings
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        state = interpolate_embeddings(self.vit.image_size, self.vit.patch_size, state)
        self.vit.load_state_dict(state, strict=False)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        tokens = self.vit._process_input((x - self.mean) / self.std)  # [B,n,D]
        tokens = torch.cat([self.vit.class_token.expand(B, -1, -1), tokens], dim=1)
        tokens = self.vit.encoder(tokens)[:, 1:]  # [B,n,D]
        grid = tokens.transpose(1, 2).reshape(B, -1, H // 16, W // 16)
        return self.proj(grid)


def build_encoder(name: str, *, hidden: int, frame_size: tuple[int, int], load_pretrained: bool
                  ) -> tuple[nn.Module, dict]:
    """Image encoder + a record {requested, used, pretrained, weights, reason} for the stage report.

    With load_pretrained, the ImageNet weights are read from the torch hub cache only when the file
    is already there (no download is attempted); otherwise the trainable CNN is used and the reason
    recorded. Without load_pretrained the named architecture is built untrained (checkpoint reload).
    """
    info = {"requested": name, "used": name, "pretrained": False, "weights": None, "reason": None}
    if name == "cnn":
        info["reason"] = "trainable CNN requested (model.encoder=cnn)"
        return CNNEncoder(hidden), info
    if name not in ("resnet18", "vit_b_16"):
        raise ValueError(f"unknown encoder {name!r}; choices: resnet18, vit_b_16, cnn")
    if load_pretrained:
        path = hub_path(name)
        if not path.is_file():
            info.update(used="cnn", reason=f"pretrained {name} weights not found at {path} (no download attempted); "
                                           f"using a trainable CNN encoder instead")
            return CNNEncoder(hidden), info
    encoder = ResNetEncoder(hidden) if name == "resnet18" else ViTEncoder(hidden, frame_size)
    if load_pretrained:
        state = torchvision_weights(name).get_state_dict(progress=False, check_hash=False, weights_only=True)
        encoder.load_pretrained(state)
        info.update(pretrained=True, weights=str(path))
    return encoder, info


class ClipLSTM(TemporalModel):
    """Encoder + ConvLSTM over frames; pixel-space warp + residual prediction of the next frame."""

    arch = "clip_lstm"

    def __init__(self, *, model, loss, frame_size, num_boxes: int, vae: nn.Module | None = None,
                 flow_vae: nn.Module | None = None, load_pretrained: bool = True):
        super().__init__(model=model, loss=loss, frame_size=frame_size, num_boxes=num_boxes)
        hid = self.model_cfg.hidden
        self.encoder, self.encoder_info = build_encoder(self.model_cfg.encoder, hidden=hid,
                                                        frame_size=self.frame_size, load_pretrained=load_pretrained)
        s = self.encoder.stride
        H, W = self.frame_size
        if H % s or W % s:
            raise ValueError(f"clip_lstm: frame size {H}x{W} must be divisible by the encoder stride {s}")
        self.stride, self.feat_size = s, (H // s, W // s)
        self.cell = ConvLSTMCell(hid, hid)
        self.flow_head = nn.Sequential(nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU(),
                                       zero_init_(nn.Conv2d(hid, 2, 3, padding=1)))
        # residual: features -> pixel shuffle to frame resolution, refined together with the warped frame
        up = 8
        self.residual_up = nn.Sequential(nn.Conv2d(hid, hid, 3, padding=1), nn.SiLU(),
                                         nn.Conv2d(hid, up * s * s, 1), nn.PixelShuffle(s))
        self.residual_out = nn.Sequential(nn.Conv2d(up + 3, 16, 3, padding=1), nn.SiLU(),
                                          zero_init_(nn.Conv2d(16, 3, 3, padding=1)))
        self.collision_head = CollisionHead(hid)
        self.state_head = StateHead(hid, num_boxes) if num_boxes else None

    def model_args(self) -> dict:
        """Rebuild args: the encoder actually used, built untrained (weights come from the checkpoint)."""
        args = super().model_args()
        args["model"]["encoder"] = self.encoder_info["used"]
        args["load_pretrained"] = False
        return args

    # ---- prediction -------------------------------------------------------------------------
    def step(self, frame: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[dict[str, Tensor], tuple]:
        """Consume frame t [B,3,H,W]; predict frame t+1 -> (outputs, new LSTM state)."""
        h, c = self.cell(self.encoder(frame), state)  # [B,hid,h',w'] x2
        flow = resize_flow(self.flow_head(h), self.frame_size)  # [B,2,H,W] pixels, t+1 -> t
        warped = warp(frame, flow)  # [B,3,H,W]
        residual = self.residual_out(torch.cat([self.residual_up(h), warped], dim=1))  # [B,3,H,W]
        out = {"frame": warped + residual, "warped": warped, "residual": residual, "flow": flow,
               "collision": self.collision_head(h)}
        if self.state_head is not None:
            out["boxes"] = self.state_head(h)
        return out, (h, c)

    def _run(self, frames: Tensor, steps: int) -> dict[str, Tensor]:
        """Teacher-forced over frames [B,n,...] (predicting frames 1..n), then `steps` more fed back.

        Returns the predictions of frames 1..n-1+steps, stacked on dim 1: [B,n-1+steps,...].
        """
        n = frames.shape[1]
        outs, state, x = [], None, frames[:, 0]
        for t in range(n - 1 + steps):
            o, state = self.step(x, state)
            outs.append(o)
            x = frames[:, t + 1] if t + 1 < n else o["frame"].clamp(0.0, 1.0)
        return {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training clip [B,c+R,...]: real frames 0..c-1 in, then R-1 predictions fed back.

        Outputs [B,c+R-1,...] are the predictions of frames 1..c+R-1 (the first c-1 teacher forced).
        """
        R = self._rollout_len(batch)
        return self._run(batch["frames"][:, :self.context], R)

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """frame L1, flow EPE, residual L1 (vs x_{t+1} - warp(x_t, true flow)), collision focal (+ state L1)."""
        self._require(batch, ["collision", "flow_bwd"], min_frames=self.context + 1)
        n = out["frame"].shape[1]
        frames = batch["frames"]
        flow_true = batch["flow_bwd"][:, :n]  # [B,n,2,H,W]
        with torch.no_grad():
            true_residual = frames[:, 1:n + 1] - warp(frames[:, :n], flow_true)
        terms = {
            "frame": l1(out["frame"], frames[:, 1:n + 1]),
            "flow": flow_epe(out["flow"], flow_true),
            "residual": l1(out["residual"], true_residual),
        }
        terms.update(self._aux_terms(batch, out, 1))
        return self._with_total(terms)

    def rollout(self, batch: Mapping[str, Tensor], horizon: int) -> dict[str, Tensor]:
        """Warm up on the last `context` frames, then predict `horizon` frames [B,horizon,3,H,W] in [0,1]."""
        self._check_rollout(batch, horizon)
        c = self.context
        out = self._run(batch["frames"][:, -c:], horizon)
        out = {k: v[:, c - 1:] for k, v in out.items()}
        out["frames"] = out.pop("frame").clamp(0.0, 1.0)
        return out

    def _ttt_flow_head(self) -> nn.Module:
        return self.flow_head

    def ttt_loss(self, batch: Mapping[str, Tensor], kind: str) -> Tensor:
        """'warp': frame t warped by the predicted flow vs t+1; 'full': predicted frame vs t+1 (context only)."""
        self._check_ttt_kind(kind)
        T = self._require(batch, ["frames"], min_frames=2)
        frames, c = batch["frames"], self.context
        targets = ttt_targets(T, c)
        windows = stack_windows(frames, targets, c)  # [n*B,c,3,H,W]
        out = self._run(windows, 1)  # predictions of window frames 1..c; the last is the target
        key = "warped" if kind == "warp" else "frame"
        return l1(out[key][:, -1], stack_frames(frames, targets))


__all__ = ["ClipLSTM", "build_encoder", "CNNEncoder", "ResNetEncoder", "ViTEncoder"]
