"""Hostile inputs: each fault gets an error that names the file and the problem, and leaves no output behind."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from helpers import ToyTemporal, override, tiny_params_dict, train_tiny_vae, write_clip_files
from pipeline.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from pipeline.config import params_from_dict
from pipeline.data.datasets import ClipDataset, FrameDataset
from pipeline.io import InputFileError, atomic_path, remove_stale_temporaries


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def stage_params(tmp_path, **sections):
    raw = tiny_params_dict()
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["device"] = "cpu"
    return params_from_dict(override(raw, sections))


# ---- stale state ------------------------------------------------------------------------------------------

def test_a_resume_checkpoint_of_other_data_is_discarded_loudly(tmp_path, caplog):
    """Interrupted, then re-run on other data of the same size: it starts over and equals a clean run."""
    with pytest.raises(KeyboardInterrupt):
        train_tiny_vae(tmp_path / "run", data_seed=0, stop_at=4)
    resumed = train_tiny_vae(tmp_path / "run", data_seed=1)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "discarding" in r.getMessage()]
    assert resumed.resumed_from is None and warned and "data changed" in warned[0].getMessage()
    clean = train_tiny_vae(tmp_path / "clean", data_seed=1)
    for a, b in zip(resumed.model.state_dict().values(), clean.model.state_dict().values()):
        assert torch.equal(a, b)


def test_infer_refuses_a_checkpoint_of_another_arch(tmp_path):
    from pipeline.inference import infer

    p = stage_params(tmp_path, model={"arch": "warp_occ"})
    write_clip_files(tmp_path)
    model = ToyTemporal(context=p.model.context)
    save_checkpoint(p.paths.temporal, make_checkpoint(kind="temporal", model=model, model_args={}, arch="latent"))
    with pytest.raises(ValueError, match=r"temporal\.pt: a 'latent' checkpoint, but params say model.arch=warp_occ"):
        infer(p, log=lambda s: None)
    assert not os.path.exists(p.paths.predictions)


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path):
    final = tmp_path / "frames.h5"
    dead = tmp_path / ".frames.h5.tmp-999999999"  # no such process
    dead.write_bytes(b"half written")
    mine = tmp_path / f".frames.h5.tmp-{os.getppid()}"  # a live process (our parent): never touched
    mine.write_bytes(b"in progress")
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done" and not dead.exists() and mine.exists()
    assert remove_stale_temporaries(final) == []


# ---- unreadable inputs name the file ----------------------------------------------------------------------

def test_a_truncated_ground_truth_npz_is_skipped_and_counted(tmp_path):
    from pipeline.data import layout
    from pipeline.data.extract import ExtractError, extract
    from pipeline.data.synthetic import render_dataset

    p = stage_params(tmp_path, data={"max_bad_fraction": 0.5})
    render_dataset(tmp_path / "raw", data=p.data, synthetic=p.synthetic)
    clevrer_split, ids = layout.split_ids(p.data.splits)["train"]
    broken = layout.gt_path(tmp_path / "raw", clevrer_split, ids[1])
    truncate(broken)
    report = extract(tmp_path / "raw", tmp_path / "frames.h5", data=p.data)
    assert report["bad_videos"] == 1 and str(broken) in report["bad"][0]["error"]
    assert "unreadable ground truth" in report["bad"][0]["error"]
    with h5py.File(tmp_path / "frames.h5") as f:
        assert ids[1] not in f["train"]["video_index"][:]
    # over data.max_bad_fraction the stage fails, naming the file, and writes nothing
    strict = stage_params(tmp_path, data={"max_bad_fraction": 0.0})
    with pytest.raises(ExtractError, match=str(broken)):
        extract(tmp_path / "raw", tmp_path / "strict.h5", data=strict.data)
    assert not (tmp_path / "strict.h5").exists()


@pytest.mark.parametrize("reader", ["frames", "clips"])
def test_a_truncated_hdf5_names_the_file_in_the_dataset_readers(tmp_path, reader):
    frames_h5, flow_h5, _ = write_clip_files(tmp_path, splits=("train",))
    truncate(frames_h5 if reader == "frames" else flow_h5)
    bad = frames_h5 if reader == "frames" else flow_h5
    with pytest.raises(InputFileError, match=rf"{bad.name}: not a readable HDF5 file"):
        FrameDataset(frames_h5, "train") if reader == "frames" else ClipDataset(frames_h5, "train", 4,
                                                                                 flow_h5=flow_h5)


def tiny_vae_checkpoints(tmp_path):
    from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
    from pipeline.models.vae import VAE, VAEConfig

    vae = VAE(VAEConfig(hidden=8, latent_channels=2, downsample=4, min_channels=8))
    flow_vae = FlowVAE(FlowVAEConfig(hidden=8, latent_channels=2, downsample=4, min_channels=8))
    save_checkpoint(tmp_path / "vae.pt", make_checkpoint(kind="vae", model=vae, model_args=vae.config.to_dict()))
    save_checkpoint(tmp_path / "flow_vae.pt", make_checkpoint(kind="flow_vae", model=flow_vae,
                                                              model_args=flow_vae.config.to_dict()))


def test_encode_names_a_truncated_input_and_writes_nothing(tmp_path):
    from pipeline.latents import encode_latents

    frames_h5, flow_h5, _ = write_clip_files(tmp_path, splits=("train",))
    tiny_vae_checkpoints(tmp_path)
    truncate(flow_h5)
    with pytest.raises(InputFileError, match=r"flow\.h5: not a readable HDF5 file"):
        encode_latents(frames_h5, flow_h5, tmp_path / "vae.pt", tmp_path / "flow_vae.pt", tmp_path / "latents.h5",
                       device="cpu")
    assert not (tmp_path / "latents.h5").exists()


def test_infer_and_evaluate_name_a_truncated_input(tmp_path):
    from pipeline.evaluation import evaluate
    from pipeline.inference import infer
    from pipeline.models.vae import VAE, VAEConfig

    from pipeline.models.temporal import build_temporal

    p = stage_params(tmp_path, model={"arch": "warp_occ"})
    (tmp_path / "data").mkdir()
    write_clip_files(tmp_path / "data")
    model = build_temporal("warp_occ", model=p.model, loss=p.loss, frame_size=(32, 32), num_boxes=2)
    save_checkpoint(p.paths.temporal, make_checkpoint(kind="temporal", model=model, model_args=model.model_args(),
                                                      arch="warp_occ"))
    vae = VAE(VAEConfig(hidden=8, latent_channels=2, downsample=4, min_channels=8))
    save_checkpoint(p.paths.vae, make_checkpoint(kind="vae", model=vae, model_args=vae.config.to_dict()))
    truncate(tmp_path / "data" / "flow.h5")
    with pytest.raises(InputFileError, match=r"flow\.h5: not a readable HDF5 file"):
        infer(p, log=lambda s: None)
    assert not os.path.exists(p.paths.predictions)
    pred = tmp_path / "predictions.h5"
    with h5py.File(pred, "w") as f:
        f["video_index"] = np.arange(3)
    truncate(pred)
    with pytest.raises(InputFileError, match=r"predictions\.h5: not a readable HDF5 file"):
        evaluate(params_from_dict(override(tiny_params_dict(), {"paths": {"predictions": str(pred),
                                                                          "frames": str(tmp_path / "data" / "frames.h5"),
                                                                          "reports": str(tmp_path / "reports")}})),
                 log=lambda s: None)
    assert not (tmp_path / "reports" / "metrics.json").exists()


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b"", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_a_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "temporal.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"temporal\.pt: not a readable checkpoint"):
        load_checkpoint(path, kind="temporal")
