import pytest

from mtl_meniscus.config import Config, config_from_dict, load_config, preset_path
from mtl_meniscus.errors import ConfigError


def test_defaults_follow_the_reference_method():
    config = Config().validate()
    assert config.augment.rotation_deg == 45 and config.augment.translate_frac == 0.2
    assert config.preprocess.edge_filter == "sobel"
    assert config.data.split_fractions == (0.7, 0.2, 0.1) and config.data.image_size == 256
    assert config.tta.copies == 5 and config.tta.augment.rotation_deg < config.augment.rotation_deg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) augment.rotation"):
        config_from_dict({"augment": {"rotation": 10}})


@pytest.mark.parametrize(
    "data,key",
    [
        ({"preprocess": {"edge_filter": "canny"}}, "preprocess.edge_filter"),
        ({"augment": {"rotation_deg": "a lot"}}, "augment.rotation_deg"),
        ({"augment": {"blur_prob": 2.0}}, "augment.blur_prob"),
        ({"data": {"split_fractions": [0.5, 0.5, 0.5]}}, "data.split_fractions"),
        ({"data": {"image_size": True}}, "data.image_size"),
    ],
)
def test_bad_values_are_named(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_dict(data)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  rotation_deg: 10\ndata:\n  split_seed: 4\n")
    config = load_config(path, {"data.split_seed": 9, "augment.translate_frac": None})
    assert config.augment.rotation_deg == 10.0 and config.data.split_seed == 9
    assert config.augment.translate_frac == 0.2
    assert config_from_dict(config.to_dict()) == config  # round trip through plain data
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("augment: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_preset_is_its_base_plus_its_differences(tmp_path):
    """`base: FILE` merges the file's sections over its base key by key (lists and values replaced)."""
    (tmp_path / "base.yaml").write_text("train: {lr: 0.002, batch_size: 16}\nmodel: {widths: [8, 8, 8, 8]}\n")
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\ntrain: {lr: 0.0005}\nmodel: {widths: [4, 4, 4, 4]}\n"
    )
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ntrain: {batch_size: 8}\n")
    config = load_config(tmp_path / "grandchild.yaml")
    assert (config.train.lr, config.train.batch_size, config.model.widths) == (0.0005, 8, (4, 4, 4, 4))
    # the shipped presets: shared and separate differ from base.yaml only where they say so
    shared, separate = load_config(preset_path("shared")), load_config(preset_path("separate"))
    assert (shared.train.max_epochs, separate.train.max_epochs) == (15, 20)
    assert (shared.train.restart_if_at_chance_after, separate.train.restart_if_at_chance_after) == (6, 0)
    assert shared.train.lr == separate.train.lr == 0.001 and shared.augment == separate.augment
    assert (shared.model.name, separate.model.name) == ("shared", "separate")


def test_a_bad_base_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(ConfigError, match="'base' must name a YAML file"):
        load_config(tmp_path / "d.yaml")
