"""The benchmark's quick form: it runs end to end and reports every measurement (no speed asserts)."""

import json

from rich.console import Console

from mtl_meniscus.bench import run_benchmark


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
    markdown = (tmp_path / "bench.md").read_text()
    assert "| training images/s" in markdown and "quick mode" in markdown
    assert results["training"]["precision"] in ("bf16", "fp32")
