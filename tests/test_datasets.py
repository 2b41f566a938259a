"""The HDF5-backed datasets: the same items read in this process, in forked DataLoader workers, and after pickling."""
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import write_clip_files
from pipeline.data.datasets import ClipDataset, FlowFieldDataset, FrameDataset


def items_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("kind", ["frames", "flow", "clips"])
def test_items_are_the_same_in_workers_and_after_pickling(tmp_path, kind):
    frames_h5, flow_h5, videos = write_clip_files(tmp_path, splits=("train",), N=3, T=6)
    data = {"frames": lambda: FrameDataset(frames_h5, "train"), "flow": lambda: FlowFieldDataset(flow_h5, "train"),
            "clips": lambda: ClipDataset(frames_h5, "train", 4, flow_h5=flow_h5)}[kind]()
    here = [data[i] for i in range(len(data))]  # opens the files and caches the dataset lookups in this process
    if kind == "frames":
        np.testing.assert_array_equal(here[7].permute(1, 2, 0).mul(255).round().byte().numpy(), videos["train"][1, 1])
    if kind == "clips":
        assert here[0]["frames"].shape == (4, 3, 32, 32) and here[0]["flow_bwd"].shape == (3, 2, 32, 32)
    copy = pickle.loads(pickle.dumps(data))  # spawn-started workers get the dataset this way: no handles travel
    assert all(items_equal(copy[i], here[i]) for i in range(len(data)))
    if "fork" in multiprocessing.get_all_start_methods():  # forked workers inherit the handles and must reopen
        loader = DataLoader(data, batch_size=None, num_workers=2, multiprocessing_context="fork")
        assert all(items_equal(got, want) for got, want in zip(loader, here, strict=True))
