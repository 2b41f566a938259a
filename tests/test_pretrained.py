"""pipeline.pretrained against a local HTTP server on 127.0.0.1 serving small weights files the tests write."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torchvision.models import AlexNet_Weights, ResNet18_Weights, VGG16_Weights, ViT_B_16_Weights
from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

from pipeline.pretrained import (
    CONSUMERS, WeightsRequest, available, fetch, hash_prefix, provide, read_manifest, requested_weights, sha256_file,
    weights_dir,
)

FAST = dict(connect_timeout=5.0, retry_wait=0.05, progress=False)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """A fresh TORCH_HOME per test (torch.hub.get_dir() -> <it>/hub); localhost never goes through a proxy."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere in the session would win over the env
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def hub_checkpoints(torch_home: Path) -> Path:
    return torch_home / "hub" / "checkpoints"


def weights_file(directory: Path, stem: str, *, seed: int = 0, hashed: bool = True) -> tuple[str, bytes]:
    """A small torch.save'd state dict named like torchvision's files: <stem>-<sha256 prefix>.pth."""
    buf = io.BytesIO()
    torch.save({"weight": torch.arange(256, dtype=torch.float32) + seed, "bias": torch.zeros(4)}, buf)
    data = buf.getvalue()
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth" if hashed else f"{stem}.pth"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return name, data


def request_for(file: str, consumer: str = "flow") -> WeightsRequest:
    """A request with an unreachable 'torchvision' URL: the tests fetch it from a mirror."""
    return WeightsRequest(consumer=consumer, name=f"Test_Weights.{file.split('-')[0].upper()}",
                          url=f"https://download.invalid/models/{file}")


def tree(root: Path) -> list[str]:
    """Every file under root, relative, sorted (temporary and partial files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


class _Server:
    """ThreadingHTTPServer on 127.0.0.1 (port 0) in a thread; counts GETs per path."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.gets: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class _FilesHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.owner.gets.append(self.path)
        super().do_GET()


@pytest.fixture
def served(tmp_path):
    """(served dir, server): files written to the dir are served under the server's URL."""
    root = tmp_path / "served"
    root.mkdir()
    server = _Server(functools.partial(_FilesHandler, directory=str(root)))
    yield root, server
    server.close()


def cutting_server(payload: bytes, *, cut_first: int) -> _Server:
    """Serves `payload` at any path; the first `cut_first` GETs announce its full Content-Length, send half, close."""

    class Cut(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            gets = self.server.owner.gets
            gets.append(self.path)
            cut = len(gets) <= cut_first
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2] if cut else payload)
            self.wfile.flush()
            self.close_connection = True

    return _Server(Cut)


# ----------------------------------------------------------------------------- fetched, then from the cache

def test_fetched_from_mirror_into_hub_cache_and_out_dir_then_taken_from_cache(tmp_path, served, torch_home):
    root, server = served
    file, data = weights_file(root, "raft_test_V2", seed=1)
    req = request_for(file)
    out = tmp_path / "out"
    logs: list[str] = []

    res = provide([req], out, download=True, mirror=server.url + "/", log=logs.append, **FAST)
    assert res["run"]["fetched"] == [f"flow/{file}"] and res["run"]["from_cache"] == []
    assert server.gets == [f"/{file}"]
    assert (hub_checkpoints(torch_home) / file).read_bytes() == data  # the hub cache is filled for next time
    assert tree(hub_checkpoints(torch_home)) == [file]  # no partial file left behind
    target = weights_dir(out, "flow") / "checkpoints" / file
    assert target.read_bytes() == data
    assert available(out, "flow", file) == target
    assert available(out, "flow", "other-01234567.pth") is None
    assert any(server.url in line and "fetching" in line for line in logs)

    manifest = json.loads((out / "flow" / "manifest.json").read_text())
    assert manifest == {"consumer": "flow", "weights": [{
        "name": req.name, "file": file, "url": req.url, "available": True,
        "sha256": hashlib.sha256(data).hexdigest(), "reason": None}]}
    assert res["consumers"]["flow"] == manifest == read_manifest(out, "flow")
    for consumer in ("lpips", "encoder"):  # the stage's outputs always exist
        assert json.loads((out / consumer / "manifest.json").read_text()) == {"consumer": consumer, "weights": []}
    assert tree(out) == sorted([f"flow/hub/checkpoints/{file}", "flow/manifest.json", "encoder/manifest.json",
                                "lpips/manifest.json"])

    # a consumer loads it the usual torch.hub way, without any network
    state = torch.hub.load_state_dict_from_url(req.url, model_dir=str(weights_dir(out, "flow") / "checkpoints"),
                                               check_hash=True, progress=False)
    assert torch.equal(state["weight"], torch.arange(256, dtype=torch.float32) + 1)

    first = {c: (out / c / "manifest.json").read_bytes() for c in CONSUMERS}
    (root / file).unlink()  # the second run cannot fetch: it must come from the cache
    res2 = provide([req], out, download=True, mirror=server.url, log=_quiet, **FAST)
    assert res2["run"]["from_cache"] == [f"flow/{file}"] and res2["run"]["fetched"] == []
    assert server.gets == [f"/{file}"]
    assert {c: (out / c / "manifest.json").read_bytes() for c in CONSUMERS} == first  # identical bytes
    assert target.read_bytes() == data


def test_file_mirror(tmp_path, torch_home):
    mirror = tmp_path / "mirror dir"
    file, data = weights_file(mirror, "resnet_test", seed=2)
    out = tmp_path / "out"
    res = provide([request_for(file, "encoder")], out, download=True, mirror=mirror.as_uri(), log=_quiet, **FAST)
    assert res["run"]["fetched"] == [f"encoder/{file}"]
    assert (hub_checkpoints(torch_home) / file).read_bytes() == data
    assert available(out, "encoder", file).read_bytes() == data
    assert res["consumers"]["encoder"]["weights"][0]["url"] == f"https://download.invalid/models/{file}"


def test_hub_dir_argument_and_stale_output_pruned(tmp_path, served):
    root, server = served
    file, data = weights_file(root, "vgg_test", seed=3)
    hub, out = tmp_path / "elsewhere" / "hub", tmp_path / "out"
    provide([request_for(file, "lpips")], out, download=True, mirror=server.url, hub_dir=hub, log=_quiet, **FAST)
    assert (hub / "checkpoints" / file).read_bytes() == data
    assert available(out, "lpips", file) is not None

    (hub / "checkpoints" / file).unlink()  # gone from the cache and downloads off: the output must not keep it
    res = provide([request_for(file, "lpips")], out, download=False, mirror=None, hub_dir=hub, log=_quiet)
    assert res["run"]["missing"] == [f"lpips/{file}"]
    assert available(out, "lpips", file) is None
    assert not (weights_dir(out, "lpips") / "checkpoints" / file).exists()


# ----------------------------------------------------------------------------- refused: hash, cut transfers

def test_wrong_hash_refused_at_once_and_nothing_left(tmp_path, served, torch_home):
    root, server = served
    real, data = weights_file(root, "alexnet_test", seed=4)
    digest = hashlib.sha256(data).hexdigest()
    wrong = "alexnet_test-" + ("0" if digest[0] != "0" else "1") + digest[1:8] + ".pth"
    (root / wrong).write_bytes(data)
    out = tmp_path / "out"
    res = provide([request_for(wrong, "lpips")], out, download=True, mirror=server.url, retries=2, log=_quiet, **FAST)
    entry = res["consumers"]["lpips"]["weights"][0]
    assert entry["available"] is False and entry["sha256"] is None
    assert wrong in entry["reason"] and f"{server.url}/{wrong}" in entry["reason"] and "hash" in entry["reason"]
    assert server.gets == [f"/{wrong}"]  # no retry of a hash mismatch
    assert tree(hub_checkpoints(torch_home)) == []
    assert tree(out / "lpips") == ["manifest.json"]
    assert json.loads((out / "lpips" / "manifest.json").read_text())["weights"][0] == entry


def test_a_cached_file_is_trusted_as_torch_hub_does(tmp_path, served, torch_home):
    """The hub cache is not re-hashed against the name (torch.hub does not either); its sha256 is recorded."""
    root, server = served
    file, _ = weights_file(root, "raft_small_test", seed=5)
    cached = hub_checkpoints(torch_home) / file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    out = tmp_path / "out"
    res = provide([request_for(file)], out, download=True, mirror=server.url, log=_quiet, **FAST)
    entry = res["consumers"]["flow"]["weights"][0]
    assert entry["available"] is True and entry["sha256"] == sha256_file(cached)
    assert server.gets == []  # nothing fetched over it
    assert available(out, "flow", file).read_bytes() == b"not the weights"


def provide_through_cuts(tmp_path, *, seed: int, hashed: bool, cut_first: int, log=_quiet):
    """provide() one weights file from a mirror that cuts its first `cut_first` transfers, with 2 retries.

    Returns (file, data, server, result, out dir)."""
    file, data = weights_file(tmp_path / "src", "cut_test", seed=seed, hashed=hashed)
    server = cutting_server(data, cut_first=cut_first)
    out = tmp_path / "out"
    try:
        res = provide([request_for(file)], out, download=True, mirror=server.url, retries=2, log=log, **FAST)
    finally:
        server.close()
    return file, data, server, res, out


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed-name", "name-without-hash"])
def test_cut_transfer_is_retried_and_succeeds(tmp_path, torch_home, hashed):
    logs: list[str] = []
    file, data, server, res, out = provide_through_cuts(tmp_path, seed=6, hashed=hashed, cut_first=1,
                                                        log=logs.append)
    assert len(server.gets) == 2
    assert res["run"]["fetched"] == [f"flow/{file}"]
    assert (hub_checkpoints(torch_home) / file).read_bytes() == data
    assert available(out, "flow", file).read_bytes() == data
    assert any("attempt 1/3" in line and "IncompleteRead" in line for line in logs)


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed-name", "name-without-hash"])
def test_every_attempt_cut_is_missing_and_leaves_nothing(tmp_path, torch_home, hashed):
    file, _, server, res, out = provide_through_cuts(tmp_path, seed=7, hashed=hashed, cut_first=100)
    assert len(server.gets) == 3  # 1 + retries
    entry = res["consumers"]["flow"]["weights"][0]
    assert entry["available"] is False and entry["sha256"] is None
    reason = entry["reason"]
    assert "\n" not in reason and file in reason and f"{server.url}/{file}" in reason and "IncompleteRead" in reason
    assert tree(hub_checkpoints(torch_home)) == []  # neither the final name nor a partial
    assert tree(out / "flow") == ["manifest.json"]


# ----------------------------------------------------------------------------- disabled, unresponsive

def test_download_disabled_records_missing_with_reason(tmp_path, torch_home):
    requests = requested_weights(flow_backend="raft_large", cpu_raft="raft_small", lpips_net="alex",
                                 arch="clip_lstm", encoder="resnet18")
    out = tmp_path / "out"
    res = provide(requests, out, download=False, mirror=None, log=_quiet)
    assert sorted(res["run"]["missing"]) == sorted(f"{r.consumer}/{r.file}" for r in requests)
    for consumer in CONSUMERS:
        manifest = json.loads((out / consumer / "manifest.json").read_text())
        assert manifest == res["consumers"][consumer]
        for w, r in zip(manifest["weights"], [r for r in requests if r.consumer == consumer], strict=True):
            assert w == {"name": r.name, "file": r.file, "url": r.url, "available": False, "sha256": None,
                         "reason": f"{r.file} is not in the torch hub cache and downloading is disabled"}
    assert [w["file"] for w in res["consumers"]["flow"]["weights"]] == [
        "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "raft_small_C_T_V2-01064c6d.pth"]
    assert not hub_checkpoints(torch_home).exists()
    assert tree(out) == ["encoder/manifest.json", "flow/manifest.json", "lpips/manifest.json"]


def test_unresponsive_server_fails_within_the_timeout(tmp_path, torch_home):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop, held = threading.Event(), []

    def accept_and_sleep():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # accept, then never answer
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_sleep, daemon=True)
    thread.start()
    before_timeout, before_opener = socket.getdefaulttimeout(), getattr(urllib.request, "_opener", None)
    file = "silent_test-0123abcd.pth"
    result: dict = {}

    def run():  # in a thread, so that a regression fails this test instead of hanging the suite
        result["res"] = provide([request_for(file)], tmp_path / "out", download=True,
                                mirror=f"http://127.0.0.1:{listener.getsockname()[1]}", connect_timeout=1,
                                retries=2, retry_wait=0.05, progress=False, log=_quiet)

    try:
        t0 = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(20)
        elapsed = time.monotonic() - t0
        assert not worker.is_alive(), "provide() still waiting on a server that never answers"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert elapsed < 10
    assert len(held) == 3  # every attempt connected, none got an answer
    entry = result["res"]["consumers"]["flow"]["weights"][0]
    assert entry["available"] is False and "timed out" in entry["reason"] and file in entry["reason"]
    assert socket.getdefaulttimeout() == before_timeout  # the process-wide settings are restored
    assert getattr(urllib.request, "_opener", None) is before_opener
    assert tree(hub_checkpoints(torch_home)) == []


def test_fetch_http_404_is_not_retried(tmp_path, served):
    _, server = served
    with pytest.raises(RuntimeError, match=r"missing-01234567\.pth.*404"):
        fetch(f"{server.url}/missing-01234567.pth", tmp_path / "hub" / "missing-01234567.pth",
              hash_prefix="01234567", retries=3, log=_quiet, **FAST)
    assert server.gets == ["/missing-01234567.pth"]
    assert tree(tmp_path / "hub") == []


def test_file_mirror_without_the_file_is_missing_without_retries(tmp_path, torch_home):
    mirror = tmp_path / "empty mirror"
    mirror.mkdir()
    logs: list[str] = []
    res = provide([request_for("absent-0123abcd.pth")], tmp_path / "out", download=True, mirror=mirror.as_uri(),
                  retries=2, log=logs.append, **FAST)
    reason = res["consumers"]["flow"]["weights"][0]["reason"]
    assert "absent-0123abcd.pth" in reason and "<mirror>/absent-0123abcd.pth" in reason
    assert str(tmp_path) not in reason  # the file:// mirror is a host path: not in the manifest
    assert not any("retrying" in line for line in logs)
    assert tree(hub_checkpoints(torch_home)) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="ftp://x"):
        provide([], "out", download=True, mirror="ftp://x")
    with pytest.raises(ValueError, match="no file name"):
        WeightsRequest(consumer="flow", name="X", url="https://example.invalid/")
    with pytest.raises(ValueError, match="plain directory name"):
        WeightsRequest(consumer="../x", name="X", url="https://example.invalid/a-0123.pth")


# ----------------------------------------------------------------------------- what the params ask for

def urls(requests: list[WeightsRequest], consumer: str) -> list[str]:
    return [r.url for r in requests if r.consumer == consumer]


def test_requested_weights_per_params():
    base = dict(flow_backend="dis", cpu_raft="raft_small", lpips_net="alex", arch="warp_occ", encoder="resnet18")
    reqs = requested_weights(**base)
    assert urls(reqs, "flow") == [] and urls(reqs, "encoder") == []  # dis: no RAFT; not clip_lstm: no encoder
    assert urls(reqs, "lpips") == [AlexNet_Weights.IMAGENET1K_V1.url]
    assert reqs[0] == WeightsRequest("lpips", "AlexNet_Weights.IMAGENET1K_V1", AlexNet_Weights.IMAGENET1K_V1.url)
    assert reqs[0].file == "alexnet-owt-7be5be79.pth" and hash_prefix(reqs[0].file) == "7be5be79"

    assert urls(requested_weights(**{**base, "flow_backend": "gt"}), "flow") == []
    two = requested_weights(**{**base, "flow_backend": "raft_large"})
    assert urls(two, "flow") == [Raft_Large_Weights.C_T_SKHT_V2.url, Raft_Small_Weights.C_T_V2.url]
    assert [r.name for r in two if r.consumer == "flow"] == ["Raft_Large_Weights.C_T_SKHT_V2",
                                                             "Raft_Small_Weights.C_T_V2"]
    assert urls(requested_weights(**{**base, "flow_backend": "raft_small"}), "flow") == [Raft_Small_Weights.C_T_V2.url]
    assert urls(requested_weights(**{**base, "flow_backend": "raft_small", "cpu_raft": "raft_large"}), "flow") == [
        Raft_Small_Weights.C_T_V2.url, Raft_Large_Weights.C_T_SKHT_V2.url]

    assert urls(requested_weights(**{**base, "lpips_net": "vgg"}), "lpips") == [VGG16_Weights.IMAGENET1K_V1.url]
    assert urls(requested_weights(**{**base, "arch": "clip_lstm", "encoder": "cnn"}), "encoder") == []
    assert urls(requested_weights(**{**base, "arch": "clip_lstm"}), "encoder") == [ResNet18_Weights.IMAGENET1K_V1.url]
    assert urls(requested_weights(**{**base, "arch": "clip_lstm", "encoder": "vit_b_16"}), "encoder") == [
        ViT_B_16_Weights.IMAGENET1K_V1.url]
    full = requested_weights(**{**base, "flow_backend": "raft_large", "arch": "clip_lstm"})
    assert [r.consumer for r in full] == ["flow", "flow", "lpips", "encoder"]

    with pytest.raises(ValueError, match="flow.backend"):
        requested_weights(**{**base, "flow_backend": "farneback"})
    with pytest.raises(ValueError, match="lpips"):
        requested_weights(**{**base, "lpips_net": "squeeze"})


def test_request_file_is_the_url_basename():
    r = WeightsRequest(consumer="flow", name="X", url="https://host/a/b/raft-0123abcd.pth?download=1")
    assert r.file == "raft-0123abcd.pth" and hash_prefix(r.file) == "0123abcd"
    assert hash_prefix("plain.pth") is None
