"""Real CLEVRER download: only the requested videos, read out of the official split zips with HTTP Range.

Official archives, relative to `data.clevrer.url` (http://data.csail.mit.edu/clevrer, see its README.txt):
`videos/<split>/video_<split>.zip` with members `video_XXXXX-YYYYY/video_NNNNN.mp4`,
`annotations/<split>/annotation_<split>.zip` with `annotation_XXXXX-YYYYY/annotation_NNNNN.json`, and
`derender_proposals.zip` with `derender_proposals/proposal_NNNNN.json`. Members are matched by file name,
so a different top folder inside an archive does not matter; they are written to our layout
(pipeline/data/layout.py), never to the path the archive names.

When the server honours HTTP Range, only the archive's tail (end of central directory), its central
directory and the requested members' local headers + data are fetched; members that sit next to each
other in the archive come in one request. Otherwise the whole archive is downloaded into the cache and
the requested members are extracted from it. Either way the raw bytes live in `cache_dir`, so an
interrupted download resumes where it stopped, and every member is checked against the central directory
(names, sizes, CRC-32) before it is renamed into place under `out_dir`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from tqdm import tqdm

from pipeline.config import Data
from pipeline.data import layout

VIDEO_ARCHIVES = {"train": "videos/train/video_train.zip",
                  "validation": "videos/validation/video_validation.zip",
                  "test": "videos/test/video_test.zip"}
ANNOTATION_ARCHIVES = {"train": "annotations/train/annotation_train.zip",
                       "validation": "annotations/validation/annotation_validation.zip"}
PROPOSAL_ARCHIVE = "derender_proposals.zip"

CHUNK = 1 << 16             # bytes per read / write
TIMEOUT = 60.0              # seconds per socket operation
_TAIL_PROBE = 16 * 1024     # first look at the archive's tail: the end records of a zip without a comment
_MAX_TAIL = 22 + 0xFFFF + 20 + 56  # end record + longest comment + ZIP64 locator and record
_SLACK = 1024               # local extra fields may be longer than the central ones
_MAX_GAP = 1 << 20          # members closer than this are fetched in one request
PARALLEL = 4                # concurrent Range requests for members that are far apart
_LOCK = threading.Lock()    # byte counters and progress bars shared by the fetch threads

_EOCD = struct.Struct("<4s4H2LH")       # end of central directory record, 22 bytes
_EOCD64_LOC = struct.Struct("<4sLQL")    # ZIP64 end of central directory locator, 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")    # ZIP64 end of central directory record, 56 bytes
_CDH = struct.Struct("<4s6H3L5H2L")      # central directory file header, 46 bytes
_LFH = struct.Struct("<4s5H3L2H")        # local file header, 30 bytes
_U32 = 0xFFFFFFFF


class DownloadError(RuntimeError):
    """A failed download or a bad archive; the message names the URL or file and the problem."""


class UnsafeArchiveError(DownloadError):
    """An archive member with an absolute path or a '..' component (zip-slip)."""


class _Interrupted(Exception):
    """A transfer that stopped early or a connection that failed: retried, and resumable from the cache."""


@dataclass(frozen=True)
class ZipEntry:
    """One central directory entry; `offset` is the absolute position of its local header."""
    name: str
    method: int
    flags: int
    crc: int
    csize: int
    usize: int
    offset: int
    header_hint: int  # local header size if its extra field is as long as the central one


@dataclass(frozen=True)
class ZipDirectory:
    """Where the central directory sits; `base` is the length of anything prepended to the zip data."""
    cd_start: int
    cd_size: int
    count: int
    base: int


def download_clevrer(out_dir: str | Path, *, data: Data, cache_dir: str | Path, retries: int = 3,
                     retry_wait: float = 2.0, progress: bool = True) -> dict:
    """Fetch the requested CLEVRER videos and annotations (and proposals) into `out_dir`; returns a report."""
    if retries < 0 or retry_wait < 0:
        raise ValueError(f"retries and retry_wait must be >= 0, got {retries}, {retry_wait}")
    t0 = time.time()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = data.clevrer.url.rstrip("/")
    plan = layout.split_ids(data.splits)
    archives = {}
    for rel, wanted in plan_members(plan, proposals=data.clevrer.proposals).items():
        archives[rel] = fetch_members(f"{base}/{rel}", wanted, out_dir=out_dir, cache_dir=cache_dir,
                                      retries=retries, retry_wait=retry_wait, progress=progress)
    run_keys = ("bytes_downloaded", "members_from_cache", "seconds")  # depend on the cache, not on the data
    return {
        "source": "clevrer",
        "url": base,
        "splits": {split: {"clevrer_split": cs, "count": len(ids), "first_id": ids[0], "last_id": ids[-1]}
                   for split, (cs, ids) in plan.items()},
        "proposals": data.clevrer.proposals,
        "archives": {rel: {k: v for k, v in a.items() if k not in run_keys} for rel, a in archives.items()},
        "files": sum(a["members"] for a in archives.values()),
        "run": {"bytes_downloaded": sum(a["bytes_downloaded"] for a in archives.values()),
                "seconds": round(time.time() - t0, 2),
                "archives": {rel: {k: a[k] for k in run_keys} for rel, a in archives.items()}},
    }


def plan_members(plan: dict[str, tuple[str, list[int]]], *, proposals: bool) -> dict[str, dict[str, str]]:
    """Archive (relative URL) -> {member file name: destination relative to the raw dir}."""
    out: dict[str, dict[str, str]] = {}
    for _split, (cs, ids) in plan.items():
        if cs not in ANNOTATION_ARCHIVES:
            raise ValueError(f"CLEVRER split {cs!r} has no annotations; only train and validation can be used")
        for i in ids:
            out.setdefault(VIDEO_ARCHIVES[cs], {})[f"video_{i:05d}.mp4"] = layout.video_relpath(cs, i)
            out.setdefault(ANNOTATION_ARCHIVES[cs], {})[f"annotation_{i:05d}.json"] = layout.annotation_relpath(cs, i)
            if proposals:
                out.setdefault(PROPOSAL_ARCHIVE, {})[f"proposal_{i:05d}.json"] = layout.proposal_relpath(i)
    return out


def fetch_members(url: str, wanted: dict[str, str], *, out_dir: Path, cache_dir: Path, retries: int = 3,
                  retry_wait: float = 2.0, progress: bool = True) -> dict:
    """Extract the members named in `wanted` (file name -> relpath) from the zip at `url` into `out_dir`."""
    t0 = time.time()
    if url.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        if not path.is_file():
            raise DownloadError(f"{url}: archive not found ({path})")
        _extract_from_file(path, wanted, out_dir=out_dir, where=url)
        return _archive_report(url, "local", path.stat().st_size, 0, len(wanted), 0, t0)

    cache = Path(cache_dir) / _cache_name(url)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache.with_name(cache.name + ".lock")):
        return _fetch_remote(url, wanted, cache, out_dir=out_dir, retries=retries, retry_wait=retry_wait,
                             progress=progress, t0=t0)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so that two processes never write the same cache at once."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_remote(url: str, wanted: dict[str, str], cache: Path, *, out_dir: Path, retries: int, retry_wait: float,
                  progress: bool, t0: float) -> dict:
    """fetch_members for an http(s) URL, with the archive's cache locked."""
    remote = _Remote(url)
    hint = f"partial data is kept in {cache}; rerun to resume"
    whole = cache / Path(urllib.parse.urlparse(url).path).name
    head = _retrying(remote.head, retries=retries, wait=retry_wait, hint="check the URL and the network")
    if any(v is not None for v in head.values()):  # validators: is the cache still this archive's?
        _check_cache(cache, {"url": url, **head})
        if whole.is_file():  # downloaded whole by an earlier run (a server without Range)
            return _from_whole(url, whole, wanted, out_dir, remote, cached=True, t0=t0)

    probe = _retrying(remote.probe, retries=retries, wait=retry_wait, hint="check the URL and the network")
    _check_cache(cache, {"url": url, "size": probe.size, "etag": probe.etag, "last_modified": probe.last_modified})
    if whole.is_file():
        probe.close()
        return _from_whole(url, whole, wanted, out_dir, remote, cached=True, t0=t0)
    if not probe.ranged:
        _say(f"{url}: the server does not honour HTTP Range; downloading the whole archive")
        first = [probe.response]  # the answer to the probe is already the whole archive: use it

        def whole_download() -> None:
            _download_whole(remote, whole, size=probe.size, progress=progress, resp=first.pop() if first else None)

        _retrying(whole_download, retries=retries, wait=retry_wait, hint=hint)
        return _from_whole(url, whole, wanted, out_dir, remote, cached=False, t0=t0)

    directory, cd = _retrying(lambda: _remote_directory(remote, probe, cache), retries=retries,
                              wait=retry_wait, hint=hint)
    entries = select_members(parse_central_directory(cd, directory, where=url), wanted, where=url)
    members_dir = cache / "members"
    members_dir.mkdir(parents=True, exist_ok=True)
    cached = sum((members_dir / key).is_file() for key in entries)
    todo = sum(e.csize - _size(members_dir / f"{key}.part") for key, e in entries.items()
               if not (members_dir / key).is_file())
    with tqdm(total=todo, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name,
              disable=not progress, file=sys.stderr) as bar:
        _retrying(lambda: _fetch_raw(remote, entries, members_dir, directory.cd_start, bar),
                  retries=retries, wait=retry_wait, hint=hint)
    for key, e in entries.items():
        raw = members_dir / key
        try:
            with open(raw, "rb") as src:
                _extract_member(src, e, out_dir, wanted[key], where=url)
        except DownloadError as err:
            raw.unlink(missing_ok=True)  # the next run fetches it again
            raise DownloadError(f"{err} (the cached copy {raw} was deleted; rerun to fetch it again)") from None
    return _archive_report(url, "range", probe.size, remote.bytes, len(entries), cached, t0)


def _from_whole(url: str, whole: Path, wanted: dict[str, str], out_dir: Path, remote: "_Remote", *, cached: bool,
                t0: float) -> dict:
    """Extract from a whole archive downloaded into the cache (now or by an earlier run)."""
    try:
        _extract_from_file(whole, wanted, out_dir=out_dir, where=f"{url} (cached as {whole})")
    except DownloadError:
        whole.unlink()  # a bad archive is not kept: the next run downloads it again
        raise
    return _archive_report(url, "full", whole.stat().st_size, remote.bytes, len(wanted),
                           len(wanted) if cached else 0, t0)


def _archive_report(url: str, mode: str, size: int | None, got: int, members: int, cached: int, t0: float) -> dict:
    return {"url": url, "mode": mode, "archive_bytes": size, "bytes_downloaded": got, "members": members,
            "members_from_cache": cached, "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------- zip structures

def find_directory(tail: bytes, tail_start: int, where: str) -> ZipDirectory | None:
    """Locate the central directory from the archive's last bytes (`tail` ends at the end of the file)."""
    i = tail.rfind(b"PK\x05\x06")
    while i >= 0:
        if i + _EOCD.size <= len(tail) and i + _EOCD.size + _EOCD.unpack_from(tail, i)[7] == len(tail):
            break
        i = tail.rfind(b"PK\x05\x06", 0, i)
    if i < 0:
        return None
    if i < _EOCD64_LOC.size + _EOCD64.size and tail_start > 0:
        return None  # the ZIP64 records would start before this tail: look at a longer one
    _sig, disk, cd_disk, _n_here, count, cd_size, cd_offset, _clen = _EOCD.unpack_from(tail, i)
    end_of_cd = tail_start + i
    loc = i - _EOCD64_LOC.size
    if loc >= 0 and tail[loc:loc + 4] == b"PK\x06\x07":  # ZIP64: the real values are in the ZIP64 record
        _sig, _disk64, _off64, n_disks = _EOCD64_LOC.unpack_from(tail, loc)
        j = loc - _EOCD64.size
        if j < 0 or tail[j:j + 4] != b"PK\x06\x06":
            raise DownloadError(f"{where}: bad zip: ZIP64 locator without a ZIP64 end of central directory record")
        (_sig, _rsize, _made, _need, disk, cd_disk, _n_here, count, cd_size, cd_offset) = _EOCD64.unpack_from(tail, j)
        disk = disk or (n_disks > 1)
        end_of_cd = tail_start + j
    if disk or cd_disk:
        raise DownloadError(f"{where}: multi-part (spanned) zip archives are not supported")
    base = end_of_cd - cd_size - cd_offset  # > 0 when something was prepended to the zip
    if base < 0:
        raise DownloadError(f"{where}: bad zip: the central directory (offset {cd_offset}, size {cd_size}) "
                            f"does not fit before its end record at byte {end_of_cd}")
    return ZipDirectory(cd_start=base + cd_offset, cd_size=cd_size, count=count, base=base)


def parse_central_directory(cd: bytes, directory: ZipDirectory, *, where: str) -> list[ZipEntry]:
    """Parse the central directory (ZIP64 aware); every entry's data must lie before the directory."""
    entries, pos = [], 0
    while pos < len(cd):
        if pos + _CDH.size > len(cd):
            raise DownloadError(f"{where}: bad zip: central directory truncated at byte {pos}")
        (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, nlen, xlen, clen, _disk, _iattr,
         _eattr, offset) = _CDH.unpack_from(cd, pos)
        if sig != b"PK\x01\x02":
            raise DownloadError(f"{where}: bad zip: no central directory header at byte {pos} of the directory")
        raw_name = cd[pos + _CDH.size:pos + _CDH.size + nlen]
        extra = cd[pos + _CDH.size + nlen:pos + _CDH.size + nlen + xlen]
        if len(raw_name) != nlen or len(extra) != xlen:
            raise DownloadError(f"{where}: bad zip: central directory truncated in entry {len(entries)}")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        usize, csize, offset = _zip64_sizes(extra, usize, csize, offset, where=f"{where}: member {name!r}")
        e = ZipEntry(name=name, method=method, flags=flags, crc=crc, csize=csize, usize=usize,
                     offset=directory.base + offset, header_hint=_LFH.size + nlen + xlen)
        if e.offset + _LFH.size + nlen + e.csize > directory.cd_start:
            raise DownloadError(f"{where}: bad zip: member {name!r} (offset {e.offset}, {e.csize} bytes) runs "
                                f"into the central directory at byte {directory.cd_start}")
        entries.append(e)
        pos += _CDH.size + nlen + xlen + clen
    if len(entries) != directory.count:
        raise DownloadError(f"{where}: bad zip: central directory has {len(entries)} entries, "
                            f"its end record says {directory.count}")
    return entries


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int | None, *, where: str) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF sizes/offset by their values from the ZIP64 extra field (id 1)."""
    need = [usize == _U32, csize == _U32, offset == _U32]
    if not any(need):
        return usize, csize, offset
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<2H", extra, pos)
        if tag == 1:
            values = list(struct.unpack_from(f"<{min(size // 8, 3)}Q", extra, pos + 4))
            out = [usize, csize, offset]
            for k in range(3):
                if need[k]:
                    if not values:
                        break
                    out[k] = values.pop(0)
            else:
                return out[0], out[1], out[2]
            break
        pos += 4 + size
    raise DownloadError(f"{where}: bad zip: sizes marked ZIP64 but no complete ZIP64 extra field")


def check_member_name(name: str, *, where: str) -> None:
    """Refuse a member whose name is absolute or climbs out with '..' (zip-slip)."""
    norm = name.replace("\\", "/")
    if "\x00" in name or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"{where}: refusing the archive: member {name!r} has an absolute path (zip-slip)")
    if ".." in norm.split("/"):
        raise UnsafeArchiveError(f"{where}: refusing the archive: member {name!r} has a '..' component (zip-slip)")


def select_members(entries: list[ZipEntry], wanted: dict[str, str], *, where: str) -> dict[str, ZipEntry]:
    """Check every member name, then find each wanted file name exactly once."""
    found: dict[str, ZipEntry] = {}
    for e in entries:
        check_member_name(e.name, where=where)
        key = e.name.replace("\\", "/").rsplit("/", 1)[-1]
        if key in wanted:
            if key in found:
                raise DownloadError(f"{where}: ambiguous archive: {found[key].name!r} and {e.name!r} are both {key}")
            found[key] = e
    missing = [k for k in wanted if k not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DownloadError(f"{where}: archive has no member {', '.join(missing[:5])}{more}")
    for key, e in found.items():
        if e.flags & 0x1:
            raise DownloadError(f"{where}: member {e.name!r} is encrypted")
        if e.method not in (0, 8):
            raise DownloadError(f"{where}: member {e.name!r} uses compression method {e.method}; "
                                f"only stored (0) and deflate (8) are supported")
    return {key: found[key] for key in wanted}


def _read_local_header(s: "_Stream", e: ZipEntry, *, cd_start: int, where: str, limit: int | None = None
                       ) -> int | None:
    """Read and check a member's local header from `s` (positioned on it); returns its data offset,
    or None when the header runs past byte `limit` (the end of what `s` holds)."""
    fixed = s.read(_LFH.size)
    sig, _ver, flags, method, _time, _date, crc, csize, usize, nlen, xlen = _LFH.unpack(fixed)
    if sig != b"PK\x03\x04":
        raise DownloadError(f"{where}: bad zip: no local header for member {e.name!r} at byte {e.offset}")
    data_offset = e.offset + _LFH.size + nlen + xlen
    if data_offset + e.csize > cd_start:
        raise DownloadError(f"{where}: bad zip: data of {e.name!r} (from byte {data_offset}, {e.csize} bytes) "
                            f"runs into the central directory at byte {cd_start}")
    if limit is not None and data_offset > limit:
        return None
    rest = s.read(nlen + xlen)
    name = rest[:nlen].decode("utf-8" if flags & 0x800 else "cp437")
    if name != e.name:
        raise DownloadError(f"{where}: bad zip: local header at byte {e.offset} names {name!r}, "
                            f"the central directory says {e.name!r}")
    if method != e.method or (flags & 0x1):
        raise DownloadError(f"{where}: bad zip: local header of {e.name!r} disagrees with the central directory "
                            f"(method {method} vs {e.method}, flags {flags:#x})")
    if not flags & 0x8:  # sizes and CRC are in the local header, not in a trailing data descriptor
        usize, csize, _ = _zip64_sizes(rest[nlen:], usize, csize, None, where=f"{where}: member {e.name!r}")
        if (crc, csize, usize) != (e.crc, e.csize, e.usize):
            raise DownloadError(f"{where}: bad zip: local header of {e.name!r} (crc {crc:#010x}, {csize} -> "
                                f"{usize} bytes) disagrees with the central directory (crc {e.crc:#010x}, "
                                f"{e.csize} -> {e.usize} bytes)")
    return data_offset


def _extract_member(src: BinaryIO, e: ZipEntry, out_dir: Path, relpath: str, *, where: str) -> Path:
    """Decompress `e.csize` bytes from `src` to out_dir/relpath, checking size and CRC; atomic."""
    root = out_dir.resolve()
    dest = (out_dir / relpath).resolve()
    if root not in dest.parents:
        raise UnsafeArchiveError(f"{where}: refusing to write {relpath!r} outside {out_dir}")
    what = f"{where}: member {e.name!r}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    inflate = zlib.decompressobj(-15) if e.method == 8 else None
    crc, size, left = 0, 0, e.csize
    try:
        with open(tmp, "wb") as f:
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise DownloadError(f"{what} is truncated: {e.csize - left} of {e.csize} bytes")
                left -= len(chunk)
                try:
                    out = inflate.decompress(chunk) if inflate else chunk
                except zlib.error as err:
                    raise DownloadError(f"{what}: corrupt deflate data ({err})") from None
                size += len(out)
                if size > e.usize:
                    raise DownloadError(f"{what} expands beyond the {e.usize} bytes its central directory declares")
                crc = zlib.crc32(out, crc)
                f.write(out)
            if inflate:
                tail = inflate.flush()
                size, crc = size + len(tail), zlib.crc32(tail, crc)
                f.write(tail)
                if not inflate.eof or inflate.unused_data:
                    raise DownloadError(f"{what}: deflate stream does not end where the central directory says "
                                        f"({e.csize} compressed bytes)")
        if size != e.usize:
            raise DownloadError(f"{what}: size mismatch: {size} bytes, the central directory says {e.usize}")
        if crc != e.crc:
            raise DownloadError(f"{what}: corrupt data: CRC-32 {crc:#010x}, the central directory says {e.crc:#010x}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _extract_from_file(path: Path, wanted: dict[str, str], *, out_dir: Path, where: str) -> None:
    """Extract the wanted members from a zip on disk, with the same checks as for remote archives."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        tail_start = max(0, size - _MAX_TAIL)
        f.seek(tail_start)
        directory = find_directory(f.read(), tail_start, where)
        if directory is None:
            raise DownloadError(f"{where}: not a zip file (no end of central directory record)")
        f.seek(directory.cd_start)
        cd = f.read(directory.cd_size)
        if len(cd) != directory.cd_size:
            raise DownloadError(f"{where}: bad zip: central directory truncated")
        entries = select_members(parse_central_directory(cd, directory, where=where), wanted, where=where)
        for key, e in entries.items():
            f.seek(e.offset)
            try:
                _read_local_header(_Stream(f, e.offset, where), e, cd_start=directory.cd_start, where=where)
            except _Interrupted:
                raise DownloadError(f"{where}: bad zip: local header of {e.name!r} is truncated") from None
            _extract_member(f, e, out_dir, wanted[key], where=where)


# ----------------------------------------------------------------------------- HTTP

@dataclass(frozen=True)
class _Probe:
    ranged: bool
    size: int | None
    tail: bytes
    tail_start: int
    etag: str | None
    last_modified: str | None
    response: http.client.HTTPResponse | None = None  # the whole archive, when Range is not honoured

    def close(self) -> None:
        if self.response is not None:
            self.response.close()


class _NoHead(Exception):
    """The server does not allow HEAD."""


def _length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


class _Stream:
    """Exact reads from a response or file; a short read raises _Interrupted naming the URL and position."""

    def __init__(self, fp: BinaryIO, pos: int, where: str, counter: Callable[[int], None] | None = None):
        self.fp, self.pos, self.where, self.counter = fp, pos, where, counter

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self._read(min(CHUNK, n - got))
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def skip_to(self, pos: int) -> None:
        if pos < self.pos:
            raise DownloadError(f"{self.where}: bad zip: overlapping members at byte {pos}")
        while self.pos < pos:
            self._read(min(CHUNK, pos - self.pos))

    def drain(self, end: int) -> None:
        """Read the rest of a response up to `end` (so the byte count is what was sent); errors are moot."""
        try:
            self.skip_to(end)
        except _Interrupted:
            pass

    def copy(self, f: BinaryIO, n: int, bar: tqdm | None = None) -> None:
        while n:
            chunk = self._read(min(CHUNK, n))
            f.write(chunk)
            n -= len(chunk)
            if bar is not None:
                with _LOCK:
                    bar.update(len(chunk))

    def _read(self, n: int) -> bytes:
        try:
            chunk = self.fp.read(n)
        except (http.client.HTTPException, OSError) as err:
            raise _Interrupted(f"{self.where}: transfer interrupted at byte {self.pos} ({type(err).__name__}: {err})")
        if not chunk:
            raise _Interrupted(f"{self.where}: transfer ended early at byte {self.pos}")
        self.pos += len(chunk)
        if self.counter:
            self.counter(len(chunk))
        return chunk


class _Remote:
    """One archive URL: GET with optional Range, counting the bytes received."""

    def __init__(self, url: str):
        self.url, self.bytes, self.size = url, 0, None

    def _count(self, n: int) -> None:
        with _LOCK:
            self.bytes += n

    def get(self, byte_range: str | None = None, *, method: str = "GET") -> http.client.HTTPResponse:
        headers = {"User-Agent": "clevrer-pipeline/1.0", "Accept-Encoding": "identity"}
        if byte_range:
            headers["Range"] = f"bytes={byte_range}"
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url, headers=headers, method=method),
                                          timeout=TIMEOUT)
        except urllib.error.HTTPError as err:
            err.close()
            if method == "HEAD" and err.code in (405, 501):
                raise _NoHead() from None
            if err.code >= 500:
                raise _Interrupted(f"{self.url}: HTTP {err.code} {err.reason}") from None
            if err.code == 416:
                raise DownloadError(f"{self.url}: HTTP 416 range {byte_range} not satisfiable; the archive on the "
                                    f"server is shorter than expected") from None
            raise DownloadError(f"{self.url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            raise _Interrupted(f"{self.url}: cannot connect ({reason})") from None

    def head(self) -> dict:
        """Size and validators (ETag, Last-Modified) of the archive, None where the server does not say."""
        try:
            with self.get(method="HEAD") as resp:
                return {"size": _length(resp), "etag": resp.headers.get("ETag"),
                        "last_modified": resp.headers.get("Last-Modified")}
        except _NoHead:
            return {"size": None, "etag": None, "last_modified": None}

    def probe(self) -> _Probe:
        """Ask for the archive's tail with a suffix Range: tells whether Range works, and the size.
        Without Range the server answers with the whole archive: that response is handed on, open."""
        resp = self.get(f"-{_TAIL_PROBE}")
        etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        if resp.status == 206:
            with resp:
                start, end, total = _content_range(resp, self.url)
                if total is None or end != total - 1:
                    raise DownloadError(f"{self.url}: asked for the last {_TAIL_PROBE} bytes, the server sent "
                                        f"{start}-{end} of {total}")
                self.size = total
                tail = _Stream(resp, start, self.url, self._count).read(end - start + 1)
                return _Probe(True, total, tail, start, etag, modified)
        return _Probe(False, _length(resp), b"", 0, etag, modified, resp)

    def open_range(self, start: int, end: int) -> tuple[http.client.HTTPResponse, _Stream]:
        """GET bytes start..end (inclusive); the server must answer exactly that range."""
        resp = self.get(f"{start}-{end}")
        try:
            if resp.status != 206:
                raise DownloadError(f"{self.url}: asked for bytes {start}-{end}, the server answered HTTP "
                                    f"{resp.status} without a range (it stopped honouring HTTP Range)")
            got = _content_range(resp, self.url)
            if got != (start, end, self.size):
                raise DownloadError(f"{self.url}: asked for bytes {start}-{end} of {self.size}, the server sent "
                                    f"{got[0]}-{got[1]} of {got[2]} (did the archive change on the server?)")
        except BaseException:
            resp.close()
            raise
        return resp, _Stream(resp, start, self.url, self._count)


def _content_range(resp: http.client.HTTPResponse, url: str) -> tuple[int, int, int | None]:
    value = resp.headers.get("Content-Range", "")
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        raise DownloadError(f"{url}: HTTP 206 with a bad Content-Range header {value!r}")
    return int(m[1]), int(m[2]), None if m[3] == "*" else int(m[3])


def _remote_directory(remote: _Remote, probe: _Probe, cache: Path) -> tuple[ZipDirectory, bytes]:
    """Central directory of a remote archive: from the probed tail, the cache, or one more Range request."""
    tail, tail_start = probe.tail, probe.tail_start
    directory = find_directory(tail, tail_start, remote.url)
    if directory is None and tail_start > 0:  # a zip comment pushed the end record further back
        start = max(0, probe.size - _MAX_TAIL)
        resp, s = remote.open_range(start, probe.size - 1)
        with resp:
            tail, tail_start = s.read(probe.size - start), start
        directory = find_directory(tail, tail_start, remote.url)
    if directory is None:
        raise DownloadError(f"{remote.url}: not a zip file (no end of central directory record)")
    if directory.cd_start >= tail_start:
        off = directory.cd_start - tail_start
        return directory, tail[off:off + directory.cd_size]
    cached = cache / "central_directory.bin"
    if _size(cached) == directory.cd_size:
        return directory, cached.read_bytes()
    resp, s = remote.open_range(directory.cd_start, directory.cd_start + directory.cd_size - 1)
    with resp:
        cd = s.read(directory.cd_size)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_bytes(cd)
    os.replace(tmp, cached)
    return directory, cd


def _fetch_raw(remote: _Remote, entries: dict[str, ZipEntry], members_dir: Path, cd_start: int, bar: tqdm) -> None:
    """Bring each member's compressed bytes into members_dir/<name>; neighbours share one Range request."""
    pending = {k: e for k, e in entries.items() if not (members_dir / k).is_file()}
    partial = [(k, e) for k, e in pending.items() if (members_dir / f"{k}.part").exists()]
    fresh = sorted(((k, e) for k, e in pending.items() if not (members_dir / f"{k}.part").exists()),
                   key=lambda ke: ke[1].offset)
    runs: list[list[tuple[str, ZipEntry]]] = []
    for k, e in fresh:
        if runs and e.offset - _approx_end(runs[-1][-1][1], cd_start) <= _MAX_GAP:
            runs[-1].append((k, e))
        else:
            runs.append([(k, e)])
    _in_parallel([functools.partial(_fetch_run, remote, run, members_dir, cd_start, bar) for run in runs]
                 + [functools.partial(_resume_member, remote, k, e, members_dir, cd_start, bar) for k, e in partial])
    _in_parallel([functools.partial(_resume_member, remote, k, e, members_dir, cd_start, bar)
                  for k, e in pending.items() if not (members_dir / k).is_file()])


def _in_parallel(tasks: list[Callable[[], None]]) -> None:
    """Run tasks on up to PARALLEL connections; after all finish, re-raise a fatal error before a transient one."""
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(min(PARALLEL, len(tasks))) as pool:
        errors = [f.exception() for f in [pool.submit(task) for task in tasks]]
    errors = [e for e in errors if e is not None]
    fatal = [e for e in errors if not isinstance(e, _Interrupted)]
    if fatal or errors:
        raise (fatal or errors)[0]


def _approx_end(e: ZipEntry, cd_start: int) -> int:
    return min(cd_start, e.offset + e.header_hint + _SLACK + e.csize)


def _fetch_run(remote: _Remote, run: list[tuple[str, ZipEntry]], members_dir: Path, cd_start: int,
               bar: tqdm) -> None:
    """One Range request over consecutive members: local header, then data, for each in turn."""
    end = _approx_end(run[-1][1], cd_start)
    resp, s = remote.open_range(run[0][1].offset, end - 1)
    with resp:
        for k, e in run:
            s.skip_to(e.offset)
            data_offset = _read_local_header(s, e, cd_start=cd_start, where=remote.url, limit=end)
            if data_offset is None:
                break  # a local header longer than the slack: _resume_member reads it exactly
            part = members_dir / f"{k}.part"
            n = min(e.csize, end - data_offset)
            with open(part, "wb") as f:
                s.copy(f, n, bar)
            if n == e.csize:
                os.replace(part, members_dir / k)
        s.drain(end)


def _resume_member(remote: _Remote, key: str, e: ZipEntry, members_dir: Path, cd_start: int, bar: tqdm) -> None:
    """Fetch the rest of one member: its local header, then the data after what `.part` already holds."""
    part = members_dir / f"{key}.part"
    have = _size(part)
    if have > e.csize:
        part.unlink()
        have = 0
    end = min(cd_start, e.offset + e.header_hint + _SLACK)
    resp, s = remote.open_range(e.offset, end - 1)
    with resp:
        data_offset = _read_local_header(s, e, cd_start=cd_start, where=remote.url, limit=end)
        s.drain(end)
    if data_offset is None:  # a long local extra field: read the header again, exactly
        resp, s = remote.open_range(e.offset, e.offset + _LFH.size - 1)
        with resp:
            nlen, xlen = struct.unpack_from("<2H", s.read(_LFH.size), 26)
        resp, s = remote.open_range(e.offset, e.offset + _LFH.size + nlen + xlen - 1)
        with resp:
            data_offset = _read_local_header(s, e, cd_start=cd_start, where=remote.url)
    if have < e.csize:
        resp, s = remote.open_range(data_offset + have, data_offset + e.csize - 1)
        with resp, open(part, "ab") as f:
            s.copy(f, e.csize - have, bar)
    else:
        part.touch()
    os.replace(part, members_dir / key)


def _download_whole(remote: _Remote, dest: Path, *, size: int | None, progress: bool,
                    resp: http.client.HTTPResponse | None = None) -> None:
    """Download the whole archive to `dest`, continuing a `.part` file with Range where the server allows;
    `resp` is an already open full (HTTP 200) response to use instead of a new request."""
    part = dest.with_name(dest.name + ".part")
    have = 0 if resp is not None else _size(part)
    if have and size is not None and have >= size:  # finished last time but not renamed, or stale
        if have == size:
            os.replace(part, dest)
            return
        part.unlink()
        have = 0
    if resp is None:
        resp = remote.get(f"{have}-" if have else None)
    with resp:
        if have and resp.status == 206:
            start, _end, total = _content_range(resp, remote.url)
            if start != have:
                raise DownloadError(f"{remote.url}: asked to resume at byte {have}, the server sent from {start}")
        else:
            if have:
                _say(f"{remote.url}: the server cannot resume; restarting from byte 0")
            have, total = 0, _length(resp)
        mode = "ab" if have else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=dest.name, disable=not progress, file=sys.stderr) as bar:
            s = _Stream(resp, have, remote.url, remote._count)
            if total is not None:
                s.copy(f, total - have, bar)
            else:  # no length given: read to the end of the stream
                while chunk := resp.read(CHUNK):
                    remote._count(len(chunk))
                    f.write(chunk)
                    bar.update(len(chunk))
    os.replace(part, dest)


# ----------------------------------------------------------------------------- cache and retries

T = TypeVar("T")


def _retrying(fn: Callable[[], T], *, retries: int, wait: float, hint: str) -> T:
    """Call fn, retrying transient failures with exponential backoff; fn resumes from the cache each time."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Interrupted as err:
            if attempt == retries:
                raise DownloadError(f"{err} (gave up after {retries + 1} attempts; {hint})") from None
            delay = wait * 2 ** attempt
            _say(f"{err}; retrying in {delay:.0f} s ({attempt + 1}/{retries})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _cache_name(url: str) -> str:
    stem = Path(urllib.parse.urlparse(url).path).stem or "archive"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _check_cache(cache: Path, remote: dict) -> None:
    """Drop the archive's cache when the server's copy changed (size, ETag or Last-Modified)."""
    meta = cache / "meta.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            old = {}
        same = all(old.get(k) == remote[k] for k in ("size", "etag", "last_modified")
                   if remote[k] is not None and old.get(k) is not None)
        if not same:
            _say(f"{remote['url']}: the archive changed on the server; dropping the cache {cache}")
            shutil.rmtree(cache)
        else:
            remote = {k: old.get(k) if v is None else v for k, v in remote.items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(remote, indent=2) + "\n")
    os.replace(tmp, meta)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)
