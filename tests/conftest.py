"""Tiny params shared by the suite (the `tests` profile of pipeline/profiles.yaml), markers, the GPU skip."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import tiny_params_dict
from pipeline.config import Params, params_from_dict

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and oversubscribe under load)


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
