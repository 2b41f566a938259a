"""Stage encode: latents.h5 holds each VAE's mu for every frame / backward flow field."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from pipeline.models.flow_vae import FlowVAEConfig
from pipeline.models.vae import VAE, VAEConfig
from pipeline import latents
from pipeline.io import InputFileError
from pipeline.latents import encode_latents

from helpers import ENCODE_SPLITS as SPLITS, squares_splits, write_flow_h5, write_frames_h5


def test_encode_writes_mu_of_both_vaes(encode_inputs, monkeypatch):
    tmp, vae, fvae = encode_inputs
    monkeypatch.setattr(latents, "PIXELS_PER_BATCH", 16 * 16 * 6 * 2)  # two videos a batch: exercises chunking
    report = encode_latents(tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt", tmp / "lat.h5",
                            device="cpu")
    assert report["splits"]["train"] == {"videos": 3, "z": [3, 6, 4, 4, 4], "zf": [3, 5, 2, 8, 8]}
    with h5py.File(tmp / "lat.h5") as f, h5py.File(tmp / "frames.h5") as fr, h5py.File(tmp / "flow.h5") as fl:
        assert sorted(f.keys()) == ["test", "train", "val"]
        assert VAEConfig(**json.loads(f.attrs["vae_model_args"])) == vae.config
        assert FlowVAEConfig(**json.loads(f.attrs["flow_vae_model_args"])) == fvae.config
        assert f.attrs["vae_step"] == 7 and f.attrs["flow_vae_step"] == 3
        for split, n in SPLITS.items():
            z, zf = f[split]["z"], f[split]["zf"]
            assert z.dtype == zf.dtype == np.float32
            assert z.shape == (n, 6, 4, 4, 4) and zf.shape == (n, 5, 2, 8, 8)
        video = torch.from_numpy(fr["test/video"][1]).permute(0, 3, 1, 2).float() / 255  # [T,3,H,W]
        bwd = torch.from_numpy(fl["test/bwd"][1].astype(np.float32))  # [T-1,2,H,W]
        with torch.no_grad():
            assert np.allclose(f["test/z"][1], vae.encode(video)[0].numpy(), atol=1e-5)
            assert np.allclose(f["test/zf"][1], fvae.encode(bwd)[0].numpy(), atol=1e-5)
    assert not list(tmp.glob(".lat.h5.tmp*"))


def test_encode_mismatched_flow_fails_naming_the_file(encode_inputs):
    tmp, _, _ = encode_inputs
    write_flow_h5(tmp / "flow.h5", squares_splits(SPLITS, T=5, H=16, W=16))  # one frame short
    with pytest.raises(ValueError, match=r"flow\.h5: /train/bwd has shape \(3, 4, 2, 16, 16\), expected \(3, 5, 2, 16, 16\)"):
        encode_latents(tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt", tmp / "lat.h5",
                       device="cpu")
    assert not (tmp / "lat.h5").exists() and not list(tmp.glob(".lat.h5.tmp*"))


def test_encode_missing_split_and_bad_checkpoint(encode_inputs):
    tmp, _, _ = encode_inputs
    write_flow_h5(tmp / "flow.h5", squares_splits({"train": 3, "test": 2}, T=6, H=16, W=16))
    with pytest.raises(KeyError, match=r"flow\.h5: splits \['val'\]"):
        encode_latents(tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt", tmp / "lat.h5",
                       device="cpu")
    with pytest.raises(CheckpointError, match=r"vae\.pt: checkpoint kind is 'vae', expected 'flow_vae'"):
        encode_latents(tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "vae.pt", tmp / "lat.h5", device="cpu")
    with pytest.raises(InputFileError, match=r"nope\.h5: frames file not found"):
        encode_latents(tmp / "nope.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt", tmp / "lat.h5",
                       device="cpu")
    assert not (tmp / "lat.h5").exists()


def test_encode_resolution_not_divisible(encode_inputs):
    tmp, _, _ = encode_inputs
    vae = VAE(VAEConfig(hidden=16, latent_channels=4, downsample=8, patch=2))
    save_checkpoint(tmp / "vae.pt", make_checkpoint(kind="vae", model=vae, model_args=vae.config.to_dict()))
    scenes = squares_splits(SPLITS, T=6, H=20, W=20)
    write_frames_h5(tmp / "frames.h5", scenes)
    write_flow_h5(tmp / "flow.h5", scenes)
    with pytest.raises(ValueError, match=r"frames\.h5: input size 20x20 is not divisible by the VAE downsample factor 8"):
        encode_latents(tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt", tmp / "lat.h5",
                       device="cpu")
