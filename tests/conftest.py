"""Fixtures shared by the suite: tiny params (the `tests` profile of pipeline/profiles.yaml), a tiny CLEVRER,
the encode stage's inputs; markers, the GPU skip."""
from __future__ import annotations

import os

import pytest
import torch

from clevrer_server import make_clevrer
from helpers import ENCODE_SPLITS, squares_splits, tiny_params_dict, write_flow_h5, write_frames_h5
from pipeline.config import Params, params_from_dict

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and oversubscribe under load)


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_params_dict())


@pytest.fixture
def tiny_params_dict_fixture() -> dict:
    return tiny_params_dict()


@pytest.fixture(scope="module")
def clevrer(tmp_path_factory) -> dict:
    """A tiny CLEVRER in the official archive layout (clevrer_server.make_clevrer), built once per module."""
    return make_clevrer(tmp_path_factory.mktemp("videos"))


@pytest.fixture
def encode_inputs(tmp_path):
    """The encode stage's inputs under tmp_path: frames.h5 and flow.h5 of the same moving squares (ENCODE_SPLITS,
    6 frames of 16x16) and checkpoints of two small untrained VAEs. Returns (tmp_path, vae, flow_vae), eval mode."""
    from pipeline.checkpoint import make_checkpoint, save_checkpoint
    from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
    from pipeline.models.vae import VAE, VAEConfig

    scenes = squares_splits(ENCODE_SPLITS, T=6, H=16, W=16)
    write_frames_h5(tmp_path / "frames.h5", scenes)
    write_flow_h5(tmp_path / "flow.h5", scenes)
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=16, latent_channels=4, downsample=4, patch=2))
    fvae = FlowVAE(FlowVAEConfig(hidden=8, latent_channels=2, downsample=2, patch=1, flow_scale=1.5))
    save_checkpoint(tmp_path / "vae.pt", make_checkpoint(kind="vae", model=vae, model_args=vae.config.to_dict(), step=7))
    save_checkpoint(tmp_path / "flow_vae.pt", make_checkpoint(kind="flow_vae", model=fvae,
                                                              model_args=fvae.config.to_dict(), step=3))
    return tmp_path, vae.eval(), fvae.eval()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
