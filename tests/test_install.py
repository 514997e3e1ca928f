"""The package installed from a wheel (not editable): commands run from another folder and find the presets."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_presets_and_entry_points(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "mtl_meniscus", source / "mtl_meniscus", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(ROOT / "configs", source / "configs")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
        check=True,
    )
    wheel = next((tmp_path / "wheel").glob("mtl_meniscus-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(tmp_path / "site")}
    probe = (
        "import mtl_meniscus, mtl_meniscus.config as c; print(mtl_meniscus.__file__); "
        "print(c.preset_path('shared')); print(c.load_config(c.preset_path('shared')).model.widths)"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )
    module_file, preset, widths = found.stdout.splitlines()
    assert Path(module_file).is_relative_to(tmp_path / "site")  # the installed copy, not the checkout
    assert Path(preset) == tmp_path / "site" / "mtl_meniscus" / "configs" / "shared.yaml"
    assert Path(preset).read_text() == (ROOT / "configs" / "shared.yaml").read_text()
    assert widths == "(16, 32, 48, 64)"  # from base.yaml, shipped beside it

    help_text = subprocess.run(
        [sys.executable, "-m", "mtl_meniscus", "train", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert help_text.returncode == 0 and "python -m mtl_meniscus train" in help_text.stdout

    # a tiny training from the other folder, with the installed tiny preset (found by the package)
    command = [sys.executable, "-m", "mtl_meniscus"]
    subprocess.run(
        [*command, "make-phantom", "data", "--n", "40", "--size", "64"], cwd=elsewhere, env=env, check=True
    )
    tiny = tmp_path / "site" / "mtl_meniscus" / "configs" / "tiny.yaml"
    trained = subprocess.run(
        [*command, "train", "--config", str(tiny), "--data", "data", "--max-epochs", "1", "--out", "run"],
        cwd=elsewhere,
        env=env | {"WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (elsewhere / "run" / "best.pt").is_file() and (elsewhere / "run" / "metrics.json").is_file()
    scripts = (tmp_path / "site").glob("mtl_meniscus-*.dist-info/entry_points.txt")
    assert "mtl-meniscus = mtl_meniscus.cli:app" in next(scripts).read_text()
