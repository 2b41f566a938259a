"""Tiny params shared by the suite: 32x32 frames, 8 frames a video, 4 train videos."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import Params, params_from_dict

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and oversubscribe under load)

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "data": {"videos": {"train": 4, "val": 1, "test": 2}, "frames": 8, "resolution": [32, 32], "workers": 1},
    "synthetic": {"width": 64, "height": 48, "frames": 8, "min_objects": 2, "max_objects": 3},
    "flow": {"backend": "dis", "batch": 8},
    "vae": {"hidden": 16, "latent_channels": 4, "steps": 30, "batch": 8, "kl_warmup": 10},
    "flow_vae": {"hidden": 8, "latent_channels": 2, "steps": 20, "batch": 8, "kl_warmup": 10},
    "model": {"hidden": 16, "context": 2},
    "train": {"steps": 20, "batch": 4, "rollout": 2},
    "ttt": {"steps": 2},
    "eval": {"context": 3, "horizon": 4, "figures": 1},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params_dict() -> dict:
    """The repo's params.yaml with the tiny overrides applied."""
    return merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_OVERRIDES)


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_params_dict())


@pytest.fixture
def tiny_params_dict_fixture() -> dict:
    return tiny_params_dict()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
