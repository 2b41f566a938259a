"""The one training loop every training stage uses (frame VAE, flow VAE, temporal model).

What it does, in order: picks the device (CUDA with AMP bf16/fp16, else CPU fp32), joins a
torchrun/DDP group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), streams batches from a
Dataset through a DataLoader (bounded memory, `workers` processes), runs `loss_fn`, clips
gradients, follows a warm-up + cosine LR schedule, logs every named loss term with dvclive into
the stage's report dir, writes a resume checkpoint every `ckpt_every` steps and the final
checkpoint at the end (both atomically, rank 0 only).

Resume: the resume checkpoint is a hidden sibling of the final one (`models/.vae.pt.resume`), so
`dvc repro` (which deletes a stage's outs before running it) does not remove it; it is git-ignored
with models/*. It is used only when its fingerprint (kind, model args, train config, params,
dataset size, world size) matches the current run, and deleted once the final checkpoint is
written. Batches are a pure function of (seed, step): each epoch's order comes from a generator
seeded with seed + epoch, and the global torch RNG is re-seeded from (seed, step, shard) before
every micro-batch, so a resumed run sees the same batches and noise as an uninterrupted one.

DDP equivalence: a step's global batch (batch x accumulate x world samples, contiguous in the
epoch's permutation) is cut into world x accumulate shards of `batch`; shard s = rank * accumulate
+ k is rank `rank`'s k-th micro-batch, drawn with the RNG seeded from (seed, step, s), and the
gradient is the mean over shards. So N ranks with accumulate=1 compute the same update as one
process with accumulate=N (up to float summation order), sampling noise included; one process
with an N-times larger batch sees the same samples but draws its noise differently.
"""
from __future__ import annotations

import dataclasses
import logging
import hashlib
import inspect
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint, unwrap
from pipeline.distributed import barrier, init_distributed
from pipeline.io import resolve_device

LOG = logging.getLogger(__name__)

LossFn = Callable[..., dict]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int                 # per micro-batch and process; the global batch is batch * accumulate * world size
    lr: float
    seed: int = 0
    workers: int = 0           # DataLoader worker processes (0 = load in the main process)
    warmup: int = 100          # linear LR warm-up steps
    min_lr_ratio: float = 0.1  # cosine decays the LR to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    clip_grad: float = 1.0     # max global grad norm; 0 disables clipping
    ckpt_every: int = 500      # steps between resume checkpoints; 0 disables them
    log_every: int = 10        # steps between logged (averaged) metrics
    amp: bool = True           # mixed precision on CUDA (bf16 where supported, else fp16)
    accumulate: int = 1        # micro-batches per step and process (gradient accumulation)

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"TrainConfig: steps and batch must be >= 1, got steps={self.steps}, batch={self.batch}")
        if self.accumulate < 1:
            raise ValueError(f"TrainConfig: accumulate must be >= 1, got {self.accumulate}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if self.workers < 0 or self.warmup < 0 or self.ckpt_every < 0 or self.clip_grad < 0:
            raise ValueError(f"TrainConfig: workers, warmup, ckpt_every and clip_grad must be >= 0, got {self}")
        if self.log_every < 1:
            raise ValueError(f"TrainConfig: log_every must be >= 1, got {self.log_every}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainResult:
    model: nn.Module                  # the trained bare module (DDP unwrapped), on the training device
    step: int                         # steps done
    metrics: dict[str, float]         # last logged value of each metric
    seconds: float                    # wall time of this process's training (excludes earlier runs)
    resumed_from: int | None          # step a resume checkpoint was loaded at, else None
    history: list[dict] = dataclasses.field(default_factory=list)  # every logged row


# ---------------------------------------------------------------------------------------------
# reproducibility, schedule, sampling

def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators and ask for deterministic kernels (call before building a model).

    On CPU the same seed and thread count give bit-identical training (tests/test_reproducible.py). On CUDA
    some kernels have no deterministic version (scatter_add, used by pipeline.flow.ops.splat, sums with
    atomics): torch then warns instead of failing, and runs differ in the last bits of such sums.
    """
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _step_seed(seed: int, step: int, shard: int) -> int:
    return (seed * 1_000_003 + step * 101 + shard) % (2**63 - 1)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to config.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


class StepBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of indices that depend only on (seed, step, rank): resumable at any step.

    Each epoch is a permutation of the dataset (a generator seeded with seed + epoch) cut into
    global batches of batch * accumulate * world indices (the remainder is dropped). Global batch
    g holds world * accumulate contiguous shards of `batch`; this rank yields its shards
    rank * accumulate + k, k = 0..accumulate-1, in order. `start_step` skips the steps already done.
    """

    def __init__(self, size: int, batch: int, *, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 accumulate: int = 1):
        if not 0 <= rank < world or accumulate < 1:
            raise ValueError(f"StepBatchSampler: need 0 <= rank < world and accumulate >= 1, got rank={rank}, "
                             f"world={world}, accumulate={accumulate}")
        self.size, self.batch, self.seed, self.start_step = size, batch, seed, start_step
        self.rank, self.accumulate = rank, accumulate
        self.global_batch = batch * accumulate * world
        self.per_epoch = size // self.global_batch
        if self.per_epoch < 1:
            raise ValueError(f"dataset of {size} items is fewer than one batch of {self.global_batch} "
                             f"({batch} x accumulate {accumulate} x {world} processes); lower the batch size")

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start_step, self.per_epoch)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for g in range(skip, self.per_epoch):
                for k in range(self.accumulate):
                    start = g * self.global_batch + (self.rank * self.accumulate + k) * self.batch
                    yield order[start:start + self.batch]
            epoch, skip = epoch + 1, 0


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor / tuple / list / dict of tensors to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resume_path(checkpoint: str | Path) -> Path:
    """Where the resume checkpoint of a final checkpoint lives: models/vae.pt -> models/.vae.pt.resume."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f".{checkpoint.name}.resume")


def _fingerprint(**parts: Any) -> dict[str, str]:
    """A short hash per part of what defines a run (a resume is allowed only when every part matches)."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in sorted(parts.items())}


def _amp_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    if device.type != "cuda" or not config.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _takes_step(loss_fn: LossFn) -> bool:
    try:
        return "step" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# the loop

def train(model: nn.Module, dataset: Dataset, loss_fn: LossFn, *, config: TrainConfig,
          checkpoint: str | Path, kind: str, model_args: dict, arch: str | None = None,
          params: dict | None = None, report_dir: str | Path | None = None, device: str = "auto",
          collate_fn: Callable | None = None, callback: Callable[[int, nn.Module], None] | None = None,
          extra: dict | None = None, data_identity: dict | None = None) -> TrainResult:
    """Train `model` on `dataset` and write the final self-describing checkpoint to `checkpoint`.

    loss_fn(model, batch) -> dict, or loss_fn(model, batch, step=step) when it has a `step`
    parameter (e.g. for KL warm-up). `model` may be a DDP wrapper: call it, don't reach into it
    (use pipeline.checkpoint.unwrap for its methods). The dict has 'total' (the scalar to minimise)
    and any other named scalars, each logged as train/<name>. `callback(step_done, model)` runs
    after every step (rank-local; raising in it stops training, as an interruption would).
    `extra` (plain values) is stored in the final checkpoint. Logs go to `report_dir` via dvclive.
    `data_identity` (e.g. {file: content digest} of the inputs, pipeline.io.file_digest) joins the resume
    fingerprint, so a resume checkpoint of other data is discarded instead of continued.
    """
    rank, world, local_rank = init_distributed()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
    amp_dtype = _amp_dtype(dev, config)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    fingerprint = _fingerprint(kind=kind, model_args=model_args, arch=arch, config=dataclasses.asdict(config),
                               params=params, size=len(dataset), world=world, data=data_identity)
    resume = resume_path(checkpoint)
    start, history, resumed_from = 0, [], None
    if resume.is_file():
        try:
            state = load_checkpoint(resume, kind=kind, map_location=dev)
        except CheckpointError as e:
            state = None
            _say(rank, f"ignoring unreadable resume checkpoint ({e}); starting from step 0", level=logging.WARNING)
        if state is not None and state.get("fingerprint") == fingerprint:
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start, history, resumed_from = int(state["step"]), list(state.get("history", [])), int(state["step"])
            _say(rank, f"resuming {kind} training from {resume} at step {start}/{config.steps}")
        elif state is not None:
            old = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
            changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
            _say(rank, f"discarding {resume}: it belongs to another run ({', '.join(changed)} changed); "
                       f"starting from step 0", level=logging.WARNING)
            if rank == 0:
                resume.unlink(missing_ok=True)
    barrier()

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    live = _open_live(report_dir, history) if rank == 0 and report_dir is not None else None
    sampler = StepBatchSampler(len(dataset), config.batch, seed=config.seed, start_step=start, rank=rank, world=world,
                               accumulate=config.accumulate)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers, collate_fn=collate_fn,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    with_step = _takes_step(loss_fn)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    metrics = dict(history[-1]) if history else {}
    metrics.pop("step", None)
    t0 = time.perf_counter()
    ddp_model.train()
    batches = iter(loader)
    try:
        steps = tqdm(range(start, config.steps), desc=f"train {kind}", initial=start, total=config.steps,
                     disable=None if rank == 0 else True, leave=False)  # None: a bar on a terminal only
        for step in steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            terms: dict = {}
            for k in range(config.accumulate):  # micro-batch k is global shard rank * accumulate + k
                batch = to_device(next(batches), dev)
                torch.manual_seed(_step_seed(config.seed, step, rank * config.accumulate + k))
                last = k == config.accumulate - 1
                sync = nullcontext() if last or world == 1 else ddp_model.no_sync()  # all-reduce once per step
                with sync:
                    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        micro = loss_fn(ddp_model, batch, step=step) if with_step else loss_fn(ddp_model, batch)
                    if "total" not in micro:
                        raise KeyError(f"loss_fn must return a dict with 'total'; got keys {sorted(micro)}")
                    scaler.scale(micro["total"] / config.accumulate).backward()
                terms = micro if config.accumulate == 1 else _add_terms(terms, micro, config.accumulate)
            scaler.unscale_(optimizer)
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad) if config.clip_grad
                         else _grad_norm(model))
            scaler.step(optimizer)
            scaler.update()

            for name, value in terms.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                sums[name] = sums.get(name, 0) + value.to(dev)
            sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float().to(dev)
            count += 1
            done = step + 1

            if done % config.log_every == 0 or done == config.steps:
                metrics = _reduce_means(sums, count)
                bad = [k for k, v in metrics.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"{kind} training diverged before step {done}: non-finite {bad} "
                                             f"({metrics}); lower the lr or check the data")
                metrics["lr"] = lr
                steps.set_postfix(loss=f"{metrics.get('total', float('nan')):.4g}", refresh=False)
                history.append({"step": done, **metrics})
                if live is not None:
                    _log_row(live, history[-1])
                sums, count = {}, 0
            if config.ckpt_every and done % config.ckpt_every == 0 and done < config.steps:
                if rank == 0:
                    save_checkpoint(resume, make_checkpoint(
                        kind=kind, model=model, model_args=model_args, arch=arch, optimizer=optimizer,
                        step=done, params=params, scaler=scaler.state_dict(), history=history,
                        fingerprint=fingerprint))
                barrier()
            if callback is not None:
                callback(done, ddp_model)
    finally:
        del batches
        if live is not None:
            live.end()
    seconds = time.perf_counter() - t0

    if rank == 0:
        save_checkpoint(checkpoint, make_checkpoint(
            kind=kind, model=model, model_args=model_args, arch=arch, optimizer=optimizer, step=config.steps,
            params=params, metrics=metrics, history=history, torch_threads=torch.get_num_threads(),
            **(extra or {})))
        resume.unlink(missing_ok=True)
    barrier()
    return TrainResult(model=model, step=config.steps, metrics=metrics, seconds=seconds,
                       resumed_from=resumed_from, history=history)


def _add_terms(acc: dict, terms: dict, n: int) -> dict:
    """Running mean of the named loss terms over n micro-batches (detached)."""
    out = dict(acc)
    for name, value in terms.items():
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        out[name] = out.get(name, 0) + value / n
    return out


def _grad_norm(model: nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _reduce_means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Average the accumulated terms over steps and (under DDP) over ranks; one host sync."""
    names = sorted(sums)
    vec = torch.stack([sums[n] for n in names]) / count
    if dist.is_initialized():
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return {n: float(v) for n, v in zip(names, vec.tolist())}


def _open_live(report_dir: str | Path, history: list[dict]):
    """A fresh dvclive logger in report_dir, replaying rows logged before an interruption."""
    from dvclive import Live

    live = Live(str(report_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
    for row in history:
        _log_row(live, row)
    return live


def _log_row(live, row: dict) -> None:
    live.step = int(row["step"])
    for name, value in row.items():
        if name != "step":
            live.log_metric(name if name in ("lr", "grad_norm") else f"train/{name}", value)
    live.make_summary()


def _say(rank: int, message: str, *, level: int = logging.INFO) -> None:
    if rank == 0:
        LOG.log(level, message)
