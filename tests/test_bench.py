"""The benchmark's quick form: it runs end to end and reports every measurement (no speed asserts)."""

import json

import pytest
from rich.console import Console

from mtl_meniscus.commands.bench import run_benchmark


def test_quick_benchmark_reports_every_measurement(tmp_path):
    results = run_benchmark(quick=True, out_dir=tmp_path, console=Console(quiet=True))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["torch"] and saved["machine"]["isa"] and "amx" in saved["machine"]
    for section, key in [
        ("training", "package_over_bare"),
        ("precision", "auto_over_fp32"),
        ("shared_vs_separate", "shared_speedup"),
        ("data_pipeline", "augment_filter_standardize_images_per_s"),
    ]:
        assert saved[section][key] > 0, section
    assert saved["floor"]["plain_images_per_s"] > 0
    # the preset in the precision auto chose, again in fp32 where that differs, and the floor
    presets = 2 if results["training"]["precision"] == "bf16" else 1
    whats = [row["what"] for row in saved["flops"]["rows"]]
    assert [what.split(",")[0] for what in whats] == ["the preset"] * presets + ["the plain floor"]
    assert len(set(whats)) == len(whats)  # no row twice
    assert all(row["achieved_gflops"] > 0 for row in saved["flops"]["rows"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "| training images/s" in markdown and "quick mode" in markdown
    assert results["training"]["precision"] in ("bf16", "fp32")


def test_training_step_flops_match_a_hand_count():
    """The plain floor on one 32 x 32 image: forward 2*Cin*Cout*9*H*W per conv + 2*96 per linear head;
    backward twice the forward (weight and input gradients) except the first conv's input gradient."""
    from mtl_meniscus.commands.bench import training_step_flops
    from mtl_meniscus.config import Config

    convs = [(2, 16, 32), (16, 32, 16), (32, 64, 8), (64, 64, 4), (64, 96, 2)]  # (Cin, Cout, H = W)
    forward = sum(2 * cin * cout * 9 * size * size for cin, cout, size in convs) + 3 * 2 * 96
    first = 2 * 2 * 16 * 9 * 32 * 32
    config = Config()
    config.model = config.model.model_copy(update={"trunk": "plain"})
    assert training_step_flops(config, batch_size=1, image_size=32) == 3 * forward - first


def test_peak_flops_follow_the_isa_and_precision():
    from mtl_meniscus.commands.bench import peak_flops

    machine = {"cores": 2, "mhz": 2600.0, "isa": "AVX512", "amx": True, "gpu": None}
    assert peak_flops(machine, "bf16") == (2 * 2600e6 * 1024, "AMX bf16")
    assert peak_flops(machine, "fp32") == (2 * 2600e6 * 64, "AVX512 fp32")
    assert peak_flops({**machine, "isa": "AVX2", "amx": False}, "fp32") == (2 * 2600e6 * 32, "AVX2 fp32")
    assert peak_flops({**machine, "mhz": None}, "fp32")[0] is None  # unknown clock: no made-up peak


def test_a_run_that_cannot_be_read_is_named_before_any_measurement(run64, tmp_path, monkeypatch):
    import shutil

    from mtl_meniscus.commands import bench
    from mtl_meniscus.errors import MeniscusError

    def never(*args, **kwargs):
        raise AssertionError("measured although a run cannot be read")

    monkeypatch.setattr(bench, "training_throughput", never)
    broken = tmp_path / "broken"
    shutil.copytree(run64, broken)
    text = (broken / "metrics.json").read_text()
    for damage, named in (
        (text[:100], "metrics.json or history.csv is not a finished training's"),  # truncated
        (json.dumps({"score": 0.5}), "KeyError: 'model'"),
        (json.dumps({"model": "shared"}), "KeyError: 'members'"),
    ):
        (broken / "metrics.json").write_text(damage)
        with pytest.raises(MeniscusError, match=named):
            run_benchmark(
                quick=True, out_dir=tmp_path / "out", console=Console(quiet=True), runs=(broken, run64)
            )
    with pytest.raises(MeniscusError, match="--separate-run: cannot read .*nowhere"):
        run_benchmark(quick=True, out_dir=tmp_path / "out", runs=(run64, tmp_path / "nowhere"))
    # a run of the other mode: its epochs would be read as the other mode's
    with pytest.raises(MeniscusError, match="--separate-run .* is a run of model 'shared' \\(one network"):
        run_benchmark(quick=True, out_dir=tmp_path / "out", runs=(run64, run64))
