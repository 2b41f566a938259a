"""The shared training loop and checkpoints: schedule, sampling, resume equality, DDP, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import TINY_VAE, tiny_vae_data, train_tiny_vae
from pipeline.checkpoint import (CheckpointError, load_checkpoint, load_model, make_checkpoint, save_checkpoint)
from pipeline.models.flow_vae import build_flow_vae
from pipeline.models.vae import build_vae
from pipeline.models.vae import VAE, VAEConfig
from pipeline.training import (StepBatchSampler, TrainConfig, lr_at, resume_path, seed_everything, train)

REPO = Path(__file__).resolve().parents[1]
CFG = VAEConfig(**TINY_VAE)


def _run(tmp, *, callback=None, **kw):
    return train_tiny_vae(tmp, callback=callback, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


class Interrupt(Exception):
    pass


def _stop_at(k):
    def callback(step, model):
        if step == k:
            raise Interrupt(f"simulated kill after step {step}")
    return callback


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, batch=1, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, cfg) == pytest.approx(0.1) and lrs[60] == pytest.approx(0.55)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps and batch"):
        TrainConfig(steps=0, batch=1, lr=1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(steps=1, batch=1, lr=0.0)


def test_step_batch_sampler_is_resumable_and_sharded():
    full = iter(StepBatchSampler(20, 4, seed=3))
    batches = [next(full) for _ in range(12)]  # 5 per epoch: crosses two epoch boundaries
    assert all(len(b) == 4 for b in batches)
    assert sorted(sum(batches[:5], [])) == list(range(20))  # one epoch = a permutation
    assert batches[:5] != batches[5:10]  # a new order each epoch
    resumed = iter(StepBatchSampler(20, 4, seed=3, start_step=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]
    r0, r1 = iter(StepBatchSampler(20, 4, seed=3, rank=0, world=2)), iter(StepBatchSampler(20, 4, seed=3, rank=1, world=2))
    b0, b1 = next(r0), next(r1)
    assert not set(b0) & set(b1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatchSampler(3, 4, seed=0)


def test_training_lowers_the_loss_and_logs_every_term(tmp_path):
    result = _run(tmp_path, steps=60, ckpt_every=0, lr=5e-3)
    rows = result.history
    assert rows[-1]["step"] == 60 and rows[-1]["total"] < 0.8 * rows[0]["total"]
    summary = json.loads((tmp_path / "reports" / "vae" / "metrics.json").read_text())
    assert summary["step"] == 60 and set(summary["train"]) == {"total", "l1", "kl", "kl_weight"}
    assert {"lr", "grad_norm"} <= set(summary)
    tsv = (tmp_path / "reports" / "vae" / "plots" / "metrics" / "train" / "total.tsv").read_text().splitlines()
    assert tsv[0] == "step\ttotal" and len(tsv) == 1 + 30
    ckpt = load_checkpoint(tmp_path / "models" / "vae.pt", kind="vae")
    assert ckpt["step"] == 60 and ckpt["model_args"] == CFG.to_dict() and ckpt["optimizer"]["state"]
    assert not resume_path(tmp_path / "models" / "vae.pt").exists()


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    reference = _run(tmp_path / "a")
    with pytest.raises(Interrupt):
        _run(tmp_path / "b", callback=_stop_at(7))
    ckpt = tmp_path / "b" / "models" / "vae.pt"
    assert not ckpt.exists() and resume_path(ckpt).is_file()
    assert load_checkpoint(resume_path(ckpt), kind="vae")["step"] == 6  # last multiple of ckpt_every
    resumed = _run(tmp_path / "b", seed_model=123)  # a different init: the weights must come from the checkpoint
    assert resumed.resumed_from == 6
    assert _same_weights(reference.model, resumed.model) == 0.0
    assert resumed.history == reference.history
    for rel in ("metrics.json", "plots/metrics/train/total.tsv", "plots/metrics/lr.tsv"):
        assert (tmp_path / "a" / "reports" / "vae" / rel).read_text() == (tmp_path / "b" / "reports" / "vae" / rel).read_text()
    assert not resume_path(ckpt).exists()


def test_resume_checkpoint_of_another_run_is_ignored(tmp_path):
    with pytest.raises(Interrupt):
        _run(tmp_path, callback=_stop_at(4))
    result = _run(tmp_path, lr=1e-3)  # params changed: must start over
    assert result.resumed_from is None
    fresh = _run(tmp_path / "fresh", lr=1e-3)
    assert _same_weights(result.model, fresh.model) == 0.0


@pytest.mark.slow
def test_hard_killed_process_resumes(tmp_path):
    """A subprocess that dies abruptly (os._exit) mid-run; the rerun resumes and matches."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch; torch.set_num_threads({torch.get_num_threads()})  # same numerics as this process
        import logging; logging.basicConfig(level=logging.INFO)  # the loop's messages, on stderr
        from helpers import train_tiny_vae
        kill = int(sys.argv[1])
        def die(step, model):
            if step == kill:
                os._exit(17)
        train_tiny_vae(Path(sys.argv[2]), callback=die if kill else None)
    """)
    (tmp_path / "job.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda kill, out: subprocess.run([sys.executable, str(tmp_path / "job.py"), str(kill), str(out)],
                                           env=env, capture_output=True, text=True, timeout=300)
    killed = run(8, tmp_path / "b")
    assert killed.returncode == 17, killed.stderr
    assert resume_path(tmp_path / "b" / "models" / "vae.pt").is_file()
    again = run(0, tmp_path / "b")
    assert again.returncode == 0 and "resuming vae training" in again.stderr, again.stderr
    reference = _run(tmp_path / "a")
    assert _same_weights(reference.model, load_model(tmp_path / "b" / "models" / "vae.pt", "vae", build_vae)) == 0.0


def test_nonfinite_loss_fails_clearly(tmp_path):
    def bad_loss(model, batch):
        return {"total": model(batch[0])[0].mean() * float("nan")}
    seed_everything(0)
    config = TrainConfig(steps=4, batch=6, lr=1e-3, log_every=2, ckpt_every=0)
    with pytest.raises(FloatingPointError, match="diverged before step 2"):
        train(VAE(CFG), tiny_vae_data(), bad_loss, config=config, checkpoint=tmp_path / "m.pt", kind="vae",
              model_args=CFG.to_dict(), device="cpu")
    assert not (tmp_path / "m.pt").exists()


def test_checkpoint_roundtrip_into_a_fresh_model(tmp_path):
    seed_everything(1)
    model = VAE(CFG)
    save_checkpoint(tmp_path / "vae.pt", make_checkpoint(kind="vae", model=model, model_args=CFG.to_dict(), step=5,
                                                          params={"vae": {"beta": 0.1}}))
    ckpt = torch.load(tmp_path / "vae.pt", weights_only=True)  # plain containers only
    assert ckpt["kind"] == "vae" and ckpt["step"] == 5 and ckpt["arch"] is None and ckpt["optimizer"] is None
    loaded = load_model(tmp_path / "vae.pt", "vae", build_vae)
    assert loaded.config == CFG and not loaded.training
    assert _same_weights(model, loaded) == 0.0
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(model.eval()(x)[0], loaded(x)[0])


def test_bad_checkpoints_name_the_file(tmp_path):
    path = tmp_path / "vae.pt"
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint not found"):
        load_model(path, "vae", build_vae)
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_model(path, "vae", build_vae)
    model = VAE(CFG)
    save_checkpoint(path, make_checkpoint(kind="vae", model=model, model_args=CFG.to_dict()))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_model(path, "vae", build_vae)
    save_checkpoint(path, make_checkpoint(kind="vae", model=model, model_args=CFG.to_dict()))
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint kind is 'vae', expected 'flow_vae'"):
        load_model(path, "flow_vae", build_flow_vae)
    torch.save({"weights": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a pipeline checkpoint"):
        load_model(path, "vae", build_vae)
    save_checkpoint(path, make_checkpoint(kind="vae", model=model, model_args={**CFG.to_dict(), "hidden": 32}))
    with pytest.raises(CheckpointError, match=f"{path}: weights do not fit"):
        load_model(path, "vae", build_vae)
    save_checkpoint(path, make_checkpoint(kind="vae", model=model, model_args={**CFG.to_dict(), "downsample": 3}))
    with pytest.raises(CheckpointError, match=f"{path}: cannot rebuild the vae model"):
        load_model(path, "vae", build_vae)


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "vae", "model": {}, "model_args": {}, "payload": Interrupt("x")}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with 2 gloo ranks: only rank 0 writes; the ranks end with identical weights."""
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        import torch.distributed as dist
        from helpers import train_tiny_vae
        out = Path(sys.argv[1])
        result = train_tiny_vae(out, steps=6)
        flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
        (out.parent / f"rank{{dist.get_rank()}}.ok").write_text("ok")  # a file per rank: stdout lines interleave
        dist.destroy_process_group()
    """)
    (tmp_path / "ddp.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "ddp.py"), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rank0.ok").is_file() and (tmp_path / "rank1.ok").is_file(), proc.stdout + proc.stderr
    assert load_checkpoint(tmp_path / "out" / "models" / "vae.pt", kind="vae")["step"] == 6
    assert json.loads((tmp_path / "out" / "reports" / "vae" / "metrics.json").read_text())["step"] == 6
