"""Params validation: unknown keys and bad values fail with the valid choices."""
import pytest

from helpers import REPO, override, tiny_params_dict
from pipeline.config import ConfigError, load_params, params_from_dict, to_dict


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.model.arch == "warp_occ"
    assert params.data.resolution == (64, 64)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown param model\.arhc; valid keys: arch"):
        params_from_dict(override(tiny_params_dict(), {"model": {"arhc": "latent"}}))


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown param modle"):
        params_from_dict(override(tiny_params_dict(), {"modle": {}}))


def test_bad_arch_lists_the_five():
    with pytest.raises(ConfigError) as err:
        params_from_dict(override(tiny_params_dict(), {"model": {"arch": "gru"}}))
    for arch in ("clip_lstm", "latent", "latent_flow", "warp_occ", "dual_vae"):
        assert arch in str(err.value)


@pytest.mark.parametrize("change, message", [
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
    ({"vae": {"lr": float("inf")}}, r"vae.lr=inf.*finite"),
    ({"flow_vae": {"downsample": 3}}, r"flow_vae.downsample=3"),
    ({"vae": {"steps": 0}}, r"vae.steps=0"),
    ({"eval": {"split": "val"}, "data": {"videos": {"val": 0}}}, r"eval.split='val'.*data.videos.val is 0"),
    ({"control": {"pairs": 1}}, r"control.pairs=1.*partner"),
    ({"control": {"constant_flow": [1.0]}}, r"control.constant_flow.*expected 2 values"),
    ({"model": {"mask_steps": -1}}, r"model.mask_steps=-1.*must be >= 0"),
    ({"model": {"mask_steps": 12, "fill": "none"}}, r"model.mask_steps=12.*fill none"),
    ({"model": {"mask_steps": 12, "arch": "dual_vae"}}, r"model.mask_steps=12.*arch dual_vae"),
    ({"model": {"mask_steps": 12}}, None),
])
def test_bad_values(change, message):
    raw = override(tiny_params_dict(), change)
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


@pytest.mark.parametrize("key", ["vae.lr", "eval.split", "train.warmup", "data.videos.val", "device"])
def test_a_missing_key_is_an_error_naming_it(key):
    """params.yaml is the one source of every default: the code has no fallback for a key it lacks."""
    raw = tiny_params_dict()
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    with pytest.raises(ConfigError, match=f"missing param {key}"):
        params_from_dict(raw)


def test_the_code_holds_no_second_copy_of_a_default():
    import dataclasses

    from pipeline import config

    for cls in (config.Paths, config.Videos, config.Clevrer, config.Data, config.Synthetic, config.Flow, config.VAE,
                config.FlowVAE, config.Model, config.Loss, config.Train, config.TTT, config.Eval, config.Params):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, f"{cls.__name__} has code defaults for {with_default}"
