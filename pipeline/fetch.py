"""Bounded, complete downloads of one file: what the pretrained stage fetches weights with.

`fetch(url, dst, hash_prefix=...)` is torch.hub.download_url_to_file (its progress bar, its temporary
`.partial` file + move, its sha256-prefix check) with two guarantees urllib alone does not give: every socket
wait is bounded by `connect_timeout` (a route that silently drops packets fails in about that long), and a
body shorter than its Content-Length is an error (urllib would end it silently and torch.hub would keep the
truncated file when the name carries no hash). Cut transfers and 5xx answers are retried with a growing
wait; a refused hash, a 4xx answer, a missing file:// file or a host name that does not resolve are not.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.hub

LOG = logging.getLogger(__name__)

__all__ = ["DownloadError", "fetch", "one_line"]

_NETWORK_LOCK = threading.Lock()  # the socket default timeout and urllib's opener are process-wide


class DownloadError(RuntimeError):
    """A file that could not be fetched (network failure after the retries, or a refused hash)."""


class _CompleteBody:
    """A urllib response whose read() raises http.client.IncompleteRead when the body ends short of its
    Content-Length (http.client only signals such a cut as a silent end of data)."""

    def __init__(self, response: Any):
        self._response = response
        length = response.headers.get("Content-Length")
        self._expected = int(length) if length is not None and length.strip().isdigit() else None
        self._received = 0

    def read(self, amt: int | None = None) -> bytes:
        data = self._response.read() if amt is None else self._response.read(amt)
        self._received += len(data)
        ended = amt is None or (amt > 0 and not data)
        if ended and self._expected is not None and self._received < self._expected:
            raise http.client.IncompleteRead(b"", self._expected - self._received)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    def __enter__(self) -> "_CompleteBody":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._response.close()


class _BoundedComplete(urllib.request.BaseHandler):
    """urllib handler: every HTTP(S) request waits at most `timeout` per socket operation, and its final
    response refuses a short body."""

    handler_order = 1100  # after HTTPErrorProcessor (1000): only the final, successful response is wrapped

    def __init__(self, timeout: float):
        self.timeout = timeout

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        req.timeout = self.timeout
        return req

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        return response if isinstance(response, _CompleteBody) else _CompleteBody(response)

    https_request = http_request
    https_response = http_response


@contextlib.contextmanager
def _bounded_network(timeout: float) -> Iterator[None]:
    """For the block: socket default timeout `timeout` and a urllib opener with `_BoundedComplete`; both restored."""
    with _NETWORK_LOCK:
        old_timeout = socket.getdefaulttimeout()
        old_opener = getattr(urllib.request, "_opener", None)  # what urlopen() uses; None -> its default
        socket.setdefaulttimeout(timeout)
        urllib.request.install_opener(urllib.request.build_opener(_BoundedComplete(timeout)))
        try:
            yield
        finally:
            urllib.request.install_opener(old_opener)
            socket.setdefaulttimeout(old_timeout)


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}" if not isinstance(err, urllib.error.URLError) else repr(err)
    return " ".join(text.split())


def _retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):  # the server answered: only its transient answers are retried
        return err.code in (408, 425, 429) or err.code >= 500
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, (FileNotFoundError, PermissionError,
                                                                         IsADirectoryError, socket.gaierror)):
        return False  # a file:// mirror without the file, or a host name that does not resolve (offline)
    return isinstance(err, (OSError, http.client.HTTPException))  # URLError, timeouts, resets, cut bodies


def fetch(url: str, dst: str | Path, *, hash_prefix: str | None, connect_timeout: float = 10.0,
             retries: int = 2, retry_wait: float = 1.0, progress: bool = True,
             log: Callable[[str], Any] = LOG.info) -> None:
    """Fetch `url` to `dst` with torch.hub.download_url_to_file: bounded waits, cut transfers retried,
    a sha256 that does not start with `hash_prefix` refused at once; raises DownloadError naming both."""
    if connect_timeout <= 0 or retries < 0 or retry_wait < 0:
        raise ValueError(f"need connect_timeout > 0, retries >= 0, retry_wait >= 0; got {connect_timeout}, "
                         f"{retries}, {retry_wait}")
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot download {dst.name} from {url}: the torch hub cache dir is not writable "
                            f"({one_line(e)})") from None
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with _bounded_network(connect_timeout):
                # writes <dst>.<uuid>.partial, checks the hash, then moves it to dst; removes the partial on error
                torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=progress)
            return
        except RuntimeError as e:  # torch.hub's hash check (the body is complete: _CompleteBody saw to that)
            if hash_prefix is None:
                raise DownloadError(f"download of {dst.name} from {url} failed: {one_line(e)}") from None
            raise DownloadError(f"{dst.name}: the download from {url} was refused: its sha256 does not start with "
                                f"the hash prefix {hash_prefix} in the file name ({one_line(e)})") from None
        except Exception as e:
            if not _retryable(e):
                raise DownloadError(f"download of {dst.name} from {url} failed: {one_line(e)}") from None
            if attempt == attempts:
                raise DownloadError(f"download of {dst.name} from {url} failed after {attempts} attempt(s): "
                                    f"{one_line(e)}") from None
            delay = retry_wait * attempt
            log(f"fetch: {dst.name}: attempt {attempt}/{attempts} from {url} failed ({one_line(e)}); "
                f"retrying in {delay:.1f} s")
            time.sleep(delay)
