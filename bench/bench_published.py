"""Published video-prediction architectures trained on the default run's frames under a stated CPU budget.

Usage: python bench/bench_published.py [--archs simvp,mvfn,convlstm] [--seconds 600 | --steps N] [--lr 1e-3]
                                       [--batch 16] [-S simvp.hid_temporal=64 ...] [--base DIR] [--name NAME]

For each arch of bench/published_models.py: train from scratch on the train split of the workspace's frames.h5
(frames only: these methods read no flow), on windows of eval.context + eval.horizon frames, pixel MSE on the
eval.horizon predicted frames (fed back, as at test time; ConvLSTM with scheduled sampling, the true frame fed
with a probability falling linearly from 1 to 0 over the first half), Adam, linear warm-up then cosine decay to
lr/10. With --seconds the step count is set from 10 timed steps of a throwaway copy so that training fills the
budget; the steps are recorded, and --steps N repeats the run exactly. Then every val and test video is scored as the evaluate
stage scores it (the first eval.context frames in, eval.horizon predicted, uint8 frames, PSNR / SSIM per step),
next to the workspace's temporal model (models/temporal.pt, the rollout infer makes, without TTT) and the
baselines, with paired bootstrap intervals over the same videos (eval.bootstrap, eval.seed). Both splits are
scored so that a config change (-S) is judged on val; the README reports test. Writes
bench/results/published[_NAME].json.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bench.common import REPO, parse_value, save, trained_temporal, val_videos  # noqa: E402
from bench.published_models import ARCHS  # noqa: E402

SPLITS = ("val", "test")


def build(arch: str, overrides: dict[str, str], *, context: int) -> torch.nn.Module:
    """The arch's model from its default config, `context` frames in, with `overrides` {field: value}."""
    if arch not in ARCHS:
        raise SystemExit(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SystemExit(f"{arch}: unknown config fields {unknown}; known: {sorted(fields)}")
    values = {k: parse_value(v) for k, v in overrides.items()}
    if "context" in fields:
        values.setdefault("context", context)
    return model_cls(config_cls(**values))


def lr_at(step: int, *, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def teacher_prob(step: int, *, steps: int) -> float:
    """Scheduled sampling: the chance a true frame is fed back, 1 -> 0 over the first half of training."""
    return max(0.0, 1.0 - step / max(1, steps // 2))


def sample_windows(videos: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch` random windows of `length` frames from uint8 videos [N,T,H,W,3] -> float [B,length,3,H,W]."""
    from pipeline.data.datasets import frames_to_tensor

    N, T = videos.shape[:2]
    if T < length:
        raise ValueError(f"videos have {T} frames, a training window needs {length}")
    v = rng.integers(0, N, size=batch)
    t0 = rng.integers(0, T - length + 1, size=batch)
    return frames_to_tensor(np.stack([videos[i, s:s + length] for i, s in zip(v, t0)]))


def _step(model, opt, clip: torch.Tensor, *, context: int, horizon: int, lr: float, prob: float,
          gen: torch.Generator) -> float:
    """One Adam step of pixel MSE on the horizon of clip [B,context+horizon,3,H,W]."""
    x, y = clip[:, :context], clip[:, context:]
    for group in opt.param_groups:
        group["lr"] = lr
    loss = F.mse_loss(model.rollout(x, horizon, y, teacher_prob=prob, generator=gen), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def steps_for(model: torch.nn.Module, videos: np.ndarray, seconds: float, *, context: int, horizon: int, batch: int,
              lr: float, probe: int = 10) -> tuple[int, float]:
    """How many training steps fill `seconds`, timed over `probe` steps of a throwaway copy of the model."""
    import copy

    trial = copy.deepcopy(model).train()
    opt = torch.optim.Adam(trial.parameters(), lr=lr)
    rng, gen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    _step(trial, opt, sample_windows(videos, batch, context + horizon, rng), context=context, horizon=horizon,
          lr=lr, prob=1.0, gen=gen)  # first-call allocations, untimed
    start = time.perf_counter()
    for _ in range(probe):
        _step(trial, opt, sample_windows(videos, batch, context + horizon, rng), context=context, horizon=horizon,
              lr=lr, prob=1.0, gen=gen)
    per_step = (time.perf_counter() - start) / probe
    return max(1, int(seconds / per_step)), per_step


def train(model: torch.nn.Module, videos: np.ndarray, *, context: int, horizon: int, batch: int, lr: float,
          seed: int, steps: int, warmup: int = 50, log=print) -> dict:
    """Train `model` for `steps` on random windows of `videos` [N,T,H,W,3]; a pure function of its arguments."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        clip = sample_windows(videos, batch, context + horizon, rng)  # [B,C+Hz,3,H,W]
        losses.append(_step(model, opt, clip, context=context, horizon=horizon,
                            lr=lr_at(step, steps=steps, lr=lr, warmup=warmup),
                            prob=teacher_prob(step, steps=steps), gen=gen))
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.5f}")
    model.eval()
    return {"steps": steps, "train_s": round(time.perf_counter() - start, 1),
            "loss_last_50": round(float(np.mean(losses[-50:])), 6)}


def frame_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """One video's rollout pred vs truth [Hz,3,H,W], scored on uint8 frames as the evaluate stage does."""
    from pipeline.data.datasets import frames_to_tensor
    from pipeline.metrics import psnr, ssim
    from pipeline.predictions import to_uint8

    if pred.shape != truth.shape or pred.dim() != 4:
        raise ValueError(f"frame_scores: pred {tuple(pred.shape)} and truth {tuple(truth.shape)} must both be [Hz,3,H,W]")
    pred = frames_to_tensor(to_uint8(pred))
    truth = frames_to_tensor(to_uint8(truth))
    per_step = psnr(pred, truth)  # [Hz]
    return {"psnr": float(per_step.mean()), "ssim": float(ssim(pred, truth).mean()),
            "psnr_step1": float(per_step[0])}


def summarize(scores: dict[str, list[dict]], *, reference: str, resamples: int, seed: int, level: float) -> dict:
    """Per method the mean score with its interval, and `reference` minus each method, paired over videos."""
    from pipeline.stats import bootstrap_mean, paired_difference, resample_indices

    n = len(scores[reference])
    draws = resample_indices(n, resamples=resamples, seed=seed)

    def fields(iv) -> dict:
        return {"mean": round(iv.mean, 4), "lo": round(iv.lo, 4), "hi": round(iv.hi, 4)}

    out = {"videos": n, "methods": {}, f"{reference}_minus": {}}
    for method, rows in scores.items():
        if len(rows) != n:
            raise ValueError(f"{method} was scored on {len(rows)} videos, {reference} on {n}")
        out["methods"][method] = {k: fields(bootstrap_mean([r[k] for r in rows], draws, level=level)) for k in rows[0]}
        if method != reference:
            out[f"{reference}_minus"][method] = {
                k: fields(paired_difference([r[k] for r in scores[reference]], [r[k] for r in rows], draws, level=level))
                for k in ("psnr", "ssim", "psnr_step1")}
    return out


def main() -> None:
    from pipeline.baselines import PREDICTORS
    from pipeline.clips import clip_slice
    from pipeline.config import load_params
    from pipeline.io import open_h5

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="simvp,mvfn,convlstm")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, help="training wall-clock budget per arch (default 600)")
    budget.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="ARCH.FIELD=VALUE", help="config override")
    ap.add_argument("--base", type=Path, default=REPO, help="run whose data/ and models/ to use (default: this repo)")
    ap.add_argument("--name", default="", help="suffix of the results file")
    args = ap.parse_args()
    if args.steps is None and args.seconds is None:
        args.seconds = 600.0

    p = load_params(REPO / "params.yaml")
    C, Hz = p.eval.context, p.eval.horizon
    overrides: dict[str, dict[str, str]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        arch, _, field = key.partition(".")
        overrides.setdefault(arch, {})[field] = value
    archs = args.archs.split(",")
    models = {a: build(a, overrides.get(a, {}), context=C) for a in archs}
    with open_h5(args.base / p.paths.frames, what="frames file") as f:
        train_videos = f["train"]["video"][:]  # [N,T,H,W,3] uint8
    base = args.base.resolve()
    result = {"base": str(base.relative_to(REPO)) if base.is_relative_to(REPO) else str(base), "archs": {}, "context": C, "horizon": Hz, "train_videos": int(train_videos.shape[0]), "lr": args.lr,
              "batch": args.batch, "seconds": args.seconds, "splits": {}}
    for arch, model in models.items():
        print(f"{arch}: {sum(q.numel() for q in model.parameters()):,} parameters")
        steps = args.steps
        if steps is None:
            steps, per_step = steps_for(model, train_videos, args.seconds, context=C, horizon=Hz, batch=args.batch,
                                        lr=args.lr)
            print(f"  {per_step:.3f} s/step: {steps} steps fill {args.seconds:.0f} s")
        run = train(model, train_videos, context=C, horizon=Hz, batch=args.batch, lr=args.lr, seed=p.train.seed,
                    steps=steps)
        result["archs"][arch] = {"config": dataclasses.asdict(model.config),
                                 "parameters": sum(q.numel() for q in model.parameters()), **run}
    temporal = trained_temporal(args.base, p)[1]
    mc = temporal.context
    for split in SPLITS:
        scores: dict[str, list[dict]] = {m: [] for m in ["model", *archs, *PREDICTORS]}
        with torch.no_grad():
            for _, observed, truth in val_videos(args.base, p, split=split):  # truth [1,Hz,3,H,W]
                n = observed["frames"].shape[1]
                preds = {"model": temporal.rollout(clip_slice(observed, n - mc, n), Hz)["frames"]}
                preds.update({a: models[a].rollout(observed["frames"], Hz) for a in archs})
                preds.update({name: fn(observed, Hz) for name, fn in PREDICTORS.items()})
                for method, pred in preds.items():
                    scores[method].append(frame_scores(pred[0], truth[0]))
        result["splits"][split] = summarize(scores, reference="model", resamples=p.eval.bootstrap, seed=p.eval.seed,
                                            level=p.eval.confidence)
        s = result["splits"][split]
        print(f"{split} ({s['videos']} videos): " + ", ".join(
            f"{m} {v['psnr']['mean']:.2f} dB" for m, v in s["methods"].items()))
        for m, d in s["model_minus"].items():
            print(f"  model - {m}: {d['psnr']['mean']:+.2f} [{d['psnr']['lo']:+.2f}, {d['psnr']['hi']:+.2f}] dB")
    print(f"wrote {save('published', result, suffix=args.name)}")


if __name__ == "__main__":
    main()
