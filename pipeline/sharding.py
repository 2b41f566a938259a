"""Per-video sharding of the flow and encode stages across torchrun ranks, and the merge into one HDF5.

Rank r of W takes videos r, r+W, r+2W, ... of every split and writes them, in that order, to a
hidden sibling of the output (`data/.flow.h5.shard-r`) together with their global indices
(`<split>/shard_rows`). Rank 0 then merges the shards into the output, atomically: every dataset
whose first axis is the split's videos is reassembled in global order, everything else (file and
group attributes) comes from shard 0. The merged file has the same bytes of data as a
single-process run's, so the stage's outputs do not depend on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline.distributed import barrier, gather_objects, init_distributed
from pipeline.io import atomic_path

ROWS = "shard_rows"  # per split group of a shard file: int64 [n] global video index of each row


class ShardError(ValueError):
    """Shard files that do not fit together (missing, overlapping or inconsistent rows)."""


@dataclass(frozen=True)
class Shard:
    """Videos rank `rank` of `world` processes: every world-th, starting at rank."""
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={self.rank}, world={self.world}")

    def videos(self, n: int) -> list[int]:
        """Global indices of this shard's videos among n."""
        return list(range(self.rank, n, self.world))

    @property
    def whole(self) -> bool:
        return self.world == 1


def shard_path(out: str | Path, rank: int) -> Path:
    """Where rank `rank` writes its part of `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}.shard-{rank}")


def write_rows(group: h5py.Group, shard: Shard, rows: list[int]) -> None:
    """Record a sharded group's global video indices (nothing for a whole, unsharded run)."""
    if not shard.whole:
        group.create_dataset(ROWS, data=np.asarray(rows, dtype=np.int64))


def merge_shards(parts: list[str | Path], out: str | Path) -> None:
    """Merge shard files (from `write_rows` runs) into one HDF5 at `out`, videos in global order."""
    parts = [Path(p) for p in parts]
    for p in parts:
        if not p.is_file():
            raise ShardError(f"{p}: shard file not found")
    files = [h5py.File(p, "r") for p in parts]
    try:
        first = files[0]
        with h5py.File(out, "w") as dst:
            dst.attrs.update(dict(first.attrs))
            for name, group in first.items():
                if not isinstance(group, h5py.Group):
                    raise ShardError(f"{parts[0]}: top-level {name!r} is not a split group")
                _merge_group(name, [f[name] if name in f else None for f in files], parts, dst)
    finally:
        for f in files:
            f.close()


def _merge_group(name: str, groups: list[h5py.Group | None], parts: list[Path], dst: h5py.File) -> None:
    for g, p in zip(groups, parts):
        if g is None or ROWS not in g:
            raise ShardError(f"{p}: split {name!r} {'missing' if g is None else f'has no {ROWS!r} dataset'}")
    rows = [g[ROWS][:] for g in groups]
    n = sum(len(r) for r in rows)
    seen = np.sort(np.concatenate(rows)) if n else np.zeros(0, np.int64)
    if not np.array_equal(seen, np.arange(n)):
        raise ShardError(f"{', '.join(map(str, parts))}: split {name!r} rows are not each of 0..{n - 1} exactly once")
    out = dst.create_group(name)
    out.attrs.update(dict(groups[0].attrs))
    for key, ds in groups[0].items():
        if key == ROWS:
            continue
        for g, p, r in zip(groups, parts, rows):
            if key not in g or g[key].shape[1:] != ds.shape[1:] or g[key].dtype != ds.dtype or g[key].shape[0] != len(r):
                raise ShardError(f"{p}: {name}/{key} is {g[key].dtype if key in g else 'missing'} "
                                 f"{g[key].shape if key in g else ''}, expected {ds.dtype} [{len(r)}, "
                                 f"{', '.join(map(str, ds.shape[1:]))}] to match {parts[0]}")
        chunks = ds.chunks if n and ds.chunks else None
        merged = out.create_dataset(key, shape=(n, *ds.shape[1:]), dtype=ds.dtype, chunks=chunks,
                                    compression=ds.compression if chunks else None,
                                    compression_opts=ds.compression_opts if chunks else None)
        merged.attrs.update(dict(ds.attrs))
        for g, r in zip(groups, rows):
            for local, row in enumerate(r):  # one video at a time: memory stays at one row
                merged[int(row)] = g[key][local]


def run_sharded(out: str | Path, work: Callable[[Path, Shard], dict]) -> list[dict] | None:
    """Run `work(path, shard)` on this rank's videos and merge all ranks' files into `out` atomically.

    Single process: `work` writes `out` (through a temp file) for every video. Under torchrun: each rank
    writes its shard, rank 0 merges. Returns every rank's report (rank order) on rank 0, None elsewhere.
    """
    rank, world, _ = init_distributed()
    if world == 1:
        with atomic_path(out) as tmp:
            return [work(tmp, Shard())]
    part = shard_path(out, rank)
    try:
        report = work(part, Shard(rank, world))
        reports = gather_objects(report)  # also: every rank's shard is complete from here on
        if rank == 0:
            with atomic_path(out) as tmp:
                merge_shards([shard_path(out, r) for r in range(world)], tmp)
        barrier()
    finally:
        part.unlink(missing_ok=True)
    return reports if rank == 0 else None
