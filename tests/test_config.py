"""Params validation: unknown keys and bad values fail with the valid choices."""
import pytest

from conftest import REPO, merge, tiny_params_dict
from pipeline.config import ConfigError, load_params, params_from_dict, to_dict


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.model.arch == "warp_occ"
    assert params.data.resolution == (64, 64)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown param model\.arhc; valid keys: arch"):
        params_from_dict(merge(tiny_params_dict(), {"model": {"arhc": "latent"}}))


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown param modle"):
        params_from_dict(merge(tiny_params_dict(), {"modle": {}}))


def test_bad_arch_lists_the_five():
    with pytest.raises(ConfigError) as err:
        params_from_dict(merge(tiny_params_dict(), {"model": {"arch": "gru"}}))
    for arch in ("clip_lstm", "latent", "latent_flow", "warp_occ", "dual_vae"):
        assert arch in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"data": {"resolution": [30, 32]}}, "divisible by 8"),
    ({"data": {"frames": "many"}}, "expected an integer"),
    ({"eval": {"horizon": 40}}, r"eval.context \+ eval.horizon"),
    ({"vae": {"downsample": 3}}, "valid: 1, 2, 4, 8"),
    ({"data": {"resolution": [8, 8]}, "eval": {"context": 2, "horizon": 1},
      "model": {"context": 2}, "vae": {"downsample": 8}, "flow_vae": {"downsample": 8}}, None),
    ({"data": {"source": "kinetics"}}, "valid values: synthetic, clevrer"),
    ({"data": {"source": "clevrer"}, "flow": {"backend": "gt"}}, "needs data.source=synthetic"),
    ({"ttt": {"enabled": "yes"}}, "expected true or false"),
    ({"eval": {"protocol": "slotformer"}}, r"requires data.resolution=\(64, 64\).*data.stride=2 \(got 1\)"),
])
def test_bad_values(override, message):
    raw = merge(tiny_params_dict(), override)
    if message is None:
        params_from_dict(raw)
        return
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_round_trip_through_dict(tiny_params):
    assert params_from_dict(to_dict(tiny_params)) == tiny_params
