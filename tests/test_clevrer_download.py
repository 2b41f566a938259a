"""CLEVRER downloader against a local HTTP server serving small zips in the real CLEVRER layout."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import params_from_dict
from pipeline.data import clevrer as downloader
from pipeline.data import layout
from pipeline.data.clevrer import DownloadError, UnsafeArchiveError, download_clevrer
from pipeline.data.video import decode_video

from clevrer_server import VIDEOS, FakeServer, expected_files, files_under, make_zip


@pytest.fixture
def server(clevrer):
    srv = FakeServer(clevrer["archives"])
    yield srv
    srv.close()


def make_data(tiny: dict, url: str, *, train: int = 2, val: int = 1, test: int = 2, proposals: bool = False):
    raw = copy.deepcopy(tiny)
    raw["data"].update(source="clevrer", videos={"train": train, "val": val, "test": test},
                       clevrer={"url": url, "proposals": proposals})
    return params_from_dict(raw).data


def check_written(out: Path, clevrer: dict, **counts) -> None:
    want = expected_files(**counts)
    assert files_under(out) == set(want)
    for rel, i in want.items():
        blob = (out / rel).read_bytes()
        if rel.endswith(".mp4"):
            assert blob == clevrer["videos"][i], rel
        elif rel.startswith("annotations/"):
            assert blob == clevrer["anns"][i], rel


def run(out: Path, cache: Path, data, **kw) -> dict:
    return download_clevrer(out, data=data, cache_dir=cache, progress=False, retry_wait=0.0, **kw)


# ----------------------------------------------------------------------------- tests

def test_range_fetches_only_requested_members(server, clevrer, tmp_path, tiny_params_dict_fixture):
    data = make_data(tiny_params_dict_fixture, server.url)
    report = run(tmp_path / "raw", tmp_path / "cache", data)

    check_written(tmp_path / "raw", clevrer)
    video = decode_video(tmp_path / "raw" / layout.video_relpath("train", 1))
    assert video.shape == (8, 48, 64, 3)
    archive = len(clevrer["archives"][VIDEOS])
    # 3 of 24 train videos: the tail, the central directory and 3 members, not the archive
    assert server.sent[VIDEOS] < 0.3 * archive, (server.sent[VIDEOS], archive)
    assert all(a["mode"] == "range" for a in report["archives"].values())
    assert report["run"]["bytes_downloaded"] == sum(server.sent.values())
    assert report["splits"]["val"] == {"clevrer_split": "train", "count": 1, "first_id": 2, "last_id": 2}
    assert report["splits"]["test"]["first_id"] == 10000
    # members next to each other come in one request: probe + one data run for the 3 train videos
    assert [r for p, r in server.requests if p == VIDEOS][0] == "bytes=-16384"
    assert len([p for p, _ in server.requests if p == VIDEOS]) == 2

    # a second run (DVC deletes data/raw first) takes the members from the cache: only the tail is re-read
    server.reset_counts()
    report = run(tmp_path / "raw2", tmp_path / "cache", data)
    check_written(tmp_path / "raw2", clevrer)
    assert report["run"]["archives"]["videos/train/video_train.zip"]["members_from_cache"] == 3
    assert server.sent[VIDEOS] <= 16384


def test_proposals_are_optional(server, clevrer, tmp_path, tiny_params_dict_fixture):
    data = make_data(tiny_params_dict_fixture, server.url, proposals=True)
    run(tmp_path / "raw", tmp_path / "cache", data)
    check_written(tmp_path / "raw", clevrer, proposals=True)
    assert json.loads((tmp_path / "raw" / layout.proposal_relpath(10001)).read_text()) == {"id": 10001}


def test_resumes_an_interrupted_transfer_without_refetching(server, clevrer, tmp_path, tiny_params_dict_fixture):
    data = make_data(tiny_params_dict_fixture, server.url)
    run(tmp_path / "raw0", tmp_path / "cache0", data)
    baseline = server.sent[VIDEOS]  # an uninterrupted download of the same subset
    cut = 30000

    # within one call: the data transfer drops after 30 kB, the retry continues from there
    server.reset_counts()
    server.cut(VIDEOS, after=cut)
    run(tmp_path / "raw1", tmp_path / "cache1", data, retries=2)
    check_written(tmp_path / "raw1", clevrer)
    assert baseline <= server.sent[VIDEOS] <= baseline + 2048  # only one local header is read again

    # across runs: it gives up, keeps the partial member, and the next run resumes
    server.reset_counts()
    server.cut(VIDEOS, after=cut)
    with pytest.raises(DownloadError, match=r"video_train\.zip.*rerun to resume"):
        run(tmp_path / "raw2", tmp_path / "cache2", data, retries=0)
    assert list((tmp_path / "cache2").rglob("*.part"))
    assert not list((tmp_path / "raw2").rglob("*.mp4"))
    first = server.sent[VIDEOS]
    server.reset_counts()
    run(tmp_path / "raw2", tmp_path / "cache2", data)
    check_written(tmp_path / "raw2", clevrer)
    assert server.sent[VIDEOS] < baseline - cut + 16384 + 2048  # tail probe + one header again, not the data
    assert first + server.sent[VIDEOS] <= baseline + 16384 + 2048


def test_server_without_range_downloads_whole_archive(clevrer, tmp_path, tiny_params_dict_fixture):
    srv = FakeServer(clevrer["archives"], ranges=False)
    try:
        data = make_data(tiny_params_dict_fixture, srv.url)
        srv.cut(VIDEOS, after=30000)  # no Range: the retry must start again from byte 0
        report = run(tmp_path / "raw", tmp_path / "cache", data, retries=1)
        check_written(tmp_path / "raw", clevrer)
        archive = len(clevrer["archives"][VIDEOS])
        assert srv.sent[VIDEOS] == archive + 30000
        assert report["archives"]["videos/train/video_train.zip"]["mode"] == "full"
        assert len(list((tmp_path / "cache").rglob("video_train.zip"))) == 1
        # the whole archive is cached: a second run downloads nothing again
        srv.reset_counts()
        run(tmp_path / "raw2", tmp_path / "cache", data)
        check_written(tmp_path / "raw2", clevrer)
        assert srv.sent[VIDEOS] == 0
    finally:
        srv.close()


def test_file_url_reads_local_archives(clevrer, tmp_path, tiny_params_dict_fixture):
    mirror = tmp_path / "mirror"
    for path, blob in clevrer["archives"].items():
        (mirror / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path.lstrip("/")).write_bytes(blob)
    report = run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, mirror.as_uri()))
    check_written(tmp_path / "raw", clevrer)
    assert {a["mode"] for a in report["archives"].values()} == {"local"}
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("ranges", [True, False])
@pytest.mark.parametrize("evil", ["../{u}.mp4", "video_00000-01000/../../{u}.mp4", "/tmp/{u}.mp4", "..\\{u}.mp4",
                                  "../video_00001.mp4"])
def test_zip_slip_member_is_refused(evil, ranges, clevrer, tmp_path, tiny_params_dict_fixture):
    name = evil.format(u=f"evil-{uuid.uuid4().hex}")
    members = dict(clevrer["members"][VIDEOS])
    members[name] = b"pwned"
    archives = dict(clevrer["archives"])
    archives[VIDEOS] = make_zip(members, method=zipfile.ZIP_STORED, dirs=False)
    srv = FakeServer(archives, ranges=ranges)
    try:
        with pytest.raises(UnsafeArchiveError, match="zip-slip") as err:
            run(tmp_path / "work" / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, srv.url))
    finally:
        srv.close()
    assert repr(name) in str(err.value) and "video_train.zip" in str(err.value)
    assert not files_under(tmp_path / "work" / "raw")
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()} | {p.name for p in Path("/tmp").glob("evil-*")}
    assert not any(n.startswith("evil-") or n == "video_00001.mp4" for n in written)


@pytest.mark.parametrize("ranges", [True, False])
def test_corrupt_member_is_detected(ranges, clevrer, tmp_path, tiny_params_dict_fixture):
    blob = bytearray(clevrer["archives"][VIDEOS])
    info = zipfile.ZipFile(io.BytesIO(bytes(blob))).getinfo("video_00000-01000/video_00001.mp4")
    data_at = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob[data_at + info.compress_size // 2] ^= 0xFF
    srv = FakeServer({**clevrer["archives"], VIDEOS: bytes(blob)}, ranges=ranges)
    try:
        with pytest.raises(DownloadError, match=r"video_train\.zip.*video_00001\.mp4.*CRC-32") as err:
            run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, srv.url))
    finally:
        srv.close()
    assert not (tmp_path / "raw" / layout.video_relpath("train", 1)).exists()
    assert not [p for p in (tmp_path / "raw").rglob("*") if p.name.endswith(".part")]
    if ranges:  # the bad cached copy is dropped so that the next run fetches it again
        assert "deleted" in str(err.value)
        assert not list((tmp_path / "cache").rglob("video_00001.mp4"))


def test_corrupt_deflate_member_is_detected(clevrer, server, tmp_path, tiny_params_dict_fixture):
    path = "/annotations/train/annotation_train.zip"
    blob = bytearray(clevrer["archives"][path])
    info = zipfile.ZipFile(io.BytesIO(bytes(blob))).getinfo("annotation_00000-01000/annotation_00000.json")
    assert info.compress_type == zipfile.ZIP_DEFLATED
    blob[info.header_offset + 30 + len(info.filename) + len(info.extra) + 5] ^= 0x55
    server.files[path] = bytes(blob)
    with pytest.raises(DownloadError, match=r"annotation_00000\.json.*(corrupt|CRC|deflate|size)"):
        run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))
    assert not (tmp_path / "raw" / layout.annotation_relpath("train", 0)).exists()


@pytest.mark.parametrize("field,delta,error", [
    (24, 100, "disagrees with the central directory"),   # uncompressed size: 100 bytes more than the data
    (20, 10**6, "overruns the next member or the directory"),  # compressed size past the end of the member data
])
def test_sizes_are_checked_against_the_central_directory(field, delta, error, clevrer, server, tmp_path,
                                                         tiny_params_dict_fixture):
    blob = bytearray(clevrer["archives"][VIDEOS])
    name = b"video_00000-01000/video_00000.mp4"
    at = struct.unpack("<L", blob[-6:-2])[0]  # end record: where the central directory starts
    while blob[at + 46:at + 46 + len(name)] != name:
        at = blob.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<L", blob, at + field, struct.unpack_from("<L", blob, at + field)[0] + delta)
    server.files[VIDEOS] = bytes(blob)
    with pytest.raises(DownloadError, match=rf"video_00000\.mp4.*{error}"):
        run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))
    assert not files_under(tmp_path / "raw")


def test_members_far_apart_come_in_separate_requests(clevrer, server, tmp_path, tiny_params_dict_fixture):
    # `zip -r` stores files in directory order, so wanted videos can sit between large unwanted members
    members = {}
    for name, blob in clevrer["members"][VIDEOS].items():
        members[name] = blob
        members[name.replace("video_", "other_")] = np.random.default_rng(len(members)).bytes(3 << 19)
    blob = make_zip(members, method=zipfile.ZIP_STORED)
    server.files[VIDEOS] = blob
    run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))
    check_written(tmp_path / "raw", clevrer)
    data_requests = [r for p, r in server.requests if p == VIDEOS and r and not r.startswith("bytes=-")]
    assert len(data_requests) == 3  # one per wanted video (the central directory came with the 16 KiB tail)
    assert server.sent[VIDEOS] < 0.05 * len(blob)


def test_http_404_names_the_url(server, tmp_path, tiny_params_dict_fixture):
    url = f"{server.url}/no/such/place"
    with pytest.raises(DownloadError, match=re.escape(f"{url}/videos/train/video_train.zip: HTTP 404")):
        run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, url))
    assert not files_under(tmp_path / "raw")


def test_silent_server_hits_the_connect_timeout(tmp_path, monkeypatch, tiny_params_dict_fixture):
    # a firewall that accepts the connection and never answers: the short timeout for the response head
    # applies (not the 60 s one for body reads), and the error names the URL
    assert downloader.CONNECT_TIMEOUT <= 10 < downloader.TIMEOUT
    monkeypatch.setattr(downloader, "CONNECT_TIMEOUT", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept_and_sleep():
        with contextlib.suppress(OSError):  # the listener closes at the end of the test
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept_and_sleep, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    t0 = time.monotonic()
    try:
        with pytest.raises(DownloadError, match=re.escape(f"{url}/videos/train/video_train.zip: ")
                           + r".*timed out.*gave up after 2 attempts"):
            run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, url), retries=1)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert time.monotonic() - t0 < 5


def test_range_answers_are_checked(clevrer, tmp_path, tiny_params_dict_fixture):
    # the tail probe gets its 206, the members' request a 200 with the whole archive: an error, not garbage
    srv = FakeServer(clevrer["archives"], suffix_only=True)
    try:
        with pytest.raises(DownloadError, match=r"video_train\.zip: asked for bytes \d+-\d+/\d+, got HTTP 200 None"):
            run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, srv.url))
    finally:
        srv.close()
    assert not files_under(tmp_path / "raw")


def test_missing_member_is_an_error(server, tmp_path, tiny_params_dict_fixture):
    data = make_data(tiny_params_dict_fixture, server.url, test=5)  # the served validation zip has 4 videos
    with pytest.raises(DownloadError, match=r"video_validation\.zip: archive has no member video_10004\.mp4"):
        run(tmp_path / "raw", tmp_path / "cache", data)


def test_not_a_zip_is_an_error(server, tmp_path, tiny_params_dict_fixture):
    server.files[VIDEOS] = b"<html>maintenance</html>" * 100
    with pytest.raises(DownloadError, match=r"video_train\.zip: not a zip file"):
        run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))


def to_zip64(blob: bytes) -> bytes:
    """Rewrite a small zip's central directory the ZIP64 way (sizes and offsets in ZIP64 extra fields,
    ZIP64 end record and locator), as a zip over 4 GiB has it."""
    _sig, _d, _cdd, _n1, count, cd_size, cd_off, _clen = struct.unpack("<4s4H2LH", blob[-22:])
    cd, out, pos = blob[cd_off:cd_off + cd_size], b"", 0
    while pos < len(cd):
        f = list(struct.unpack_from("<4s6H3L5H2L", cd, pos))
        nlen, xlen, clen = f[10], f[11], f[12]
        name = cd[pos + 46:pos + 46 + nlen]
        extra = cd[pos + 46 + nlen:pos + 46 + nlen + xlen]
        comment = cd[pos + 46 + nlen + xlen:pos + 46 + nlen + xlen + clen]
        new_extra = struct.pack("<2H3Q", 1, 24, f[9], f[8], f[16]) + extra
        f[2], f[8], f[9], f[16], f[11] = 45, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(new_extra)
        out += struct.pack("<4s6H3L5H2L", *f) + name + new_extra + comment
        pos += 46 + nlen + xlen + clen
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(out), cd_off)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, cd_off + len(out), 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return blob[:cd_off] + out + eocd64 + locator + eocd


@pytest.mark.parametrize("kind", ["zip64", "zip64_local", "prefixed"])
def test_zip64_and_prefixed_archives(kind, clevrer, server, tmp_path, tiny_params_dict_fixture):
    members = clevrer["members"][VIDEOS]
    if kind == "prefixed":  # bytes before the zip data (a self-extractor stub): offsets are relative
        blob = b"#!stub\n" * 1000 + clevrer["archives"][VIDEOS]
    else:
        blob = to_zip64(make_zip(members, method=zipfile.ZIP_STORED, force_zip64=kind == "zip64_local"))
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:  # the stdlib agrees the archive is valid
        assert zf.testzip() is None
    server.files[VIDEOS] = blob
    run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))
    check_written(tmp_path / "raw", clevrer)
    assert server.sent[VIDEOS] < 0.3 * len(blob)


@pytest.mark.parametrize("kind", ["big_central_directory", "long_comment"])
def test_end_records_beyond_the_first_tail(kind, clevrer, server, tmp_path, tiny_params_dict_fixture):
    members = dict(clevrer["members"][VIDEOS])
    if kind == "big_central_directory":  # the directory does not fit in the 16 KiB tail: one more request, cached
        members.update({f"video_00000-01000/notes_{k:04d}.txt": b"n" for k in range(400)})
    blob = make_zip(members, method=zipfile.ZIP_STORED)
    if kind == "long_comment":  # the end record sits more than 16 KiB before the end of the file
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            assert len(zf.infolist()) == 25
        buf = io.BytesIO(blob)
        with zipfile.ZipFile(buf, "a") as zf:
            zf.comment = b"c" * 40000
        blob = buf.getvalue()
    server.files[VIDEOS] = blob
    data = make_data(tiny_params_dict_fixture, server.url)
    run(tmp_path / "raw", tmp_path / "cache", data)
    check_written(tmp_path / "raw", clevrer)
    ranges = [r for p, r in server.requests if p == VIDEOS]
    assert len(ranges) == 3, ranges  # tail, then the directory or the longer tail, then the 3 videos
    server.reset_counts()
    run(tmp_path / "raw2", tmp_path / "cache", data)
    check_written(tmp_path / "raw2", clevrer)
    ranges = [r for p, r in server.requests if p == VIDEOS]
    assert len(ranges) == (1 if kind == "big_central_directory" else 2), ranges  # directory from the cache


@pytest.mark.parametrize("head", [True, False])
def test_cache_is_dropped_when_the_archive_changes(head, clevrer, tmp_path, tiny_params_dict_fixture):
    srv = FakeServer(clevrer["archives"], head=head)
    try:
        data = make_data(tiny_params_dict_fixture, srv.url)
        run(tmp_path / "raw", tmp_path / "cache", data)
        members = dict(clevrer["members"][VIDEOS])
        members["video_00000-01000/video_00000.mp4"] = clevrer["videos"][5]  # a new release of the archive
        srv.files[VIDEOS] = make_zip(members, method=zipfile.ZIP_STORED)
        srv.etag = '"v2"'
        run(tmp_path / "raw2", tmp_path / "cache", data)
    finally:
        srv.close()
    assert (tmp_path / "raw2" / layout.video_relpath("train", 0)).read_bytes() == clevrer["videos"][5]


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's zip")
@pytest.mark.parametrize("flags", [[], ["-fz"], ["-0"]])
def test_info_zip_archives(flags, clevrer, server, tmp_path, tiny_params_dict_fixture):
    """Archives made with Info-ZIP (likely the tool behind CLEVRER's): local extra fields longer than the
    central ones (UT/ux), directory entries, and with -fz ZIP64 records."""
    src = tmp_path / "src"
    for name, blob in clevrer["members"][VIDEOS].items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(blob)
    subprocess.run(["zip", "-r", "-q", *flags, str(tmp_path / "v.zip"), "video_00000-01000"], cwd=src, check=True)
    blob = (tmp_path / "v.zip").read_bytes()
    server.files[VIDEOS] = blob
    run(tmp_path / "raw", tmp_path / "cache", make_data(tiny_params_dict_fixture, server.url))
    check_written(tmp_path / "raw", clevrer)
