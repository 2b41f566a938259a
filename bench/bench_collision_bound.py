"""How high can collision AP go from the history alone? Classifiers on the renderer's exact 2D boxes.

Usage: python bench/bench_collision_bound.py [--split test] [--steps 3000] [--seed 0]

A diagnostic, not a method (synthetic data only: it reads the exact boxes frames.h5 stores for the
synthetic source). Every frame t >= model.context is scored, as the collision head is (the evaluation's
teacher-forced frames): "does a collision start at frame t?". Three scorers, none of which reads pixels:
- `gap_rule`: minus the smallest gap between two boxes (centre distance - mean half sizes), each box moved
  on from frame t-1 at its t-2 -> t-1 velocity; no learning.
- `tracks`: a small MLP over every pair of objects, fed their boxes in frames t-3..t-1 (gaps, closing speed,
  speeds, accelerations, the bottom-edge offset that stands for depth), trained on the train split with
  a frame's logit = logsumexp over its pairs (which pair collides is not stored).
- `tracks_and_frame_t`: the same with frame t's own boxes added, which no predictor of frame t may read:
  what an exact view of the answer's geometry gives.
Against them, the shipped model's head (data/predictions.h5, when it holds the same split). Intervals: 95 %
percentile bootstrap over videos (eval.bootstrap, eval.seed); the differences are paired on the same draws.
Writes bench/results/collision_bound.json.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import REPO, save  # noqa: E402

HISTORY = 3  # box frames t-3..t-1 the track features read


def pair_features(boxes: np.ndarray, mask: np.ndarray, first: int, *, with_frame_t: bool) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N,T,K,4] (x0,y0,x1,y1), mask [N,T,K] -> features [N,T-first,P,F] and valid [N,T-first,P]."""
    N, T, K, _ = boxes.shape
    if first < HISTORY:
        raise ValueError(f"the track features read {HISTORY} history frames: scored frames must start at >= "
                         f"{HISTORY}, got {first}")
    i, j = np.array(list(itertools.combinations(range(K), 2))).T  # [P] each
    centre, half, bottom = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2, boxes[..., 3]
    t = np.arange(first, T)

    def at(x: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:  # x [N,T,K,...] -> frame t-lag of i, of j
        return x[:, t - lag][:, :, i], x[:, t - lag][:, :, j]

    (ci1, cj1), (ci2, cj2), (ci3, cj3) = at(centre, 1), at(centre, 2), at(centre, 3)  # [N,S,P,2]
    hi, hj = at(half, 1)
    reach = hi + hj  # [N,S,P,2] the sum of half sizes per axis
    d1, d2, d3 = ci1 - cj1, ci2 - cj2, ci3 - cj3
    v1, v2 = d1 - d2, d2 - d3  # relative velocity, now and a frame before
    ahead = d1 + v1  # the offset at frame t if both keep moving
    norm = lambda x: np.linalg.norm(x, axis=-1)  # noqa: E731
    bi, bj = at(bottom, 1)
    cols = [norm(d1) - reach.mean(-1), norm(ahead) - reach.mean(-1), *np.moveaxis(np.abs(ahead) - reach, -1, 0),
            *np.moveaxis(np.abs(d1) - reach, -1, 0), (d1 * v1).sum(-1) / (norm(d1) + 1e-6), norm(v1), norm(v1 - v2),
            bi - bj, norm(ci1 - ci2), norm(cj1 - cj2), norm(ci1 - 2 * ci2 + ci3), norm(cj1 - 2 * cj2 + cj3),
            *np.moveaxis(reach, -1, 0)]
    valid = np.ones((N, len(t), len(i)), bool)
    for lag in range(1, HISTORY + 1):
        mi, mj = at(mask, lag)
        valid &= mi & mj
    if with_frame_t:
        ci0, cj0 = at(centre, 0)
        cols += [norm(ci0 - cj0) - reach.mean(-1), *np.moveaxis(np.abs(ci0 - cj0) - reach, -1, 0)]
        mi, mj = at(mask, 0)
        valid &= mi & mj
    return np.stack(cols, -1).astype(np.float32), valid


def gap_rule(boxes: np.ndarray, mask: np.ndarray, first: int) -> np.ndarray:
    """Scores [N,T-first]: minus the smallest extrapolated gap between two boxes (-1e3 with fewer than two)."""
    feats, valid = pair_features(boxes, mask, first, with_frame_t=False)
    gap = np.where(valid, feats[..., 1], np.inf).min(-1)  # column 1: |offset at t| - mean reach
    return np.where(np.isfinite(gap), -gap, -1e3)


class PairNet(nn.Module):
    """Pair features [B,P,F] -> frame logit [B]: an MLP per pair, logsumexp over the valid pairs."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.mlp = nn.Sequential(nn.Linear(mean.numel(), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = ((feats - self.mean) / self.std).clamp(-6, 6)
        return torch.logsumexp(self.mlp(x).squeeze(-1).masked_fill(~valid, -30.0), dim=-1)


def fit_pair_net(feats: np.ndarray, valid: np.ndarray, labels: np.ndarray, *, steps: int, seed: int) -> PairNet:
    """Train a PairNet on frames [M,P,F] with labels [M] (BCE, positives weighted 5x: ~3 % of frames)."""
    torch.manual_seed(seed)
    x, v, y = torch.from_numpy(feats), torch.from_numpy(valid), torch.from_numpy(labels.astype(np.float32))
    rows = x[v]
    net = PairNet(rows.mean(0), rows.std(0) + 1e-6)
    opt = torch.optim.Adam(net.mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (512,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx], v[idx]), y[idx], pos_weight=torch.tensor(5.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def ap_interval(scores: dict[str, np.ndarray], labels: np.ndarray, draws: np.ndarray, level: float,
                against: str | None) -> dict:
    """AP of each scorer ([N,S] per video and frame) with its bootstrap interval; minus `against`, paired."""
    from pipeline.metrics import average_precision

    def ap(s: np.ndarray, rows: np.ndarray) -> float:
        return average_precision(s[rows].ravel(), labels[rows].ravel())

    def interval(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.nanquantile(x, [(1 - level) / 2, (1 + level) / 2])  # a draw without events gives NaN
        return round(float(lo), 4), round(float(hi), 4)

    full = {k: ap(s, np.arange(len(labels))) for k, s in scores.items()}
    boot = {k: np.array([np.nan if (a := ap(s, d)) is None else a for d in draws], dtype=np.float64)
            for k, s in scores.items()}
    out = {}
    for k in scores:
        out[k] = dict(zip(("ap", "ap_lo", "ap_hi"), (round(full[k], 4), *interval(boot[k]))))
        if against is not None and k != against:
            out[k][f"minus_{against}"] = dict(zip(("ap", "lo", "hi"), (round(full[k] - full[against], 4),
                                                                     *interval(boot[k] - boot[against]))))
    return out


def main() -> None:
    from pipeline.config import load_params
    from pipeline.stats import resample_indices

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default=None, help="split to score (default: eval.split); train is the fit's")
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps of each pair classifier")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    p = load_params(REPO / "params.yaml")
    split = args.split or p.eval.split
    if split == "train":
        raise SystemExit("--split train: that is what the classifiers are fit on; score val or test")
    first = p.model.context  # the frames the collision head is scored on start here
    t0 = time.perf_counter()
    with h5py.File(REPO / p.paths.frames, "r") as f:
        if "boxes" not in f["train"]:
            raise SystemExit(f"{p.paths.frames} has no boxes (real CLEVRER): this diagnostic needs the synthetic source")
        data = {s: (f[s]["boxes"][:], f[s]["box_mask"][:].astype(bool), f[s]["collision"][:]) for s in ("train", split)}
    boxes, mask, collision = data[split]
    labels = collision[:, first:].astype(bool)  # [N,S]
    scores = {"gap_rule": gap_rule(boxes, mask, first)}
    for name, with_t in (("tracks", False), ("tracks_and_frame_t", True)):
        tb, tm, tc = data["train"]
        fx, fv = pair_features(tb, tm, first, with_frame_t=with_t)
        net = fit_pair_net(fx.reshape(-1, *fx.shape[2:]), fv.reshape(-1, fv.shape[-1]), tc[:, first:].ravel(),
                           steps=args.steps, seed=args.seed)
        ex, ev = pair_features(boxes, mask, first, with_frame_t=with_t)
        with torch.no_grad():
            scores[name] = net(torch.from_numpy(ex).flatten(0, 1), torch.from_numpy(ev).flatten(0, 1)).view(
                labels.shape).numpy()
    model_note = None
    with h5py.File(REPO / p.paths.predictions, "r") as f:
        held = f.attrs["split"]
        if held == split and "collision_teacher" in f["model"]:
            scores["model"] = f["model"]["collision_teacher"][:]
        else:
            model_note = f"{p.paths.predictions} holds split {held!r}, not {split!r}: the model is not compared"
    draws = resample_indices(len(labels), resamples=p.eval.bootstrap, seed=p.eval.seed)
    result = ap_interval(scores, labels, draws, p.eval.confidence, "model" if "model" in scores else None)
    for k, v in result.items():
        print(f"  {k}: AP {v['ap']:.3f} [{v['ap_lo']:.3f}, {v['ap_hi']:.3f}]", flush=True)
    out = save("collision_bound", {
        "split": split, "videos": int(labels.shape[0]), "frames": int(labels.size), "events": int(labels.sum()),
        "prevalence": round(float(labels.mean()), 4), "first_scored_frame": first, "history_frames": HISTORY,
        "fit": {"split": "train", "steps": args.steps, "seed": args.seed, "videos": int(data["train"][0].shape[0])},
        "scorers": result, "note": model_note, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
