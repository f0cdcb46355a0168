"""Typed config: presets, overrides, YAML round trip, up-front validation messages."""

import pytest

from d2v2_scale.config import (ConfigError, RunConfig, build_config, load_preset, load_yaml,
                               preset_names)

SPEC_PRESETS = ["image-base", "image-large", "image-huge", "audio-base", "audio-large", "text-base", "text-large"]


@pytest.mark.parametrize("name", preset_names())
def test_each_preset_loads_and_validates(name):
    cfg = load_preset(name)
    if name == "aqc-base":  # background noise needs the user's noise folder (MUSAN): its one error as shipped
        with pytest.raises(ConfigError, match="data.noise_dir"):
            cfg.validate(world_size=8)
        cfg.data.aug_background_p = 0.0
    cfg.validate(world_size=8)
    assert cfg.preset == name


def test_spec_table_numbers():
    # a few rows of the table in docs/REFERENCE.md §1.9 that are easy to get wrong
    b, l, h = (load_preset(n) for n in ("image-base", "image-large", "image-huge"))
    assert (b.model.depth, b.model.prenet_depth, b.model.clone_batch, b.model.top_k_layers) == (10, 2, 16, 10)
    assert (b.masking.ratio, b.masking.adjust, b.masking.length) == (0.8, 0.07, 3)
    assert (l.model.embed_dim, l.model.top_k_layers, l.ema.anneal_end_step) == (1024, 18, 150_000)
    assert (h.model.patch_size, h.model.embed_dim, h.ema.end_decay, h.optim.total_steps) == (14, 1280, 1.0, 500_000)
    a = load_preset("audio-large")
    assert (a.model.depth, a.model.prenet_depth, a.model.clone_batch, a.masking.ratio) == (16, 8, 12, 0.55)
    t = load_preset("text-large")
    assert t.model.layer_norm_target_layer and t.model.instance_norm_targets and not t.model.instance_norm_target_layer
    assert load_preset("text-base").model.loss_scale == 1.0 and b.model.loss_scale is None
    assert b.optim.betas == (0.9, 0.95) and load_preset("audio-base").optim.betas == (0.9, 0.98)
    # docs/REFERENCE.md §1.10 D8: image Adam eps 1e-8 (fairseq default), audio/text yamls 1e-6
    assert {n: load_preset(n).optim.eps for n in SPEC_PRESETS} == {
        n: 1e-8 if n.startswith("image") else 1e-6 for n in SPEC_PRESETS}


@pytest.mark.parametrize("style", ["flag", "flag_eq", "dotted"])
def test_overrides(style):
    args = {"flag": ["--model.depth", "4", "--optim.lr", "3e-4", "--parallel.zero_stage", "1"],
            "flag_eq": ["--model.depth=4", "--optim.lr=3e-4", "--parallel.zero_stage=1"],
            "dotted": ["model.depth=4", "optim.lr=3e-4", "parallel.zero_stage=1"]}[style]
    cfg = build_config("image-tiny", overrides=args)
    assert cfg.model.depth == 4 and cfg.optim.lr == 3e-4 and cfg.parallel.zero_stage == 1
    assert isinstance(cfg.optim.lr, float)


def test_override_types_are_checked():
    with pytest.raises(ConfigError, match=r"model.depth='four' is not a valid int"):
        build_config("image-tiny", overrides=["model.depth=four"])
    cfg = build_config("image-tiny", overrides=["optim.betas=[0.9,0.98]", "model.alibi=true", "max_steps=7"])
    assert cfg.optim.betas == (0.9, 0.98) and cfg.model.alibi is True and cfg.max_steps == 7


def test_unknown_keys_say_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dept'.*did you mean 'depth'"):
        build_config("image-tiny", overrides=["model.dept=4"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim'"):
        build_config("image-tiny", overrides=["optimm.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown preset 'image-bse'.*did you mean 'image-base'"):
        load_preset("image-bse")
    p = tmp_path / "c.yaml"
    p.write_text("preset: text-tiny\nmodel:\n  embed_dimm: 32\n")
    with pytest.raises(ConfigError, match=r"did you mean 'embed_dim'"):
        load_yaml(p)


def test_yaml_round_trip(tmp_path):
    cfg = build_config("audio-base", overrides=["model.depth=6", "parallel.tp=2", "data.manifest=/x/m.json"])
    p = tmp_path / "run" / "config.yaml"
    cfg.save(p)
    back = load_yaml(p)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert not list(p.parent.glob("*.tmp"))


@pytest.mark.parametrize("overrides,world,message", [
    (["model.num_heads=12", "model.embed_dim=768", "parallel.tp=8"], 8,
     r"model.num_heads=12 is not divisible by parallel.tp=8"),
    (["parallel.pp=4"], 8, r"12 blocks are not divisible by parallel.pp=4|blocks are not divisible by parallel.pp=4"),
    (["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"], 6, r"world size 6 is not divisible by tp x pp = 2 x 2"),
    (["parallel.pp=2", "parallel.zero_stage=3"], 4, r"zero_stage=3 with parallel.pp=2.*ZeRO stage 1 only.*Use"),
    (["parallel.pp=2", "parallel.zero_stage=0"], 4, r"zero_stage=0 with parallel.pp=2.*Use parallel.zero_stage=1"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 4, r"zero_stage=2 with parallel.pp=2"),
    (["model.top_k_layers=11"], 1, r"top_k_layers=11 must be between 1 and model.depth=10"),
    (["guards.max_target_position_share=1.5"], 1, r"guards.max_target_position_share=1.5 must be in \(0, 1\)"),
    (["data.max_bad_rows=-1"], 1, r"data.max_bad_rows=-1 must be >= 0"),
    (["model.decoder_input_dropout=1.0"], 1, r"model.decoder_input_dropout=1.0 must be in \[0, 1\)"),
    (["model.decoder_projection_layers=3"], 1, r"model.decoder_projection_layers=3: use 1 .* or 2"),
    (["data.audio_crop=pad"], 1, r"data.audio_crop='pad': use 'batch_min'"),
])
def test_invalid_layouts(overrides, world, message):
    base = ["model.depth=10", "model.prenet_depth=0"] if "parallel.pp=4" in overrides else []
    cfg = build_config("image-base", overrides=base + overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=world)


def test_all_errors_reported_together():
    cfg = build_config("image-base", overrides=["parallel.tp=5", "model.top_k_layers=0"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=5)
    assert "parallel.tp=5" in str(e.value) and "top_k_layers=0" in str(e.value)


def test_default_runconfig_is_valid():
    RunConfig().validate()
