"""bench/speed_probe.py: a real training step of the default model at the params' sizes, timed; bad counts refused."""
import pytest
import torch

from bench.speed_probe import probe_batch, probe_step_seconds


def test_probe_times_training_steps_at_the_params_sizes(tiny_params):
    p = tiny_params
    result = probe_step_seconds(p, steps=2, repeats=2)
    assert 0 < result["step_s_min"] <= result["step_s"]
    assert result["clip_frames"] == p.model.context + p.train.rollout and result["size"] == list(p.data.resolution)
    assert result["batch"] == p.train.batch and result["threads"] == torch.get_num_threads()


def test_probe_batch_is_fixed_by_its_seed():
    a = probe_batch(batch=2, frames=5, size=(16, 24), boxes=3, seed=1)
    b = probe_batch(batch=2, frames=5, size=(16, 24), boxes=3, seed=1)
    assert a["frames"].shape == (2, 5, 3, 16, 24) and a["flow_bwd"].shape == (2, 4, 2, 16, 24)
    assert a["boxes"].shape == (2, 5, 3, 4) and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_refuses_zero_steps(tiny_params):
    with pytest.raises(ValueError, match="steps and repeats must be >= 1"):
        probe_step_seconds(tiny_params, steps=0)
