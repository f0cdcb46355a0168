"""The config package's data: the preset YAML files (shipped with the package) and the model
section's grouping.  That every preset loads and validates is test_config.test_each_preset_loads_and_validates."""

import dataclasses
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from d2v2_scale.config import MODEL_SECTIONS, PRESETS, ConfigError, ModelConfig, load_preset, presets

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_file_is_listed_and_every_fragment_is_used():
    files = {p.stem for p in presets.PRESET_DIR.glob("*.yaml")}
    named = set(presets.NAMES)
    assert named <= files, f"presets without a file: {named - files}"
    fragments = files - named
    assert all(f.startswith("_") for f in fragments), f"files that are neither presets nor _fragments: {fragments}"
    bases = {presets._read(n).get("base") for n in files}
    assert fragments <= bases, f"fragments no file builds on: {fragments - bases}"
    assert list(PRESETS) == list(presets.NAMES)


def test_base_chain_merges_section_by_section():
    # image-tiny sets some optim keys; the rest (betas, eps, clip) come from image-base and _image
    tiny, base = load_preset("image-tiny"), load_preset("image-base")
    assert (tiny.optim.betas, tiny.optim.eps, tiny.optim.clip_grad) == (base.optim.betas, 1e-8, 4.0)
    assert tiny.optim.lr == 1e-3 and tiny.optim.reference_global_batch is None
    assert tiny.model.cls_loss_weight == 0.01 and tiny.model.depth == 2
    # a fragment is not a preset
    with pytest.raises(ConfigError, match="unknown preset '_image'"):
        load_preset("_image")


def test_bad_preset_files_are_refused_with_the_file_named(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("base: b\nmodel: {depth: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match=r"preset 'a': its base chain comes back to itself \(a -> b -> a\)"):
        presets.resolve("a")
    (tmp_path / "c.yaml").write_text("base: nothere\n")
    with pytest.raises(ConfigError, match=r"nothere.yaml does not exist"):
        presets.resolve("c")
    (tmp_path / "d.yaml").write_text("model: 3\n")
    with pytest.raises(ConfigError, match=r"d.yaml must hold a mapping of sections"):
        presets.resolve("d")


def test_preset_files_are_package_data():
    """pyproject's package-data ships every preset file (an installed wheel has no source tree)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["d2v2_scale.config"]
    pkg = ROOT / "d2v2_scale" / "config"
    for p in presets.PRESET_DIR.glob("*.yaml"):
        rel = p.relative_to(pkg).as_posix()
        assert any(fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"


def test_model_sections_partition_the_flat_fields():
    """Every model.<field> belongs to exactly one section, and the flat order is the sections' order
    (the order of config.yaml and --print-config)."""
    flat = [f.name for f in dataclasses.fields(ModelConfig)]
    grouped = [name for names in ModelConfig.sections().values() for name in names]
    assert grouped == flat and len(set(flat)) == len(flat)
    assert len(ModelConfig.sections()) == len(MODEL_SECTIONS)
    assert ModelConfig.sections()["AqcSection"][0] == "aqc_latent_groups"


@pytest.mark.parametrize("name", presets.NAMES)
def test_printed_config_reads_back_and_heads_each_model_group(name):
    """--print-config / config.yaml: every field, read back to the same values; short lists on one
    line; a comment heading before each model section group."""
    import yaml

    from d2v2_scale.config.model import SECTION_TITLES

    cfg = load_preset(name)
    text = cfg.to_yaml()
    assert yaml.safe_load(text) == cfg.to_dict()
    lines = text.splitlines()
    for title in SECTION_TITLES.values():
        assert f"  # ---- {title}" in lines
    assert any(line.startswith("  conv_feature_layers: [[") for line in lines)
    assert "  betas: [" + ", ".join(str(b) for b in cfg.optim.betas) + "]" in lines
