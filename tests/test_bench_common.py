"""bench/common.py's run readers and bench_mask_steps' refusals: what the diagnostics score is what infer reads."""
import dataclasses

import pytest
import torch

from bench.bench_mask_steps import mask_step_configs
from bench.common import val_videos
from helpers import write_clip_files
from pipeline.clips import clip_slice


def test_val_videos_are_the_first_window_split_into_context_and_horizon(tiny_params, tmp_path):
    frames_h5, flow_h5, videos = write_clip_files(tmp_path, splits=("val",), N=3, T=8)
    paths = dataclasses.replace(tiny_params.paths, frames=str(frames_h5), flow=str(flow_h5))
    p = dataclasses.replace(tiny_params, paths=paths, eval=dataclasses.replace(tiny_params.eval, context=3, horizon=4))
    got = val_videos(tmp_path, p, limit=2)
    assert len(got) == 2 and len(val_videos(tmp_path, p)) == 3
    for i, (video, observed, truth) in enumerate(got):
        frames = torch.from_numpy(videos["val"][i]).permute(0, 3, 1, 2).float() / 255  # [T,3,H,W]
        assert truth.shape == (1, 4, 3, 32, 32) and torch.allclose(truth[0], frames[3:7], atol=1e-6)
        expected = clip_slice(video, 0, 3, observed=True)
        assert observed.keys() == expected.keys() and "collision" not in observed  # what a predictor may read
        assert all(torch.equal(observed[k], expected[k]) for k in observed)
        assert torch.allclose(observed["frames"][0], frames[:3], atol=1e-6)


def test_mask_step_configs_refuse_what_one_trained_model_cannot_answer(tiny_params):
    cfg = dataclasses.replace(tiny_params.model, arch="warp_occ", warp_space="pixel", fill="extrap", mask_steps=0)
    out = mask_step_configs(cfg, rollout=4, values=[0, 4, 12])
    assert {k: c.mask_steps for k, c in out.items()} == {0: 0, 4: 4, 12: 12}
    assert all(dataclasses.replace(c, mask_steps=0) == cfg for c in out.values())  # only the cut differs
    with pytest.raises(ValueError, match=r"--values \[2\]: below train.rollout=4"):
        mask_step_configs(cfg, rollout=4, values=[0, 2, 8])
    with pytest.raises(ValueError, match="trained with model.mask_steps=2 < train.rollout=4"):
        mask_step_configs(dataclasses.replace(cfg, mask_steps=2), rollout=4, values=[8])
    with pytest.raises(ValueError, match=r"model.mask_steps=8.*fill none"):
        mask_step_configs(dataclasses.replace(cfg, fill="none"), rollout=4, values=[0, 8])


def test_machine_names_the_cpu_model_and_the_isa_torch_uses(tmp_path):
    from bench.common import cpu_model, machine
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon(R) CPU\nflags\t: fpu sse2 avx2 avx512f amx_tile\n"
                    "processor\t: 1\nmodel name\t: Some Xeon(R) CPU\nflags\t: fpu sse2 avx2 avx512f amx_tile\n")
    assert cpu_model(info) == {"name": "Some Xeon(R) CPU", "vector_flags": ["amx_tile", "avx2", "avx512f"]}
    info.write_text("processor\t: 0\n")
    assert cpu_model(info) == {"name": None, "vector_flags": None}
    assert cpu_model(tmp_path / "absent") == {"name": None, "vector_flags": None}
    m = machine()
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cpu_capability"]
    assert {"cpu_count", "processor", "cpu", "gpu", "torch", "python"} <= m.keys()


def test_save_names_the_file_and_the_benchmark_with_the_suffix(tmp_path, monkeypatch):
    import json

    import bench.common as common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert common.save("ttt_ceiling", {"x": 1}) == tmp_path / "ttt_ceiling.json"
    path = common.save("ttt_ceiling", {"x": 2}, suffix="all")
    assert path == tmp_path / "ttt_ceiling_all.json"
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "ttt_ceiling_all" and payload["x"] == 2 and "machine" in payload
