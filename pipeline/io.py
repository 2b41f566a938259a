"""Atomic file outputs, JSON reports, run info kept out of outputs, and device selection shared by every stage."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` only if the block succeeds.

    Temporary siblings a killed run left behind (`.<name>.tmp-<pid>` of a process that is gone) are removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(final)
    os.replace(tmp, final)


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Delete `.<name>.tmp-<pid>` siblings of `final` whose process no longer runs; returns what was removed."""
    final = Path(final)
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class InputFileError(ValueError):
    """An input file of a stage that is missing or unreadable (the message names it and says what to re-run)."""


def open_h5(path: str | Path, *, what: str = "HDF5 file"):
    """h5py.File(path, "r") with errors that name the file: missing, truncated, not HDF5."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: {what} not found (run the stage that writes it)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputFileError(f"{path}: not a readable HDF5 file (truncated or corrupt? {e}); re-run the stage "
                             f"that writes it") from None


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """The stages' one log format, on stderr; level from $PIPELINE_LOG_LEVEL (default INFO; DEBUG, WARNING, ...)."""
    import logging

    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper(), format=LOG_FORMAT)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indent 2, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def split_run_info(report: dict) -> tuple[dict, dict]:
    """(report without its "run" entry, that entry): what a run took (time, bytes fetched) is logged, never
    written into a DVC output, so equal inputs give equal outputs."""
    report = dict(report)
    return report, report.pop("run", {}) or {}


def file_digest(path: str | Path, *, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes: md5 (what DVC hashes too) by default, e.g. to tie a resume to its data."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is False; use device=auto or cpu")
    return torch.device(name)
