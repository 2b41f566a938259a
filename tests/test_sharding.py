"""Sharded flow and encode: every rank's share of the videos merges into the single-process file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from bench.common import copy_project
from helpers import override, section, squares_splits, tiny_params_dict, write_frames_h5
from pipeline.checkpoint import make_checkpoint, save_checkpoint

from pipeline.flow.compute import compute_flow, flow_report, merge_flow_reports
from pipeline.models.flow_vae import FlowVAE, FlowVAEConfig
from pipeline.models.vae import VAE, VAEConfig
from pipeline.sharding import ROWS, Shard, ShardError, merge_shards, shard_path
from pipeline.latents import encode_latents


CPU = torch.device("cpu")


def h5_items(path: Path) -> dict:
    """Every dataset (as an array) and every attribute of an HDF5 file, by path."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_h5(a: Path, b: Path, *, atol: float = 0.0) -> None:
    x, y = h5_items(a), h5_items(b)
    assert sorted(x) == sorted(y)
    assert x.pop("/attrs") == y.pop("/attrs")
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        np.testing.assert_allclose(x[key], y[key], atol=atol, rtol=0, err_msg=key)


def test_shard_videos_partition_and_validation():
    parts = [Shard(r, 3).videos(8) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Shard().videos(4) == [0, 1, 2, 3] and Shard().whole
    assert Shard(2, 4).videos(2) == []  # more ranks than videos: an empty shard
    with pytest.raises(ValueError, match="rank"):
        Shard(3, 3)
    assert shard_path("data/flow.h5", 1) == Path("data/.flow.h5.shard-1")


@pytest.mark.parametrize("backend", ["gt", "dis"])
def test_flow_shards_merge_into_the_single_process_file(tmp_path, backend):
    frames = tmp_path / "frames.h5"
    # 3 ranks: uneven shards, one empty val shard
    write_frames_h5(frames, squares_splits({"train": 3, "val": 1, "test": 5}, T=5, H=48, W=56))
    flow = section("flow", backend=backend, batch=3)  # batches cross video boundaries
    whole = compute_flow(frames, tmp_path / "flow.h5", flow=flow, device=CPU)
    out = tmp_path / "sharded" / "flow.h5"
    out.parent.mkdir()
    reports = [compute_flow(frames, shard_path(out, r), flow=flow, device=CPU, shard=Shard(r, 3)) for r in range(3)]
    with h5py.File(shard_path(out, 1)) as f:
        assert f["test/fwd"].shape[0] == 2 and list(f[f"test/{ROWS}"][:]) == [1, 4]
        assert f["val/fwd"].shape[0] == 0
    merge_shards([shard_path(out, r) for r in range(3)], out)
    assert_same_h5(tmp_path / "flow.h5", out)
    merged = merge_flow_reports(reports)
    a, b = flow_report(whole, flow), flow_report(merged, flow)
    assert a["pairs"] == b["pairs"] and a["backend_used"] == b["backend_used"]
    for split, counts in a["splits"].items():
        assert counts == pytest.approx(b["splits"][split]), split
    qa, qb = a["quality"], b["quality"]
    assert qa["occlusion"] == qb["occlusion"] and qa["pairs_pixels"] == qb["pairs_pixels"]
    assert qa["epe"] == pytest.approx(qb["epe"], rel=1e-9) and qa["outlier_rate"] == qb["outlier_rate"]
    for key, value in whole["examples"].items():  # the figure shows the same pairs in the same order
        np.testing.assert_array_equal(value, merged["examples"][key], err_msg=key)


def test_encode_shards_merge_into_the_single_process_file(encode_inputs):
    tmp, _, _ = encode_inputs
    args = (tmp / "frames.h5", tmp / "flow.h5", tmp / "vae.pt", tmp / "flow_vae.pt")
    encode_latents(*args, tmp / "latents.h5", device="cpu")
    out = tmp / "sharded.h5"
    for r in range(2):
        report = encode_latents(*args, shard_path(out, r), device="cpu", shard=Shard(r, 2))
        assert report["splits"]["train"]["z"][0] == 3  # the split's shape, not the shard's
    merge_shards([shard_path(out, r) for r in range(2)], out)
    assert_same_h5(tmp / "latents.h5", out, atol=1e-6)  # another batch composition: float rounding only


def test_merge_rejects_missing_overlapping_and_mismatched_shards(tmp_path):
    frames = tmp_path / "frames.h5"
    write_frames_h5(frames, squares_splits({"train": 2, "test": 3}, T=5, H=48, W=56))
    out = tmp_path / "flow.h5"
    for r in range(2):
        compute_flow(frames, shard_path(out, r), flow=section("flow", backend="gt"), device=CPU, shard=Shard(r, 2))
    with pytest.raises(ShardError, match=r"\.flow\.h5\.shard-2: shard file not found"):
        merge_shards([shard_path(out, r) for r in range(3)], out)
    with pytest.raises(ShardError, match="split 'test' rows are not each of 0..3 exactly once"):
        merge_shards([shard_path(out, 0), shard_path(out, 0)], out)
    whole = tmp_path / "whole.h5"
    compute_flow(frames, whole, flow=section("flow", backend="gt"), device=CPU)
    with pytest.raises(ShardError, match=f"whole.h5: split 'test' has no '{ROWS}'"):
        merge_shards([shard_path(out, 0), whole], out)


@pytest.mark.slow
def test_flow_and_encode_stages_under_torchrun_match_one_process(tmp_path):
    """`PIPELINE_NPROC=2 python -m pipeline.launch flow|encode` (torchrun, gloo) == one process."""
    root = tmp_path / "project"
    copy_project(root)
    raw = override(tiny_params_dict(), {"device": "cpu", "flow": {"backend": "dis"}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "data").mkdir(exist_ok=True)
    write_frames_h5(root / "data" / "frames.h5", squares_splits({"train": 3, "val": 1, "test": 3}, T=5, H=48, W=56))
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=8, latent_channels=2, downsample=4, patch=2))
    fvae = FlowVAE(FlowVAEConfig(hidden=8, latent_channels=2, downsample=4, patch=2, flow_scale=2.0))
    (root / "models").mkdir(exist_ok=True)
    save_checkpoint(root / "models" / "vae.pt", make_checkpoint(kind="vae", model=vae,
                                                                model_args=vae.config.to_dict(), step=1))
    save_checkpoint(root / "models" / "flow_vae.pt", make_checkpoint(kind="flow_vae", model=fvae,
                                                                     model_args=fvae.config.to_dict(), step=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    results = {}
    for nproc in (1, 2):
        for stage, out in (("flow", "flow.h5"), ("encode", "latents.h5")):
            proc = subprocess.run([sys.executable, "-m", "pipeline.launch", stage], cwd=root, capture_output=True,
                                  text=True, env=dict(env, PIPELINE_NPROC=str(nproc)), timeout=600)
            assert proc.returncode == 0, f"{stage} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            assert proc.stderr.count(f"stages.{stage}: ") == 1 and f"{nproc} rank(s)" in proc.stderr, proc.stderr
            results[stage, nproc] = root / "data" / f"{out}.x{nproc}"
            (root / "data" / out).rename(results[stage, nproc])
            if stage == "flow":  # encode reads the flow this run wrote
                (root / "data" / out).symlink_to(results[stage, nproc].name)
        (root / "data" / "flow.h5").unlink()
    assert_same_h5(results["flow", 1], results["flow", 2])
    assert_same_h5(results["encode", 1], results["encode", 2], atol=1e-6)
    assert not list((root / "data").glob(".*shard*")) and not list((root / "data").glob(".*tmp*"))
