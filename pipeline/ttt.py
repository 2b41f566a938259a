"""Test-time training (TTT): adapt a temporal model to one video's context frames, roll out, reset.

DESIGN §7: per video, copy the trained weights, adapt the parameters `model.ttt_parameters(ttt.params)`
on the context frames only with `model.ttt_loss(context, ttt.loss)`, roll out, then restore the trained
weights before the next video. The model only ever receives the observed context
(`pipeline.clips.clip_slice(video, 0, context, observed=True)`), so a frame it has to predict cannot leak
into the adaptation. Divergence is guarded twice: gradients are clipped to
`ttt.grad_clip` and the weights with the lowest context loss seen (the trained ones included) are kept.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["TTTStats", "TTTAdapter"]


@dataclass(frozen=True)
class TTTStats:
    """One video's adaptation: context loss before and after (best kept), and what happened."""

    loss_before: float
    loss_after: float
    best_step: int       # 0 = the trained weights were already the best
    steps: int           # optimisation steps actually taken
    diverged: bool       # a non-finite loss stopped the adaptation early
    grad_norm: float     # gradient norm of the first step (0: the loss does not depend on the TTT params)
    seconds: float       # wall time of the adaptation (for the log's frames/s; not stored in outputs)


class TTTAdapter:
    """Adapts `model.ttt_parameters(which)` on context frames and restores the trained weights afterwards.

    `supported` is False (with `reason`) when the architecture has no TTT parameters; then `adapted()`
    must not be used and the caller reports TTT as skipped.
    """

    def __init__(self, model: nn.Module, *, steps: int, lr: float, params: str = "flow_head",
                 loss: str = "full", grad_clip: float = 1.0):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr <= 0 or grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be > 0, got lr={lr}, grad_clip={grad_clip}")
        self.model, self.steps, self.lr, self.which, self.loss_kind, self.grad_clip = (
            model, steps, lr, params, loss, grad_clip)
        found = model.ttt_parameters(params) if hasattr(model, "ttt_parameters") else None
        found = list(found) if found is not None else []
        self.params: list[nn.Parameter] = _unique(found)
        own = {id(p) for p in model.parameters()}
        strangers = [tuple(p.shape) for p in self.params if id(p) not in own]
        if strangers:
            raise ValueError(f"ttt_parameters({params!r}) returned tensors that are not parameters of the "
                             f"model: shapes {strangers}")
        self.supported = bool(self.params)
        self.reason = None if self.supported else (
            f"{type(model).__name__}.ttt_parameters({params!r}) returned no parameters "
            f"(this architecture has no head to adapt); TTT skipped")
        # The trained weights (every parameter and buffer), restored after each video.
        self._trained = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def num_parameters(self) -> int:
        """Number of scalar weights TTT adapts."""
        return sum(p.numel() for p in self.params)

    def reset(self) -> None:
        """Put the trained weights back (every parameter and buffer)."""
        with torch.no_grad():
            state = self.model.state_dict()
            for k, v in self._trained.items():
                state[k].copy_(v)

    def _objective(self, context: dict[str, Tensor]) -> Callable[[], Tensor]:
        """The context loss as a function of the current weights (the model's `ttt_objective` if it has one)."""
        if hasattr(self.model, "ttt_objective"):
            return self.model.ttt_objective(context, self.loss_kind, self.params)
        return lambda: self.model.ttt_loss(context, self.loss_kind)

    def _context_loss(self, objective: Callable[[], Tensor]) -> Tensor:
        loss = objective()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{type(self.model).__name__}.ttt_loss must return a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        return loss.reshape(())

    def adapt(self, context: dict[str, Tensor]) -> TTTStats:
        """Optimise the TTT parameters on `context` (context frames only) in place; keep the best weights."""
        if not self.supported:
            raise RuntimeError(self.reason)
        was_training = self.model.training
        flags = [p.requires_grad for p in self.params]
        self.model.eval()  # no dropout, no running-stat updates: only the chosen weights change
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(self.params, lr=self.lr)
        t0 = time.perf_counter()
        best, best_step, before, steps_taken, diverged = math.inf, 0, math.nan, 0, False
        first_norm = 0.0
        best_weights = [p.detach().clone() for p in self.params]
        try:
            with torch.enable_grad():
                objective = self._objective(context)
                for step in range(self.steps + 1):  # step k evaluates the weights after k updates
                    loss = self._context_loss(objective)
                    value = float(loss.detach())
                    if step == 0:
                        before = value
                    if not math.isfinite(value):
                        diverged = True
                        break
                    if value < best:
                        best, best_step = value, step
                        best_weights = [p.detach().clone() for p in self.params]
                    if step == self.steps:
                        break
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                    for p, g in zip(self.params, grads):
                        p.grad = torch.zeros_like(p) if g is None else g
                    norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                    if step == 0:
                        first_norm = float(norm)
                    if not torch.isfinite(norm):
                        diverged = True
                        break
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    steps_taken += 1
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, best_weights):
                    p.copy_(w)
                    p.grad = None
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)
            self.model.train(was_training)
        return TTTStats(loss_before=before, loss_after=best if math.isfinite(best) else before,
                        best_step=best_step, steps=steps_taken, diverged=diverged, grad_norm=first_norm,
                        seconds=time.perf_counter() - t0)

    @contextlib.contextmanager
    def adapted(self, context: dict[str, Tensor]) -> Iterator[TTTStats]:
        """`with trainer.adapted(context) as stats:` roll out inside; the trained weights return on exit."""
        try:
            yield self.adapt(context)
        finally:
            self.reset()


def _unique(params: list) -> list:
    seen, out = set(), []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"ttt_parameters must yield tensors, got {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
