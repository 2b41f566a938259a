"""DDP: a training stage under `torchrun --nproc_per_node 2` (gloo, CPU) matches one process with the same global batch.

How the loop makes that exact (pipeline/training.py): a step's global batch is cut into shards of
`batch`, shard s = rank * accumulate + k draws its noise from an RNG seeded with (seed, step, s), and
the gradient is the mean over shards. So 2 ranks x batch B == 1 process x batch B x accumulate 2, the
VAE's sampling noise included; 1 process x batch 2B sees the same samples with other noise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.common import copy_project
from helpers import override, squares_splits, tiny_params_dict, write_frames_h5
from pipeline.checkpoint import load_checkpoint, unwrap
from pipeline.config import load_params
from pipeline.models.vae import VAE, VAEConfig, frame_vae_loss
from pipeline.training import StepBatchSampler, TrainConfig, seed_everything, train

# global batch 8 = 2 ranks x 4; 10 steps; 4 train videos x 8 frames = 32 frames = 4 global batches per epoch
DDP_VAE = {"batch": 4, "steps": 10, "lr_warmup": 2, "kl_warmup": 4, "log_every": 5, "ckpt_every": 4, "seed": 3}
# Same samples, same per-shard noise, same update: only float summation order differs (gloo all-reduce vs
# accumulated .grad). Weights are compared through what the model computes (mu, logvar, decode(mu) on
# held-out frames), not entry by entry: a conv bias feeding a GroupNorm has a ~0 gradient, so Adam's
# g / sqrt(v) turns 1e-9 float noise there into lr-sized steps that change nothing the model outputs.
# Equal updates give output differences ~1e-6; half the global batch gives ~1e-1.
EXACT_TOL = 1e-4


def _outputs(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """mu, logvar and decode(mu) of frames x [B,3,H,W], flattened into one vector."""
    with torch.no_grad():
        mu, logvar = model.eval().encode(x)  # [B,C,h,w] x2
        return torch.cat([mu.flatten(), logvar.flatten(), model.decode(mu).flatten()])


def _max_diff(a: VAE, b: VAE, x: torch.Tensor) -> float:
    return (_outputs(a, x) - _outputs(b, x)).abs().max().item()


def test_shards_of_ranks_and_micro_batches_tile_the_same_global_batch():
    size, batch = 40, 4
    single = iter(StepBatchSampler(size, 2 * batch, seed=5))
    accum = iter(StepBatchSampler(size, batch, seed=5, accumulate=2))
    ranks = [iter(StepBatchSampler(size, batch, seed=5, rank=r, world=2)) for r in range(2)]
    for _ in range(12):  # 5 global batches per epoch: crosses two epochs
        whole = next(single)
        assert next(accum) + next(accum) == whole            # micro-batch k = shard k
        assert next(ranks[0]) + next(ranks[1]) == whole      # rank r = shard r
    both = iter(StepBatchSampler(size, 2, seed=5, rank=1, world=2, accumulate=2))
    resumed = iter(StepBatchSampler(size, 2, seed=5, rank=1, world=2, accumulate=2, start_step=3))
    micro = [next(both) for _ in range(2 * 6)]
    assert [next(resumed) for _ in range(6)] == micro[6:]  # resume skips whole steps (2 micro-batches each)
    with pytest.raises(ValueError, match="fewer than one batch of 48"):
        StepBatchSampler(40, 4, seed=0, world=4, accumulate=3)
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(40, 4, seed=0, rank=2, world=2)


def test_accumulation_equals_one_big_batch_for_a_deterministic_loss(tmp_path):
    """batch 3 x accumulate 2 == batch 6 when the loss draws no noise (the VAE's mean path)."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(24, 3, 16, 16, generator=g))
    cfg = VAEConfig(hidden=8, latent_channels=2, patch=2)

    def loss(model, batch):  # decode(mu): no sampling, so only the grouping of samples could differ
        x = batch[0]
        return {"total": (unwrap(model).decode(unwrap(model).encode(x)[0]) - x).abs().mean()}

    def run(name, **kw):
        seed_everything(0)
        config = TrainConfig(steps=6, lr=1e-2, warmup=1, ckpt_every=0, log_every=3, **kw)
        return train(VAE(cfg), data, loss, config=config, checkpoint=tmp_path / f"{name}.pt", kind="vae",
                     model_args=cfg.to_dict(), device="cpu")

    x = torch.rand(8, 3, 16, 16, generator=g)
    big, acc = run("big", batch=6), run("acc", batch=3, accumulate=2)
    assert _max_diff(big.model, acc.model, x) < EXACT_TOL
    assert [r["total"] for r in big.history] == pytest.approx([r["total"] for r in acc.history], abs=1e-6)
    half = run("half", batch=3)  # half the global batch: a different trajectory, so the check above can fail
    assert _max_diff(big.model, half.model, x) > 100 * EXACT_TOL
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(steps=1, batch=1, lr=1.0, accumulate=0)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_project")
    copy_project(root)
    raw = override(tiny_params_dict(), {"device": "cpu", "vae": DDP_VAE})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "data").mkdir(exist_ok=True)
    write_frames_h5(root / "data" / "frames.h5", squares_splits({"train": 4, "test": 2}, T=8, H=32, W=32))
    env = dict(os.environ, OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    return root, env


def _stage(root: Path, env: dict, nproc: int) -> subprocess.CompletedProcess:
    """Run train_vae as dvc.yaml does (`python -m pipeline.launch train_vae`) with PIPELINE_NPROC=nproc."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.launch", "train_vae"], cwd=root,
                          env=dict(env, PIPELINE_NPROC=str(nproc)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"train_vae failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _reference(root: Path, **changes) -> VAE:
    """The train_vae stage's model, data, loss and loop settings (pipeline.vae_training), trained in this process."""
    from pipeline.data.datasets import FrameDataset
    from pipeline.vae_training import train_config, vae_config

    params = load_params(root / "params.yaml")
    v, cfg = params.vae, vae_config(params)
    seed_everything(v.seed)
    config = dataclasses.replace(train_config(v), ckpt_every=0, **changes)
    out = root / "reference" / ("_".join(f"{k}{val}" for k, val in changes.items()) or "plain")
    result = train(VAE(cfg), FrameDataset(root / params.paths.frames, "train"),
                   lambda m, x, step: frame_vae_loss(m, x, beta=v.beta, warmup=v.kl_warmup, step=step),
                   config=config, checkpoint=out / "vae.pt", kind="vae", model_args=cfg.to_dict(), device="cpu")
    return result.model


@pytest.mark.slow
def test_train_vae_under_torchrun_matches_one_process_with_the_same_global_batch(project):
    root, env = project
    proc = _stage(root, env, 2)  # torchrun --standalone --nproc_per_node 2, through the environment switch
    assert proc.stderr.count("train_vae: test PSNR") == 1, proc.stderr  # only rank 0 reports (the stage log)
    ckpt = load_checkpoint(root / "models" / "vae.pt", kind="vae")
    assert ckpt["step"] == DDP_VAE["steps"] and ckpt["params"]["vae"]["batch"] == 4
    metrics = json.loads((root / "reports" / "vae" / "metrics.json").read_text())
    assert metrics["step"] == DDP_VAE["steps"] and (root / "reports" / "vae" / "figures" / "recon.png").is_file()
    assert not list((root / "models").glob(".*resume"))  # rank 0 removed its resume checkpoint
    ddp = VAE(VAEConfig(**ckpt["model_args"]))
    ddp.load_state_dict(ckpt["model"])

    torch.set_num_threads(1)
    exact = _reference(root, accumulate=2)   # one process, batch 4 x accumulate 2 = the global batch of 8
    big = _reference(root, batch=8)          # one process, batch 8: the same samples, the noise drawn differently
    half = _reference(root)                  # one process, batch 4: half the global batch (an unsynchronised rank)
    from pipeline.data.datasets import FrameDataset
    test = FrameDataset(root / "data" / "frames.h5", "test")
    x = torch.stack([test[i] for i in range(0, len(test), 2)])  # [8,3,32,32] held-out frames
    d_exact, d_big, d_half = (_max_diff(ddp, ref, x) for ref in (exact, big, half))
    print(f"after {DDP_VAE['steps']} steps, max |output(ddp) - output(one process)|: batch 4 x accumulate 2 "
          f"{d_exact:.2e}, batch 8 {d_big:.2e}, batch 4 {d_half:.2e}")
    assert d_exact < EXACT_TOL
    assert d_half > 100 * EXACT_TOL
