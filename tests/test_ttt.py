"""Test-time training: adapts on context frames only, keeps the best weights, restores the trained ones."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.flow import warp
from pipeline.ttt import TestTimeTrainer, clip_slice, context_slice


class ToyTemporal(nn.Module):
    """A small real model implementing the temporal contract (rollout, ttt_parameters, ttt_loss).

    Next frame = warp(last frame, flow_head(last two frames)) + residual(last frame); collision logit from
    pooled features. It records every frame count and whether any input was non-finite, so tests can prove
    what TTT and the rollout were shown.
    """

    def __init__(self, context: int = 2, hidden: int = 8, flow_head: bool = True):
        super().__init__()
        self.context = context
        self.flow_head = nn.Sequential(nn.Conv2d(6, hidden, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(hidden, 2, 3, padding=1)) if flow_head else None
        self.residual = nn.Conv2d(3, 3, 3, padding=1)
        self.collision_head = nn.Linear(3, 1)
        self.seen_lengths: list[int] = []
        self.saw_nonfinite = False

    def _record(self, batch):
        frames = batch["frames"]
        self.seen_lengths.append(frames.shape[1])
        for v in batch.values():
            if v.is_floating_point() and not torch.isfinite(v).all():
                self.saw_nonfinite = True

    def step(self, prev, cur):
        """Predict the next frame from frames prev, cur [B,3,H,W] -> (frame, collision logit [B])."""
        nxt = cur
        if self.flow_head is not None:
            nxt = warp(cur, self.flow_head(torch.cat([prev, cur], dim=1)))
        nxt = (nxt + 0.1 * self.residual(cur)).clamp(0, 1)
        return nxt, self.collision_head(nxt.mean(dim=(-2, -1))).squeeze(-1)

    def rollout(self, batch, horizon):
        self._record(batch)
        frames = batch["frames"][:, : self.context]  # [B,context,3,H,W]
        prev, cur = frames[:, -2] if frames.shape[1] > 1 else frames[:, -1], frames[:, -1]
        out, logits = [], []
        for _ in range(horizon):
            nxt, logit = self.step(prev, cur)
            out.append(nxt)
            logits.append(logit)
            prev, cur = cur, nxt
        return {"frames": torch.stack(out, 1), "collision": torch.stack(logits, 1)}

    def ttt_parameters(self, which):
        if which == "all":
            return list(self.parameters())
        return None if self.flow_head is None else list(self.flow_head.parameters())

    def ttt_loss(self, batch, kind):
        self._record(batch)
        frames = batch["frames"]  # [B,T,3,H,W]
        preds = [self.step(frames[:, t - 2], frames[:, t - 1])[0] for t in range(2, frames.shape[1])]
        return (torch.stack(preds, 1) - frames[:, 2:]).abs().mean()


def make_batch(B=2, L=7, H=16, W=16, seed=0):
    """A clip batch with a square moving one pixel right per frame (keys as ClipDataset)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, L, 3, H, W, generator=g) * 0.1
    for t in range(L):
        frames[:, t, :, 4:9, 2 + t:7 + t] = 0.9
    return {"frames": frames, "collision": torch.zeros(B, L), "boxes": torch.zeros(B, L, 1, 4),
            "box_mask": torch.ones(B, L, 1), "flow_bwd": torch.zeros(B, L - 1, 2, H, W),
            "flow_fwd": torch.zeros(B, L - 1, 2, H, W), "occ": torch.ones(B, L - 1, 1, H, W),
            "video_index": torch.arange(B)}


def test_context_slice_cuts_frames_and_pairs():
    batch = make_batch(L=7)
    ctx = context_slice(batch, 4)
    assert ctx["frames"].shape[1] == 4 and ctx["collision"].shape[1] == 4
    assert ctx["flow_bwd"].shape[1] == 3 and ctx["occ"].shape[1] == 3
    torch.testing.assert_close(ctx["frames"], batch["frames"][:, :4])
    win = clip_slice(batch, 2, 5)
    torch.testing.assert_close(win["frames"], batch["frames"][:, 2:5])
    torch.testing.assert_close(win["flow_bwd"], batch["flow_bwd"][:, 2:4])


def test_context_slice_refuses_unknown_keys_and_bad_windows():
    batch = make_batch()
    with pytest.raises(ValueError, match="future_frames"):
        context_slice({**batch, "future_frames": batch["frames"]}, 3)
    with pytest.raises(ValueError, match="bad clip window"):
        clip_slice(batch, 3, 99)


def test_ttt_lowers_context_loss_and_restores_trained_weights():
    torch.manual_seed(0)
    model = ToyTemporal()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TestTimeTrainer(model, steps=15, lr=1e-2, params="flow_head", loss="full", grad_clip=1.0)
    assert trainer.supported and trainer.num_parameters == sum(p.numel() for p in model.flow_head.parameters())
    batch = make_batch(B=1)
    with trainer.adapted(context_slice(batch, 5)) as stats:
        assert stats.loss_after < stats.loss_before
        assert stats.steps == 15 and not stats.diverged
        adapted = model.flow_head[0].weight.clone()
        # only the flow head moved
        torch.testing.assert_close(model.residual.weight, trained["residual.weight"])
    assert not torch.equal(adapted, trained["flow_head.0.weight"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_ttt_never_sees_future_frames():
    model = ToyTemporal()
    trainer = TestTimeTrainer(model, steps=3, lr=1e-2, params="all", loss="full")
    batch = make_batch(B=1, L=7)
    batch["frames"][:, 5:] = float("nan")  # the frames to predict are poisoned
    batch["flow_bwd"][:, 4:] = float("nan")
    with trainer.adapted(context_slice(batch, 5)) as stats:
        out = model.rollout(context_slice(batch, 5), 2)
    assert math.isfinite(stats.loss_after) and not stats.diverged
    assert torch.isfinite(out["frames"]).all()
    assert not model.saw_nonfinite
    assert set(model.seen_lengths) == {5}


def test_ttt_keeps_best_weights_when_lr_explodes():
    torch.manual_seed(0)
    model = ToyTemporal()
    trainer = TestTimeTrainer(model, steps=5, lr=50.0, params="all", loss="full", grad_clip=1.0)
    batch = context_slice(make_batch(B=1), 5)
    stats = trainer.adapt(batch)
    assert stats.loss_after <= stats.loss_before
    # the kept weights really are the best ones seen
    with torch.no_grad():
        assert float(model.ttt_loss(batch, "full")) == pytest.approx(stats.loss_after, rel=1e-5)
    trainer.reset()


def test_ttt_unsupported_arch_is_reported():
    trainer = TestTimeTrainer(ToyTemporal(flow_head=False), steps=3, lr=1e-3, params="flow_head")
    assert not trainer.supported and "no parameters" in trainer.reason
    with pytest.raises(RuntimeError):
        trainer.adapt(make_batch())


def test_ttt_rejects_foreign_parameters():
    model = ToyTemporal()
    stranger = nn.Parameter(torch.zeros(3))
    model.ttt_parameters = lambda which: [stranger]
    with pytest.raises(ValueError, match="not parameters of the model"):
        TestTimeTrainer(model, steps=1, lr=1e-3)


def test_ttt_reports_a_loss_that_ignores_the_adapted_params():
    model = ToyTemporal()
    model.ttt_loss = lambda batch, kind: (model.residual(batch["frames"][:, -1]) - batch["frames"][:, -1]).abs().mean()
    trainer = TestTimeTrainer(model, steps=2, lr=1e-2, params="flow_head")
    with trainer.adapted(context_slice(make_batch(B=1), 4)) as stats:
        assert stats.grad_norm == 0.0 and stats.loss_after == stats.loss_before
    with TestTimeTrainer(ToyTemporal(), steps=2, lr=1e-2).adapted(context_slice(make_batch(B=1), 4)) as stats:
        assert stats.grad_norm > 0
