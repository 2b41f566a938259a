"""CLEVRER's on-disk layout and split selection, shared by the renderer, downloader and extract."""
from __future__ import annotations

from pathlib import Path

# CLEVRER's own splits and their video id ranges.
CLEVRER_SPLITS = {"train": range(0, 10000), "validation": range(10000, 15000), "test": range(15000, 20000)}
PER_FOLDER = 1000


def split_ids(videos: dict[str, int]) -> dict[str, tuple[str, list[int]]]:
    """Our split -> (CLEVRER split, video ids): train = first train ids, val = the train ids right after,
    test = first validation ids (CLEVRER's test split has no annotations)."""
    n_train, n_val, n_test = videos.get("train", 0), videos.get("val", 0), videos.get("test", 0)
    if n_train + n_val > len(CLEVRER_SPLITS["train"]) or n_test > len(CLEVRER_SPLITS["validation"]):
        raise ValueError(f"asked for {n_train}+{n_val} train/val and {n_test} test videos; CLEVRER has "
                         f"{len(CLEVRER_SPLITS['train'])} train and {len(CLEVRER_SPLITS['validation'])} validation")
    first_val = CLEVRER_SPLITS["validation"].start
    out = {"train": ("train", list(range(n_train))),
           "val": ("train", list(range(n_train, n_train + n_val))),
           "test": ("validation", list(range(first_val, first_val + n_test)))}
    return {k: v for k, v in out.items() if v[1]}


def _folder(prefix: str, video_id: int) -> str:
    lo = video_id // PER_FOLDER * PER_FOLDER
    return f"{prefix}_{lo:05d}-{lo + PER_FOLDER:05d}"


def video_relpath(clevrer_split: str, video_id: int) -> str:
    """videos/<split>/video_XXXXX-YYYYY/video_NNNNN.mp4"""
    return f"videos/{clevrer_split}/{_folder('video', video_id)}/video_{video_id:05d}.mp4"


def annotation_relpath(clevrer_split: str, video_id: int) -> str:
    """annotations/<split>/annotation_XXXXX-YYYYY/annotation_NNNNN.json"""
    return f"annotations/{clevrer_split}/{_folder('annotation', video_id)}/annotation_{video_id:05d}.json"


def gt_relpath(clevrer_split: str, video_id: int) -> str:
    """gt/<split>/gt_XXXXX-YYYYY/gt_NNNNN.npz (synthetic source only)."""
    return f"gt/{clevrer_split}/{_folder('gt', video_id)}/gt_{video_id:05d}.npz"


def proposal_relpath(video_id: int) -> str:
    """derender proposals (optional, real CLEVRER): proposals/proposal_NNNNN.json"""
    return f"proposals/proposal_{video_id:05d}.json"


def video_path(raw: str | Path, clevrer_split: str, video_id: int) -> Path:
    return Path(raw) / video_relpath(clevrer_split, video_id)


def annotation_path(raw: str | Path, clevrer_split: str, video_id: int) -> Path:
    return Path(raw) / annotation_relpath(clevrer_split, video_id)


def gt_path(raw: str | Path, clevrer_split: str, video_id: int) -> Path:
    return Path(raw) / gt_relpath(clevrer_split, video_id)
