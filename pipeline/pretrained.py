"""Pretrained torchvision weights as a DVC-tracked artifact: the files the params ask for, one torch hub dir each.

Three parts of the pipeline use pretrained torchvision weights, each through torch.hub's cache layout:

- ``flow``: RAFT (`flow.backend` when it is raft_large / raft_small, and `flow.cpu_raft`, the variant a
  RAFT request runs as on CPU; nothing for dis / gt);
- ``lpips``: the LPIPS backbone (`eval.lpips_net`: alex -> AlexNet, vgg -> VGG16, ImageNet weights);
- ``encoder``: the clip_lstm image encoder (`model.encoder` resnet18 / vit_b_16, only when
  `model.arch` is clip_lstm; nothing for the trainable cnn encoder).

`requested_weights` turns those params into `WeightsRequest`s (consumer, torchvision enum name, URL), taking
the URLs from the torchvision Weights enums through the project's own helpers. `provide` makes each request
available under ``<out_dir>/<consumer>/hub/checkpoints/<file>``, where <file> is the basename of the URL
(torchvision's names carry the first hex digits of the file's sha256, torch.hub.HASH_REGEX):

1. from the torch hub cache, ``<hub_dir>/checkpoints/<file>`` (default `torch.hub.get_dir()`), trusted as
   torch.hub trusts it (its sha256 is recorded, not checked against the name: a bad file shows when the
   consumer loads it, and the flow stage then falls back with the load error);
2. else, when `download` is set, fetched into the hub cache (so it is there next time) with torch.hub's own
   `download_url_to_file` (its progress bar, its sha256 prefix check, its temporary file + move), from
   torchvision's URL or from ``<mirror>/<file>`` (an http(s):// or file:// base). Every socket wait is
   bounded by `connect_timeout` and a body shorter than its Content-Length is an error (urllib alone would
   end such a body silently and torch.hub would keep the truncated file when the name has no hash), so a
   dropped route fails in about `connect_timeout` seconds and a cut transfer is retried `retries` times; a
   hash mismatch is refused at once. Nothing is ever left under the final name unless complete and checked;
3. else it is recorded as missing, with the reason (download disabled, or the fetch error in one line).

The files are hard-linked (copied where linking fails) into the output dir, so a consumer can call
``torch.hub.set_dir(weights_dir(out_dir, consumer))`` and load as usual, or ask `available`. Each consumer
dir also gets ``manifest.json``, written for every consumer with requests and for each of flow / lpips /
encoder even without any, so the stage's outputs always exist::

    {"consumer": "flow", "weights": [{"name": "Raft_Small_Weights.C_T_V2", "file": "raft_small_C_T_V2-01064c6d.pth",
      "url": "https://download.pytorch.org/models/...", "available": true, "sha256": "<hex>", "reason": null}]}

The manifest is a pure function of which files are available and their bytes: the URL is torchvision's
(never the mirror), there are no timestamps, no host paths (in a reason they read <hub>, <out>, <mirror>)
and no "fetched vs cached"; that goes to the log and to the "run" entry of `provide`'s result. Files a
previous run left in a consumer's checkpoints dir that are not available now are removed, so the output dir
holds exactly what the manifests list as available.
"""
from __future__ import annotations

import contextlib
import logging
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

import torch.hub

from pipeline.fetch import DownloadError, fetch, one_line
from pipeline.io import atomic_path, file_digest, write_json

LOG = logging.getLogger(__name__)

__all__ = [
    "CONSUMERS", "MANIFEST", "WeightsRequest", "DownloadError", "requested_weights", "provide", "fetch",
    "weights_dir", "available", "read_manifest", "hash_prefix", "sha256_file",
]

CONSUMERS = ("flow", "lpips", "encoder")  # a manifest is always written for each of these
MANIFEST = "manifest.json"
MIRROR_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class WeightsRequest:
    """One pretrained weights file a consumer needs: torchvision's enum name and its download URL."""

    consumer: str
    name: str
    url: str

    def __post_init__(self):
        if not self.consumer or self.consumer in (".", "..") or "/" in self.consumer or "\\" in self.consumer:
            raise ValueError(f"weights consumer must be a plain directory name, got {self.consumer!r}")
        if not self.file:
            raise ValueError(f"weights URL {self.url!r} ({self.name}) has no file name")

    @property
    def file(self) -> str:
        """The file name: the basename of the URL's path (what torch.hub caches it as)."""
        return os.path.basename(urlparse(self.url).path)


def hash_prefix(file: str) -> str | None:
    """The sha256 prefix torch.hub reads from a weights file name (resnet18-f37072fd.pth -> f37072fd), or None."""
    m = torch.hub.HASH_REGEX.search(file)
    return m.group(1) if m and m.group(1) else None


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (the hash torch.hub's file names carry a prefix of)."""
    return file_digest(path, algorithm="sha256", chunk=chunk)


# the project's pretrained components and their torchvision Weights (enum class, member); one table for all
COMPONENTS = {
    "raft_large": ("torchvision.models.optical_flow", "Raft_Large_Weights", "C_T_SKHT_V2"),
    "raft_small": ("torchvision.models.optical_flow", "Raft_Small_Weights", "C_T_V2"),
    "alex": ("torchvision.models", "AlexNet_Weights", "IMAGENET1K_V1"),
    "vgg": ("torchvision.models", "VGG16_Weights", "IMAGENET1K_V1"),
    "resnet18": ("torchvision.models", "ResNet18_Weights", "IMAGENET1K_V1"),
    "vit_b_16": ("torchvision.models", "ViT_B_16_Weights", "IMAGENET1K_V1"),
}
RAFT_VARIANTS = ("raft_large", "raft_small")


def torchvision_weights(component: str) -> Any:
    """The torchvision Weights member of a component: raft_large, raft_small, alex, vgg, resnet18, vit_b_16."""
    import importlib

    if component not in COMPONENTS:
        raise ValueError(f"no pretrained weights for {component!r}; components: {', '.join(COMPONENTS)}")
    module, enum, member = COMPONENTS[component]
    return getattr(getattr(importlib.import_module(module), enum), member)


def hub_path(component: str, hub_dir: str | Path | None = None) -> Path:
    """Where a torch hub dir (default torch.hub.get_dir()) holds a component's file: <hub>/checkpoints/<file>."""
    file = os.path.basename(urlparse(torchvision_weights(component).url).path)
    return Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints" / file


@contextlib.contextmanager
def hub_dir(path: str | Path | None) -> Iterator[None]:
    """`torch.hub.set_dir(path)` inside the block (torchvision and lpips then load from there); None: unchanged."""
    if path is None:
        yield
        return
    before = torch.hub._hub_dir  # None = follow $TORCH_HOME; restoring get_dir()'s value would pin it
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub._hub_dir = before


def _request(consumer: str, weights: Any) -> WeightsRequest:
    return WeightsRequest(consumer=consumer, name=str(weights), url=weights.url)


def requested_weights(*, flow_backend: str, cpu_raft: str, lpips_net: str, arch: str,
                      encoder: str) -> list[WeightsRequest]:
    """The weights the params ask for, flow then lpips then encoder, from torchvision's Weights enums."""
    flow_backends = (*RAFT_VARIANTS, "dis", "gt")
    if flow_backend not in flow_backends:
        raise ValueError(f"flow.backend must be one of {', '.join(flow_backends)}, got {flow_backend!r}")
    if cpu_raft not in RAFT_VARIANTS:
        raise ValueError(f"flow.cpu_raft must be one of {', '.join(RAFT_VARIANTS)}, got {cpu_raft!r}")
    if lpips_net not in ("alex", "vgg"):
        raise ValueError(f"eval.lpips_net must be alex or vgg, got {lpips_net!r}")
    requests: list[WeightsRequest] = []
    if flow_backend in RAFT_VARIANTS:  # CUDA runs flow.backend, CPU runs flow.cpu_raft
        for variant in dict.fromkeys((flow_backend, cpu_raft)):
            requests.append(_request("flow", torchvision_weights(variant)))
    requests.append(_request("lpips", torchvision_weights(lpips_net)))
    if arch == "clip_lstm" and encoder != "cnn":
        if encoder not in ("resnet18", "vit_b_16"):
            raise ValueError(f"model.encoder must be resnet18, vit_b_16 or cnn, got {encoder!r}")
        requests.append(_request("encoder", torchvision_weights(encoder)))
    return requests


def weights_dir(out_dir: str | Path, consumer: str) -> Path:
    """A consumer's torch hub dir in the output: `torch.hub.set_dir` it, or read `<it>/checkpoints/<file>`."""
    return Path(out_dir) / consumer / "hub"


def read_manifest(out_dir: str | Path, consumer: str) -> dict | None:
    """A consumer's manifest.json in the output dir, or None when there is none."""
    path = Path(out_dir) / consumer / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid weights manifest ({e}); re-run the pretrained stage") from None


def available(out_dir: str | Path, consumer: str, file: str) -> Path | None:
    """The weights file in the output dir when its manifest lists it as available and it is there, else None."""
    manifest = read_manifest(out_dir, consumer)
    if manifest is None:
        return None
    if not any(w.get("file") == file and w.get("available") for w in manifest.get("weights", [])):
        return None
    path = weights_dir(out_dir, consumer) / "checkpoints" / file
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- provide

def _source_url(request: WeightsRequest, mirror: str | None) -> str:
    return request.url if mirror is None else mirror.rstrip("/") + "/" + request.file


def _check_mirror(mirror: str | None) -> None:
    if mirror is not None and urlparse(mirror).scheme not in MIRROR_SCHEMES:
        raise ValueError(f"weights mirror must be an http://, https:// or file:// base URL, got {mirror!r}")


def _scrubber(*, hub_dir: Path, out_dir: Path, mirror: str | None) -> Callable[[str], str]:
    """A function that replaces host paths in a reason with <hub>, <out>, <mirror>, for the manifest."""
    pairs = [(str(hub_dir), "<hub>"), (str(hub_dir.resolve()), "<hub>"),
             (str(out_dir), "<out>"), (str(out_dir.resolve()), "<out>")]
    if mirror is not None and urlparse(mirror).scheme == "file":
        local = urllib.request.url2pathname(urlparse(mirror).path).rstrip("/")
        pairs += [(mirror.rstrip("/"), "<mirror>"), (local, "<mirror>")]
    pairs = sorted({(a, b) for a, b in pairs if a and a != "/"}, key=lambda p: -len(p[0]))

    def scrub(text: str) -> str:
        for host, placeholder in pairs:
            text = text.replace(host, placeholder)
        return text

    return scrub


def _verify(path: Path, file: str, *, check_prefix: bool = True) -> tuple[str | None, str | None]:
    """(sha256, None) for a usable file, (None, reason) for a corrupt (check_prefix) or unreadable one."""
    if not path.is_file():
        return None, f"{file} in the torch hub cache is not a regular file; not used"
    try:
        digest = sha256_file(path)
    except OSError as e:
        return None, f"{file} in the torch hub cache could not be read ({one_line(e)}); not used"
    prefix = hash_prefix(file)
    if check_prefix and prefix is not None and not digest.startswith(prefix):
        return None, (f"{file} in the torch hub cache is corrupt: its sha256 {digest} does not start with the "
                      f"hash prefix {prefix} in its name; not used (delete it to fetch it again)")
    return digest, None


def _place(src: Path, dst: Path) -> str:
    """Hard-link (else copy) src to dst atomically; returns how."""
    if dst.is_file() and os.path.samefile(src, dst):
        return "already linked"
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
            return "hard-linked"
        except OSError:
            shutil.copyfile(src, tmp)
            return "copied"


def _prune(checkpoints: Path, keep: set[str], log: Callable[[str], Any]) -> None:
    """Remove files in a consumer's output checkpoints dir that this run does not make available."""
    if not checkpoints.is_dir():
        return
    for entry in sorted(checkpoints.iterdir()):
        if entry.name not in keep and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
            log(f"pretrained: removed {entry} (left by an earlier run; not available now)")


def provide(requests: Iterable[WeightsRequest], out_dir: str | Path, *, download: bool, mirror: str | None,
            hub_dir: str | Path | None = None, connect_timeout: float = 10.0, retries: int = 2,
            retry_wait: float = 1.0, progress: bool = True, log: Callable[[str], Any] = LOG.info) -> dict:
    """Make each request available under <out_dir>/<consumer>/hub/checkpoints (hub cache, else fetched, else
    recorded missing), write every consumer's manifest.json; returns {"consumers": {...}, "run": {...}}."""
    t0 = time.monotonic()
    _check_mirror(mirror)
    out_dir = Path(out_dir)
    hub_dir = Path(torch.hub.get_dir() if hub_dir is None else hub_dir)
    cache = hub_dir / "checkpoints"
    scrub = _scrubber(hub_dir=hub_dir, out_dir=out_dir, mirror=mirror)

    by_consumer: dict[str, list[WeightsRequest]] = {c: [] for c in CONSUMERS}
    for r in requests:
        same = [q for q in by_consumer.setdefault(r.consumer, []) if q.file == r.file]
        if same and same[0].url != r.url:
            raise ValueError(f"{r.consumer}: two requests for {r.file} with different URLs: {same[0].url}, {r.url}")
        if not same:
            by_consumer[r.consumer].append(r)

    run: dict[str, Any] = {"fetched": [], "from_cache": [], "missing": []}
    manifests: dict[str, dict] = {}
    for consumer, reqs in by_consumer.items():
        entries, keep = [], set()
        for r in reqs:
            key, cached = f"{consumer}/{r.file}", cache / r.file
            how, digest, reason = None, None, None
            if cached.exists():  # trusted as torch.hub trusts its cache; a download is checked
                digest, reason = _verify(cached, r.file, check_prefix=False)
                how = "from_cache"
            elif download:
                src = _source_url(r, mirror)
                log(f"pretrained: {key}: not in the torch hub cache; fetching {src} into {cached}")
                try:
                    fetch(src, cached, hash_prefix=hash_prefix(r.file), connect_timeout=connect_timeout,
                          retries=retries, retry_wait=retry_wait, progress=progress, log=log)
                    digest, reason = _verify(cached, r.file)
                    how = "fetched"
                except DownloadError as e:
                    reason = str(e)
            else:
                reason = f"{r.file} is not in the torch hub cache and downloading is disabled"
            if digest is not None:
                placed = _place(cached, weights_dir(out_dir, consumer) / "checkpoints" / r.file)
                keep.add(r.file)
                run[how].append(key)
                log(f"pretrained: {key}: {'fetched into' if how == 'fetched' else 'from'} the torch hub cache "
                    f"{cached} ({placed}; sha256 {digest[:12]})")
            else:
                run["missing"].append(key)
                log(f"pretrained: {key}: MISSING: {reason}")
            entries.append({"name": r.name, "file": r.file, "url": r.url, "available": digest is not None,
                            "sha256": digest, "reason": None if reason is None else scrub(reason)})
        _prune(weights_dir(out_dir, consumer) / "checkpoints", keep, log)
        manifests[consumer] = {"consumer": consumer, "weights": entries}
        write_json(out_dir / consumer / MANIFEST, manifests[consumer])
    run["seconds"] = round(time.monotonic() - t0, 3)
    return {"consumers": manifests, "run": run}
