"""Real CLEVRER download: only the requested videos and annotations, read out of the official split zips.

Official archives, relative to `data.clevrer.url` (http://data.csail.mit.edu/clevrer, see its README.txt):
videos/<split>/video_<split>.zip, annotations/<split>/annotation_<split>.zip and derender_proposals.zip.
Members are matched by file name (video_NNNNN.mp4, annotation_NNNNN.json, proposal_NNNNN.json, whatever folder
holds them) and written to our layout (pipeline/data/layout.py), never to the path the archive names; an
archive with an absolute or '..' member name is refused (zip-slip).

Python's zipfile (ZIP64, CRC-32, deflate) reads the archive through a `RangeFile`, a seekable file over HTTP
Range requests with a short connect timeout: its end records and directory, then the requested members' bytes,
which are cached one file each (neighbours come in one request) and extracted from there. From a server without
Range the whole archive is downloaded into the cache once. Either way a cut transfer is retried and resumed, a
second run reuses the cache, and every member is checked (CRC-32, size) before it is renamed into `out_dir`.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from pipeline.config import Data
from pipeline.data import layout

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock on the cache
    fcntl = None

VIDEO_ARCHIVES = {"train": "videos/train/video_train.zip",
                  "validation": "videos/validation/video_validation.zip",
                  "test": "videos/test/video_test.zip"}
ANNOTATION_ARCHIVES = {"train": "annotations/train/annotation_train.zip",
                       "validation": "annotations/validation/annotation_validation.zip"}
PROPOSAL_ARCHIVE = "derender_proposals.zip"

CHUNK = 1 << 16             # bytes per read / write
READAHEAD = 1 << 16         # least bytes a RangeFile asks for when a read misses what it holds
TAIL = 16 * 1024            # first request: the archive's last bytes
CONNECT_TIMEOUT = 5.0       # seconds to connect and get the response head: a silent firewall must not hang
TIMEOUT = 60.0              # seconds per socket read once the response has started
_MAX_GAP = 1 << 20          # members closer than this are fetched in one request


class DownloadError(RuntimeError):
    """A failed download or a bad archive; the message names the URL or file and the problem."""


class UnsafeArchiveError(DownloadError):
    """An archive member with an absolute path or a '..' component (zip-slip)."""


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
    return {"source": "clevrer", "url": base,
            "splits": {split: {"clevrer_split": cs, "count": len(ids), "first_id": ids[0], "last_id": ids[-1]}
                       for split, (cs, ids) in plan.items()},
            "proposals": data.clevrer.proposals,
            "archives": {rel: {k: v for k, v in a.items() if k not in run_keys} for rel, a in archives.items()},
            "files": sum(a["members"] for a in archives.values()),
            "run": {"bytes_downloaded": sum(a["bytes_downloaded"] for a in archives.values()),
                    "seconds": round(time.time() - t0, 2),
                    "archives": {rel: {k: a[k] for k in run_keys} for rel, a in archives.items()}}}


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
        _extract_file(path, wanted, out_dir, where=url)
        return _archive_report(url, "local", path.stat().st_size, 0, len(wanted), 0, t0)
    name = Path(urllib.parse.urlparse(url).path).name
    cache = Path(cache_dir) / f"{Path(name).stem or 'archive'}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"
    whole, part = cache / name, cache / f"{name}.part"  # a whole archive, from a server without Range
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "a") as lock:
        if fcntl:  # two processes never write the same cache at once; closing the file releases the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
        rf = RangeFile(url, retries=retries, retry_wait=retry_wait, hint=f"rerun to resume from {cache}")
        if not (kept := whole.is_file() and _check_cache(cache, rf.head())):  # no whole archive cached
            full = rf.probe()
            _check_cache(cache, rf.validators)
            if full is not None:  # the answer to the probe is the whole archive
                tqdm.write(f"{url}: no HTTP Range support; downloading the whole archive", file=sys.stderr)
                with open(part, "wb") as f, _bar(rf.size, name, progress) as bar:
                    for chunk in rf.stream(0, rf.size, resp=full):
                        bar.update(f.write(chunk))
                os.replace(part, whole)
        if not whole.is_file():
            return _by_range(rf, wanted, cache, out_dir=out_dir, progress=progress, t0=t0)
        try:
            _extract_file(whole, wanted, out_dir, where=f"{url} (cached as {whole})")
        except DownloadError:
            whole.unlink()  # a bad archive is not kept: the next run downloads it again
            raise
        return _archive_report(url, "full", _size(whole), rf.bytes, len(wanted), len(wanted) if kept else 0, t0)


def _by_range(rf: RangeFile, wanted: dict[str, str], cache: Path, *, out_dir: Path, progress: bool, t0: float) -> dict:
    """The members from a server with Range: their raw bytes are cached one file each, then extracted."""
    index, raw_dir = cache / "index.bin", cache / "members"  # index: central directory to the end of the zip
    if 0 < _size(index) <= rf.size:
        rf.spans.append((rf.size - _size(index), index.read_bytes()))
    with _open_zip(rf, where=rf.url) as zf:
        members = _select(zf, wanted, where=rf.url)
        rf.seek(zf.start_dir)
        _write_atomic(index, rf.read(rf.size - zf.start_dir))
        raw_dir.mkdir(exist_ok=True)
        cached = sum((raw_dir / key).is_file() for key in members)
        _fetch_raw(rf, {key: (info.header_offset, end) for key, (info, end) in members.items()}, raw_dir, progress)
        for key, (info, _end) in members.items():
            rf.spans.append((info.header_offset, (raw_dir / key).read_bytes()))  # zipfile reads the member here
            try:
                _extract(zf, info, out_dir / wanted[key], where=rf.url)
            except DownloadError as err:
                (raw_dir / key).unlink()  # the next run fetches it again
                raise DownloadError(f"{err}; deleted the cached copy {raw_dir / key}, rerun to fetch it") from None
            finally:
                rf.spans.pop()
    return _archive_report(rf.url, "range", rf.size, rf.bytes, len(members), cached, t0)


def _archive_report(url: str, mode: str, size: int | None, got: int, members: int, cached: int, t0: float) -> dict:
    return {"url": url, "mode": mode, "archive_bytes": size, "bytes_downloaded": got, "members": members,
            "members_from_cache": cached, "seconds": round(time.time() - t0, 2)}


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                file=sys.stderr)


def _fetch_raw(rf: RangeFile, spans: dict[str, tuple[int, int]], raw_dir: Path, progress: bool) -> None:
    """Bring each member's bytes [start, end) into raw_dir/<name> via `.part`; near ones share a request."""
    todo = sorted((start + have if (have := _size(raw_dir / f"{key}.part")) <= end - start else start, end, key)
                  for key, (start, end) in spans.items() if not (raw_dir / key).is_file())  # (from, to, name)
    cuts = [i for i in range(1, len(todo)) if todo[i][0] - todo[i - 1][1] > _MAX_GAP]  # gaps that end a request
    runs = [todo[a:b] for a, b in zip([0, *cuts], [*cuts, len(todo)])] if todo else []
    with _bar(sum(end - pos for pos, end, _ in todo), Path(rf.url).name, progress) as bar:
        for run in runs:
            chunks, chunk, pos = rf.stream(run[0][0], run[-1][1]), b"", run[0][0]
            for start, end, key in run:
                with open(raw_dir / f"{key}.part", "ab" if start > spans[key][0] else "wb") as f:
                    while pos < end:  # skip the gap before this member, then write its bytes
                        chunk = chunk or next(chunks)
                        n = min(len(chunk), (start if pos < start else end) - pos)
                        if pos >= start:
                            bar.update(f.write(chunk[:n]))
                        chunk, pos = chunk[n:], pos + n
                os.replace(raw_dir / f"{key}.part", raw_dir / key)
            chunks.close()


# ----------------------------------------------------------------------------- zip members

def _open_zip(file: Path | RangeFile, *, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, NotImplementedError, OSError) as err:  # OSError: a missing local file
        raise DownloadError(f"{where}: not a zip file ({err})") from None


def _select(zf: zipfile.ZipFile, wanted: dict[str, str], *, where: str) -> dict[str, tuple[zipfile.ZipInfo, int]]:
    """Refuse unsafe member names, then find each wanted file name once: name -> (member, end of its bytes)."""
    found: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.orig_filename.replace("\\", "/")
        if "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
            raise UnsafeArchiveError(f"{where}: refusing the archive: member {info.orig_filename!r} has an "
                                     f"absolute path or a '..' component (zip-slip)")
        if (key := name.rsplit("/", 1)[-1]) in found:
            raise DownloadError(f"{where}: ambiguous archive: {found[key].orig_filename!r} and "
                                f"{info.orig_filename!r} are both {key}")
        if key in wanted:
            found[key] = info
    if missing := [k for k in wanted if k not in found]:
        raise DownloadError(f"{where}: archive has no member {', '.join(missing[:5])} ({len(missing)} missing)")
    starts = sorted({info.header_offset for info in zf.infolist()} | {zf.start_dir})
    ends = dict(zip(starts, starts[1:]))  # a member's bytes: from its local header to the next one
    for info in map(found.get, wanted):
        if info.header_offset + 30 + len(info.orig_filename) + info.compress_size > ends.get(info.header_offset, 0):
            raise DownloadError(f"{where}: bad zip: {info.orig_filename!r} overruns the next member or the directory")
    return {key: (found[key], ends[found[key].header_offset]) for key in wanted}


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, *, where: str) -> None:
    """Write one member to `dest` through a temporary name; zipfile checks the CRC-32 (an encrypted member is
    its RuntimeError), this the size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with zf.open(info) as src, open(tmp, "wb") as f:
            shutil.copyfileobj(src, f, CHUNK)
        if _size(tmp) != info.file_size:
            raise zipfile.BadZipFile(f"{_size(tmp)} bytes, which disagrees with the central directory")
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
        raise DownloadError(f"{where}: member {info.orig_filename!r} is corrupt or unreadable ({err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _extract_file(path: Path, wanted: dict[str, str], out_dir: Path, *, where: str) -> None:
    with _open_zip(path, where=where) as zf:
        for key, (info, _end) in _select(zf, wanted, where=where).items():
            _extract(zf, info, out_dir / wanted[key], where=where)


# ----------------------------------------------------------------------------- HTTP

class RangeFile(io.RawIOBase):
    """Read-only seekable file at an http(s) URL: reads come from pinned spans (the probed tail, cached bytes),
    the read-ahead buffer, or a Range request for READAHEAD bytes at least, retried with backoff and resumed."""

    def __init__(self, url: str, *, retries: int, retry_wait: float, hint: str):
        super().__init__()
        self.url, self.retries, self.retry_wait, self.hint = url, retries, retry_wait, hint
        self.size, self.ranged, self.validators, self.bytes, self._pos = 0, True, {}, 0, 0
        self.spans, self._ahead = [], (0, b"")  # pinned (start, data) known without a request; read-ahead

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if (pos := offset + (0, self._pos, self.size)[whence]) < 0:
            raise OSError(f"{self.url}: seek to byte {pos}")
        self._pos = pos
        return pos

    def readinto(self, b: bytearray | memoryview) -> int:
        view, n, pos = memoryview(b).cast("B"), 0, self._pos
        while n < len(view) and pos < self.size:
            start, data = next(((s, d) for s, d in (self._ahead, *self.spans) if s <= pos < s + len(d)), (0, b""))
            if not data:  # a miss: fetch READAHEAD bytes at least, up to the next pinned span
                end = min([self.size, pos + max(len(view) - n, READAHEAD)] + [s for s, _ in self.spans if s > pos])
                start, data = self._ahead = (pos, b"".join(self.stream(pos, end)))
            piece = data[pos - start:pos - start + len(view) - n]
            view[n:n + len(piece)] = piece
            n, pos = n + len(piece), pos + len(piece)
        self._pos = pos
        return n

    def head(self) -> dict:
        """Size and validators from a HEAD request; None for what the server does not say (or if it fails)."""
        try:
            with self.open(method="HEAD") as resp:
                size = resp.headers.get("Content-Length", "")
                return _validators(self.url, resp.headers, int(size) if size.isdigit() else None)
        except DownloadError:
            return _validators(self.url, {}, None)

    def probe(self) -> http.client.HTTPResponse | None:
        """GET the last TAIL bytes and pin them; a server without Range sends the whole archive: returned, open."""
        resp = self.open(f"bytes=-{TAIL}")
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range") or "")
        self.ranged = resp.status == 206
        self.size = (int(m[2]) if m else None) if self.ranged else resp.length
        self.validators = _validators(self.url, resp.headers, self.size)
        if self.size is None:
            resp.close()
            raise DownloadError(f"{self.url}: HTTP {resp.status} does not give the archive's size")
        if self.ranged:
            self.spans.append((int(m[1]), b"".join(self.stream(int(m[1]), self.size, resp=resp))))
        return None if self.ranged else resp

    def stream(self, start: int, end: int, *, resp: http.client.HTTPResponse | None = None) -> Iterator[bytes]:
        """Bytes start..end-1 from `resp` or a Range request; a cut transfer resumes (or, without Range, skips)."""
        pos, failures, skip = start, 0, 0
        while pos < end:
            try:
                if resp is None:
                    resp, skip = self.open(f"bytes={pos}-{end - 1}"), 0
                    got = f"HTTP {resp.status} {resp.headers.get('Content-Range')}"
                    if not self.ranged and resp.status == 200:
                        skip = pos  # the whole file again: what came already is skipped
                    elif got != f"HTTP 206 bytes {pos}-{end - 1}/{self.size}":
                        raise DownloadError(f"{self.url}: asked for bytes {pos}-{end - 1}/{self.size}, got {got}")
                while pos < end:
                    if not (chunk := resp.read(min(CHUNK, skip or end - pos))):
                        raise ConnectionError("the connection closed early")
                    self.bytes += len(chunk)
                    if skip:
                        skip -= len(chunk)
                        continue
                    pos += len(chunk)
                    yield chunk
            except (http.client.HTTPException, OSError) as err:
                failures = self._backoff(f"{self.url}: transfer stopped at byte {pos} ({type(err).__name__}: {err})",
                                        failures)
            finally:
                if resp is not None:
                    resp.close()
                resp = None

    def open(self, byte_range: str | None = None, *, method: str = "GET") -> http.client.HTTPResponse:
        """One request, retried with backoff while the connection fails or the server answers 5xx."""
        headers = {"User-Agent": "clevrer-pipeline/1.0", "Accept-Encoding": "identity", "Range": byte_range}
        req = urllib.request.Request(self.url, method=method, headers={k: v for k, v in headers.items() if v})
        failures = 0
        while True:
            try:
                return _OPENER.open(req, timeout=CONNECT_TIMEOUT)
            except urllib.error.HTTPError as err:
                err.close()
                if err.code < 500:
                    raise DownloadError(f"{self.url}: HTTP {err.code} {err.reason}") from None
                failures = self._backoff(f"{self.url}: HTTP {err.code} {err.reason}", failures)
            except (http.client.HTTPException, OSError) as err:  # urllib.error.URLError included
                failures = self._backoff(f"{self.url}: no answer ({getattr(err, 'reason', err)})", failures)

    def _backoff(self, problem: str, failures: int) -> int:
        """Wait before retry number failures + 1, or give up with a DownloadError after `retries` retries."""
        if failures >= self.retries:
            raise DownloadError(f"{problem} (gave up after {failures + 1} attempts; {self.hint})") from None
        tqdm.write(f"{problem}; retrying ({failures + 1}/{self.retries})", file=sys.stderr)
        time.sleep(self.retry_wait * 2 ** failures)
        return failures + 1


class _Timeouts:
    """Connection mixin: connect and response head within CONNECT_TIMEOUT, then TIMEOUT per body read."""

    def getresponse(self) -> http.client.HTTPResponse:
        sock, resp = self.sock, super().getresponse()  # (a response that closes the connection keeps the socket)
        sock.settimeout(TIMEOUT)
        return resp


class _Handler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http(s) handler (proxies, redirects) on connections with the timeouts above."""

    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs) -> http.client.HTTPResponse:
        return super().do_open(type(http_class.__name__, (_Timeouts, http_class), {}), req, **kwargs)


_OPENER = urllib.request.build_opener(_Handler)


def _validators(url: str, headers: http.client.HTTPMessage | dict, size: int | None) -> dict:
    return {"url": url, "size": size, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


# ----------------------------------------------------------------------------- cache

def _check_cache(cache: Path, remote: dict) -> bool:
    """Drop the archive's cache when the server's copy changed (size, ETag or Last-Modified); True if kept."""
    old = json.loads((cache / "meta.json").read_text()) if (cache / "meta.json").is_file() else {}
    if not (same := all(old.get(k) in (None, v) for k, v in remote.items() if v is not None)):
        tqdm.write(f"{remote['url']}: the archive changed on the server; dropping the cache {cache}", file=sys.stderr)
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    merged = {k: old.get(k) if v is None and same else v for k, v in remote.items()}  # keep what HEAD did not say
    _write_atomic(cache / "meta.json", json.dumps(merged, indent=2).encode() + b"\n")
    return same


def _write_atomic(path: Path, data: bytes) -> None:
    path.with_name(path.name + ".tmp").write_bytes(data)
    os.replace(path.with_name(path.name + ".tmp"), path)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0
