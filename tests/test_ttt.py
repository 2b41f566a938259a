"""Test-time training: adapts on context frames only, keeps the best weights, restores the trained ones."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import ToyTemporal, make_batch
from pipeline.clips import clip_slice
from pipeline.ttt import TTTAdapter


def context_slice(batch, n):
    return clip_slice(batch, 0, n, observed=True)


def test_clip_slice_cuts_frames_and_pairs():
    batch = make_batch(L=7)
    ctx = clip_slice(batch, 0, 4)
    assert ctx["frames"].shape[1] == 4 and ctx["collision"].shape[1] == 4
    assert ctx["flow_bwd"].shape[1] == 3 and ctx["occ"].shape[1] == 3
    torch.testing.assert_close(ctx["frames"], batch["frames"][:, :4])
    win = clip_slice(batch, 2, 5)
    torch.testing.assert_close(win["frames"], batch["frames"][:, 2:5])
    torch.testing.assert_close(win["flow_bwd"], batch["flow_bwd"][:, 2:4])


def test_observed_slice_drops_labels():
    observed = clip_slice(make_batch(L=7), 0, 4, observed=True)
    assert set(observed) == {"frames", "flow_bwd", "flow_fwd", "occ"}


def test_clip_slice_refuses_unknown_keys_and_bad_windows():
    batch = make_batch()
    with pytest.raises(ValueError, match="future_frames"):
        clip_slice({**batch, "future_frames": batch["frames"]}, 0, 3)
    with pytest.raises(ValueError, match="bad clip window"):
        clip_slice(batch, 3, 99)


def test_ttt_lowers_context_loss_and_restores_trained_weights():
    torch.manual_seed(0)
    model = ToyTemporal()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TTTAdapter(model, steps=15, lr=1e-2, params="flow_head", loss="full", grad_clip=1.0)
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
    trainer = TTTAdapter(model, steps=3, lr=1e-2, params="all", loss="full")
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
    trainer = TTTAdapter(model, steps=5, lr=50.0, params="all", loss="full", grad_clip=1.0)
    batch = context_slice(make_batch(B=1), 5)
    seen = []  # the context loss of every set of weights TTT evaluated (step k: after k updates)
    loss_fn = model.ttt_loss

    def recording(b, kind):
        loss = loss_fn(b, kind)
        seen.append(float(loss.detach()))
        return loss

    model.ttt_loss = recording
    stats = trainer.adapt(batch)
    model.ttt_loss = loss_fn
    # the exploding steps made it worse: the last weights are not the ones to keep (no restore would keep them)
    assert len(seen) == 6 and seen[-1] > 1.01 * stats.loss_after and stats.best_step < 5
    # the kept weights really are the best ones seen
    with torch.no_grad():
        assert float(model.ttt_loss(batch, "full")) == pytest.approx(stats.loss_after, rel=1e-5)
    trainer.reset()


def test_ttt_unsupported_arch_is_reported():
    trainer = TTTAdapter(ToyTemporal(flow_head=False), steps=3, lr=1e-3, params="flow_head")
    assert not trainer.supported and "no parameters" in trainer.reason
    with pytest.raises(RuntimeError):
        trainer.adapt(make_batch())


def test_ttt_rejects_foreign_parameters():
    model = ToyTemporal()
    stranger = nn.Parameter(torch.zeros(3))
    model.ttt_parameters = lambda which: [stranger]
    with pytest.raises(ValueError, match="not parameters of the model"):
        TTTAdapter(model, steps=1, lr=1e-3)


def test_ttt_reports_a_loss_that_ignores_the_adapted_params():
    model = ToyTemporal()
    model.ttt_loss = lambda batch, kind: (model.residual(batch["frames"][:, -1]) - batch["frames"][:, -1]).abs().mean()
    trainer = TTTAdapter(model, steps=2, lr=1e-2, params="flow_head")
    with trainer.adapted(context_slice(make_batch(B=1), 4)) as stats:
        assert stats.grad_norm == 0.0 and stats.loss_after == stats.loss_before
    with TTTAdapter(ToyTemporal(), steps=2, lr=1e-2).adapted(context_slice(make_batch(B=1), 4)) as stats:
        assert stats.grad_norm > 0
