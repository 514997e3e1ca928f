import re

import pytest
import yaml
from support import TINY, _clean, app, runner

from mtl_meniscus.commands.compare.settings import load_compare_config
from mtl_meniscus.config import (
    Config,
    config_from_dict,
    load_config,
    load_yaml,
    parse_set_option,
    preset_path,
    read_config_file,
    saved_run_config,
)
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


# --- where a bad value came from (a file, its base, an overlay, or an override) ---


def test_a_bad_override_names_its_option_not_the_file(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: {lr: 0.001, max_epochs: 3}\n")
    cases = [  # (key, value, what gave it, the message after "WHAT: ")
        ("train.lr", "fast", "--set train.lr=fast", "config key 'train.lr': bad value 'fast' (Input should"),
        ("train.lrr", 0.1, "--set train.lrr=0.1", "unknown config key(s) train.lrr (allowed in train: "),
        ("train.max_epochs", 0, "--max-epochs 0", "config key 'train.max_epochs': bad value 0 (allowed: an"),
    ]
    for key, value, option, message in cases:
        with pytest.raises(ConfigError) as named:
            load_config(preset, {key: value}, origins={key: option})
        assert str(named.value).startswith(f"{option}: {message}")
        # without a name for the override, the message names nothing: never the file it was set over
        with pytest.raises(ConfigError) as unnamed:
            load_config(preset, {key: value})
        assert str(unnamed.value).startswith(message)


def test_a_bad_value_in_a_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lr: fast}\naugment: {blur_prob: 2.0}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {max_epochs: 0}\n")
    (tmp_path / "fixed.yaml").write_text("base: base.yaml\ntrain: {lr: 0.01}\n")
    (tmp_path / "overlay.yaml").write_text("train: {batch_size: many}\n")
    base, child = (tmp_path / "base.yaml").resolve(), tmp_path / "child.yaml"
    with pytest.raises(ConfigError, match=f"^{base}: config key 'train.lr': bad value 'fast'"):
        load_config(child)  # the value is in the base file, not in the file named base
    with pytest.raises(ConfigError, match=f"^{child}: config key 'train.max_epochs': bad value 0 \\(allowed"):
        load_config(child, {"train.lr": 0.01, "augment.blur_prob": 0.5})  # a range check names it too
    with pytest.raises(ConfigError, match=f"^{base}: config key 'augment.blur_prob': bad value 2.0"):
        load_config(tmp_path / "fixed.yaml")
    overlay = tmp_path / "overlay.yaml"
    with pytest.raises(ConfigError, match=f"^{overlay}: config key 'train.batch_size': bad value 'many'"):
        load_config(tmp_path / "fixed.yaml", {"augment.blur_prob": 0.5}, overlay)


def test_an_override_of_a_section_owns_the_values_it_gives(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("tta: {copies: 2, augment: {rotation_deg: 5}}\n")
    with pytest.raises(
        ConfigError, match="^compare.yaml tta: config key 'tta.augment.noise_prob': bad value 3"
    ):
        load_config(preset, {"tta": {"augment": {"noise_prob": 3}}}, origins={"tta": "compare.yaml tta"})
    # merged into the preset's section: a bad value the override did not give is the preset's
    preset.write_text("tta: {copies: 2, augment: {rotation_deg: 500}}\n")
    with pytest.raises(ConfigError, match=f"^{preset}: config key 'tta.augment.rotation_deg': bad value 500"):
        load_config(preset, {"tta": {"augment": {"noise_prob": 0.5}}}, origins={"tta": "compare.yaml tta"})


def test_a_value_no_file_or_option_gave_names_neither(tmp_path):
    """A default that does not fit a value of the file (model.in_chans 2 with edge_filter none):
    the message names the key and the file's setting, not the file as the holder of the bad value."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("preprocess: {edge_filter: none}\n")
    with pytest.raises(ConfigError, match=r"^config key 'model.in_chans': bad value 2 \(allowed: 1 with"):
        load_config(preset)
    # a section with values from the file and from an unnamed override: the file alone is not blamed
    preset.write_text("train: {task_weights: {fissure: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"^config key 'train.task_weights': bad value"):
        load_config(preset, {"train.task_weights.bogus": 2.0})
    preset.write_text("train: {task_weights: {fissure: 1.0, bogus: 2.0}}\n")
    with pytest.raises(ConfigError, match=f"^{preset}: config key 'train.task_weights': bad value"):
        load_config(preset)


def test_the_cli_does_not_blame_a_preset_for_a_set_value_or_an_option(tmp_path):
    for args in (
        ["train", "--mode", "shared", "--set", "train.lr=fast", "--show-config"],
        ["train", "--mode", "shared", "--set", "train.lrr=1", "--show-config"],
        ["compare", "--roi", "sideways", "--out", str(tmp_path / "out")],  # compare's options: overrides
    ):
        result = runner.invoke(app, args)
        _clean(result)
        assert result.exit_code == 1 and "config key" in result.output, args
        assert "shared.yaml" not in result.output and "compare.yaml" not in result.output, result.output
        if "--set" in args:  # train names the option that gave the value
            assert f"--set {args[args.index('--set') + 1]}: " in result.output, result.output


# --- a key given twice in a YAML file ---


@pytest.mark.parametrize(
    "text,line,key,first",
    [
        # the tester's case: the second train section silently dropped the first one's lr
        ("train:\n  lr: 0.0123\ntrain:\n  max_epochs: 7\n", 3, "train", 1),
        ("train:\n  lr: 0.0123\n  max_epochs: 7\n  lr: 0.1\n", 4, "train.lr", 2),
        ("train: {lr: 0.1, lr: 0.2}\n", 1, "train.lr", 1),
        ("data:\n  extra_tasks:\n    a: {}\n    'a': {}\n", 4, "data.extra_tasks.a", 3),  # one key once read
        ("rois:\n  - {x: 1, x: 2}\n", 2, "rois.0.x", 2),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, line, key, first):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    expected = f"{path}, line {line}: key '{key}' is given twice (first on line {first}); YAML would"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}"):
        read_config_file(path)


def test_every_config_reader_refuses_a_key_given_twice(tmp_path):
    twice = f"base: {TINY}\ntrain:\n  lr: 0.0123\ntrain:\n  max_epochs: 7\n"
    path = tmp_path / "twice.yaml"
    path.write_text(twice)
    for read in (load_config, saved_run_config, load_compare_config):  # presets, run config.yaml, compare
        with pytest.raises(ConfigError, match="line 4: key 'train' is given twice"):
            read(path)
    child = tmp_path / "child.yaml"  # in a base file: that file is named
    child.write_text("base: twice.yaml\n")
    with pytest.raises(ConfigError, match=f"^{path.resolve()}, line 4"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"^--set train=\{lr: 1, lr: 2\}: .*'lr' is given twice"):
        parse_set_option("train={lr: 1, lr: 2}")
    result = runner.invoke(app, ["train", "--config", str(path), "--show-config"])
    _clean(result)
    assert result.exit_code == 1 and "line 4: key 'train' is given twice" in result.output


def test_a_merge_key_may_be_overridden_without_being_a_duplicate():
    assert load_yaml("a: {<<: {x: 1, y: 2}, x: 3}\n") == {"a": {"x": 3, "y": 2}}
    with pytest.raises(yaml.YAMLError, match="'a.y' is given twice"):
        load_yaml("a: {<<: {x: 1}, y: 2, y: 3}\n")


# --- a section given to --set merges into the preset's, as a file's section does ---


def test_a_section_given_to_set_keeps_the_preset_values_it_does_not_give():
    """The tester's case: `--set train={lr: 0.1}` reset tiny.yaml's max_epochs 3, steps_per_epoch 3
    and batch_size 8 to the code defaults 30, 80, 32; a tta.augment reset rotation_deg to 45."""
    train = load_config(TINY, dict([parse_set_option("train={lr: 0.1}")])).train
    assert (train.lr, train.max_epochs, train.steps_per_epoch, train.batch_size) == (0.1, 3, 3, 8)
    tta = load_config(
        preset_path("shared"), dict([parse_set_option("tta.augment={translate_frac: 0.01}")])
    ).tta
    assert (tta.augment.rotation_deg, tta.augment.translate_frac) == (8, 0.01)
    # with a named option on a key of the same section both apply (this was refused as an overlap)
    train = load_config(TINY, {"train": {"lr": 0.1, "batch_size": 4}, "train.max_epochs": 5}).train
    assert (train.lr, train.batch_size, train.max_epochs, train.steps_per_epoch) == (0.1, 4, 5, 3)
    with pytest.raises(ConfigError, match="'train' is a value, not a section"):  # a value is not a section
        load_config(TINY, {"train": 5, "train.lr": 0.1})
    result = runner.invoke(app, ["train", "--config", str(TINY), "--set", "train={lr: 0.1}", "--show-config"])
    _clean(result)
    assert result.exit_code == 0 and "  max_epochs: 3\n" in result.output, result.output


# --- YAML 1.2 floats (PyYAML reads YAML 1.1, where 1e-3 is text) ---


def test_yaml_1_2_floats_are_numbers(tmp_path):
    numbers = load_yaml("[1e-3, 1E5, -2e+4, 1.0e3, -.5, 1.0e-3, 7, 0x10]")
    assert numbers == [0.001, 100000.0, -20000.0, 1000.0, -0.5, 0.001, 7, 16]
    assert [type(n) for n in numbers[-2:]] == [int, int]  # integers stay integers
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-3, min_lr: 1E-6}\naugment: {translate_frac: 5e-2}\n")
    config = load_config(path, dict([parse_set_option("augment.rotation_deg=1.5e1")]))
    assert (config.train.lr, config.train.min_lr) == (0.001, 1e-6)
    assert (config.augment.translate_frac, config.augment.rotation_deg) == (0.05, 15.0)
    result = runner.invoke(app, ["train", "--config", str(TINY), "--set", "train.lr=2e-4", "--show-config"])
    _clean(result)
    assert result.exit_code == 0 and "  lr: 0.0002\n" in result.output, result.output
    # too large for a float: the refusal of any infinite value, not 'Input should be a valid number'
    path.write_text("train: {lr: 1e400}\n")
    with pytest.raises(ConfigError, match=r"'train.lr': bad value inf \(Input should be a finite number\)"):
        load_config(path)


def test_text_that_looks_like_a_yaml_1_2_float_is_quoted_where_a_string_is_wanted(tmp_path):
    """As in YAML 1.2, 1e5 is a number: a string field refuses it by name; quoted it is text."""
    path = tmp_path / "c.yaml"
    path.write_text("wandb: {group: 1e5}\n")
    with pytest.raises(ConfigError, match="'wandb.group': bad value 100000.0"):
        load_config(path)
    path.write_text("wandb: {group: '1e5'}\n")
    assert load_config(path).wandb.group == "1e5"


# --- model.widths: one per conv block ---


@pytest.mark.parametrize("widths", [(8, 16, 24, 32, 40), (8, 16, 24)])
def test_widths_give_one_width_per_conv_block(widths):
    """A fifth width for four blocks was accepted and silently dropped (the networks take widths[:4])."""
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"model": {"widths": list(widths)}})
    message = f"config key 'model.widths': bad value {widths} (allowed: 4 widths, one per conv block"
    assert message in str(refused.value) and f"this has {len(widths)}" in str(refused.value)
    # the blocks are the longer of kernels and fissure_kernels: the fissure network takes the first widths
    three = config_from_dict(
        {"model": {"widths": [8, 16, 24], "kernels": [7, 5, 3], "fissure_kernels": [7, 5]}}
    )
    assert three.model.widths == (8, 16, 24)


def test_a_partial_tta_augment_keeps_the_test_time_defaults(tmp_path):
    """What a partial tta.augment leaves out comes from the test-time defaults (rotation 15,
    translation 0.1), not the training ones (45, 0.2)."""
    path = tmp_path / "c.yaml"
    path.write_text("tta: {augment: {noise_prob: 0.3}}\n")
    augment = load_config(path).tta.augment
    assert (augment.rotation_deg, augment.translate_frac, augment.noise_prob) == (15.0, 0.1, 0.3)
    assert load_config(TINY, {"tta.augment.translate_frac": 0.01}).tta.augment.rotation_deg == 15.0
    assert load_config(preset_path("shared")).tta.augment.rotation_deg == 8.0  # a preset's own value stays
