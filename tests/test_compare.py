"""`compare`: variant planning, shared splits and seeds, skip-on-rerun and resume, table contents."""

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from rich.console import Console
from sklearn.metrics import roc_auc_score
from support import TINY, _quiet, _split_folder
from typer.testing import CliRunner

from mtl_meniscus.commands.compare import (
    ScoredVariant,
    Variant,
    baseline_group,
    parse_list,
    parse_pretrained,
    plan_variants,
    run_compare,
    summarize,
    variant_config,
)
from mtl_meniscus.commands.compare import plan as compare_plan
from mtl_meniscus.commands.compare import run as compare_run
from mtl_meniscus.commands.compare.settings import CompareConfig, load_compare_config
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.evaluation.metrics import challenge_score, task_aucs
from mtl_meniscus.evaluation.plots import seed_differences
from mtl_meniscus.labels import DEFAULT_TASKS
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

TASKS = ("fissure", "orientation", "position")


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    """The tiny preset with a larger test split, so every test AUC is defined on a small phantom."""
    settings = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    settings["data"]["split_fractions"] = [0.5, 0.2, 0.3]
    path = tmp_path_factory.mktemp("preset") / "tiny-compare.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compare_phantom")
    write_phantom(folder, n=120, seed=4, size=64)
    return folder


def tiny_compare(preset: Path, **changes) -> CompareConfig:
    settings = dict(
        modes=("separate", "shared"), seeds=(0, 1), max_epochs=1, steps_per_epoch=2, bootstrap=200
    )
    settings.update(changes)
    config = CompareConfig(**settings)
    config.tta.copies = 1
    return config.validate()


def presets_for(preset: Path) -> dict[str, Path]:
    return {"separate": preset, "shared": preset}


# ---- planning ----------------------------------------------------------------------------------


def test_default_plan_is_separate_vs_shared_five_seeds():
    config = load_compare_config(ROOT / "configs" / "compare.yaml")
    names = [v.name for v in plan_variants(config)]
    assert names == [f"{mode}-reference-seed{seed}" for seed in range(5) for mode in ("separate", "shared")]


def test_plan_crosses_modes_trunks_seeds():
    config = CompareConfig(trunks=("reference", "resnet50", "vgg16", "vgg19"), seeds=(3, 7)).validate()
    variants = plan_variants(config)
    assert len(variants) == 2 * 4 * 2 == len(set(variants))
    assert {v.seed for v in variants} == {3, 7}
    assert variants[:8] == [Variant(m, t, 3) for t in config.trunks for m in config.modes]


def test_baseline_is_the_reference_cascade_when_present():
    assert baseline_group([Variant("shared", "reference", 0), Variant("separate", "reference", 0)]) == (
        "separate-reference"
    )
    assert (
        baseline_group([Variant("shared", "vgg16", 0), Variant("separate", "vgg16", 0)]) == "separate-vgg16"
    )
    assert baseline_group([Variant("shared", "vgg16", 0)]) == "shared-vgg16"


def test_variant_configs_share_data_splits_tta_and_seeds(preset):
    compare = tiny_compare(preset, trunks=("reference", "resnet50"), pretrained={"resnet50": "none"})
    configs = {
        v: variant_config(compare, v, presets_for(preset), "/data", None, "g") for v in plan_variants(compare)
    }
    data_sections = {json.dumps(c.to_dict()["data"]) for c in configs.values()}
    assert len(data_sections) == 1  # same images, same split seed and fractions: same splits
    for variant, config in configs.items():
        assert config.model.name == variant.mode and config.model.trunk == variant.trunk
        assert config.train.seed == variant.seed
        assert (config.train.max_epochs, config.train.steps_per_epoch) == (1, 2)
        assert config.tta == compare.tta
        assert config.wandb.group == "g"
        if variant.trunk == "resnet50":
            assert config.model.pretrained == "none"


def test_budget_equal_images_gives_the_cascade_the_shared_models_steps(preset):
    for budget, cascade_steps in (("per-network", 60), ("equal-images", 20), ("total", 20)):
        compare = tiny_compare(preset, steps_per_epoch=60, budget=budget)
        configs = {
            v.mode: variant_config(compare, v, presets_for(preset), "/data", None, "g")
            for v in plan_variants(compare)
        }
        assert configs["shared"].train.steps_per_epoch == 60
        # total: a third of the steps for each of the cascade's 3 networks
        assert configs["separate"].train.steps_per_epoch == cascade_steps
        assert configs["separate"].train.max_epochs == configs["shared"].train.max_epochs
    # Rounded to the nearest step, never zero; the preset's steps when the comparison sets none.
    assert [compare_plan.steps_per_network(n) for n in (1, 2, 80, 81)] == [1, 1, 27, 27]
    preset_steps = yaml.safe_load(preset.read_text())["train"]["steps_per_epoch"]
    compare = tiny_compare(preset, steps_per_epoch=None, budget="equal-images")
    separate = variant_config(
        compare, Variant("separate", "reference", 0), presets_for(preset), "/data", None, "g"
    )
    assert separate.train.steps_per_epoch == compare_plan.steps_per_network(preset_steps)


def test_phantom_difficulty_applies_to_every_variant(preset):
    """The default comparison runs on `realistic` (configs/compare.yaml); null keeps the presets' level."""
    from mtl_meniscus.commands.compare.settings import load_compare_config
    from mtl_meniscus.config import preset_path

    assert load_compare_config(preset_path("compare")).phantom_difficulty == "realistic"
    for level, expected in (("realistic", "realistic"), (None, "easy")):
        compare = tiny_compare(preset, phantom_difficulty=level)
        levels = {
            variant_config(compare, v, presets_for(preset), None, None, "g").data.phantom_difficulty
            for v in plan_variants(compare)
        }
        assert levels == {expected}


def test_bad_options_name_the_option():
    assert parse_list("0, 1,2", "--seeds", int) == [0, 1, 2]
    with pytest.raises(ConfigError, match="--seeds"):
        parse_list("0,x", "--seeds", int)
    with pytest.raises(ConfigError, match="modes"):
        CompareConfig(modes=("shared", "joint")).validate()
    with pytest.raises(ConfigError, match="seeds"):
        CompareConfig(seeds=(1, 1)).validate()
    with pytest.raises(ConfigError, match="sedes"):
        load_compare_config(None, {"sedes": [0, 1]})
    assert parse_pretrained(["none"], ["reference", "vgg16", "vgg19"]) == {"vgg16": "none", "vgg19": "none"}
    assert parse_pretrained(["vgg16=/w/v.pth"], ["vgg16"]) == {"vgg16": "/w/v.pth"}
    with pytest.raises(ConfigError, match="resnet50"):
        parse_pretrained(["resnet50=/w/r.pth"], ["reference", "vgg16"])
    with pytest.raises(ConfigError, match=r"'vgg16': a trunk's name; give TRUNK=WEIGHTS \(e.g. vgg16=/path"):
        parse_pretrained(["vgg16"], ["reference", "vgg16"])  # not a weights file named vgg16
    with pytest.raises(ConfigError, match="'reference': this package's trunks start from random weights"):
        parse_pretrained(["reference"], ["reference", "vgg16"])


def test_missing_weights_stop_before_any_training(preset, phantom, tmp_path):
    compare = tiny_compare(
        preset, modes=("shared",), trunks=("resnet18",), pretrained={"resnet18": str(tmp_path / "no.pth")}
    )
    with pytest.raises(MeniscusError, match="no.pth"):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)
    assert not (tmp_path / "out").exists()


# ---- a real comparison -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(preset, phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "out"
    run_compare(tiny_compare(preset), out, presets_for(preset), data_dir=phantom)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def without_timing(rows, timings=("infer_", "train_seconds", "train_images_per_s")):
    """A table's rows without the columns that measure time (they move with the machine's load)."""
    return [{k: v for k, v in row.items() if not k.startswith(timings)} for row in rows]


def test_variants_share_splits_and_use_their_seeds(finished):
    folders = sorted((finished / "variants").iterdir())
    assert [f.name for f in folders] == [
        "separate-reference-seed0",
        "separate-reference-seed1",
        "shared-reference-seed0",
        "shared-reference-seed1",
    ]
    splits = {(f / "splits.csv").read_text() for f in folders}
    assert len(splits) == 1
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["train"]["seed"] == int(folder.name[-1])
        result = json.loads((folder / "result.json").read_text())
        assert result["tta_copies"] == 1 and result["params"] > 0 and result["infer_ms_per_image"] > 0


def challenge_score_by_hand(path: Path) -> float:
    """Challenge score from a test_predictions.csv with scikit-learn: orientation/position on tears."""
    rows = read_csv(path)
    tears = [r for r in rows if r["fissure"] == "1"]
    aucs = {
        "fissure": roc_auc_score([int(r["fissure"]) for r in rows], [float(r["p_fissure"]) for r in rows])
    }
    for task in ("orientation", "position"):
        aucs[task] = roc_auc_score([int(r[task]) for r in tears], [float(r[f"p_{task}"]) for r in tears])
    return 0.4 * aucs["fissure"] + 0.3 * aucs["orientation"] + 0.3 * aucs["position"]


def test_table_matches_scores_recomputed_from_predictions(finished):
    table = {row["variant"]: row for row in read_csv(finished / "results.csv")}
    assert list(table) == ["separate-reference", "shared-reference"]
    by_hand = {
        (group, seed): challenge_score_by_hand(
            finished / "variants" / f"{group}-seed{seed}" / "test_predictions.csv"
        )
        for group in table
        for seed in (0, 1)
    }
    for group, row in table.items():
        scores = [by_hand[group, 0], by_hand[group, 1]]
        assert float(row["score_mean"]) == pytest.approx(np.mean(scores), abs=1e-9)
        assert float(row["score_sd"]) == pytest.approx(np.std(scores, ddof=1), abs=1e-9)
        assert float(row["score_ci_low"]) <= float(row["score_ci_high"])
        assert row["baseline"] == "separate-reference" and row["n_seeds"] == "2"
    base, shared = table["separate-reference"], table["shared-reference"]
    assert float(base["diff_mean"]) == 0 and float(base["diff_ci_low"]) == float(base["diff_ci_high"]) == 0
    assert float(base["diff_ci_images_low"]) == float(base["diff_ci_images_high"]) == 0
    paired = [by_hand["shared-reference", s] - by_hand["separate-reference", s] for s in (0, 1)]
    assert float(shared["diff_mean"]) == pytest.approx(np.mean(paired), abs=1e-9)
    assert float(shared["diff_ci_low"]) <= float(shared["diff_ci_high"])
    assert float(shared["diff_ci_images_low"]) <= float(shared["diff_ci_images_high"])
    assert int(shared["params"]) < int(base["params"])  # one trunk instead of three

    # DeLong's paired test, per seed, recomputed from the two variants' prediction files
    delong = read_csv(finished / "results_delong.csv")
    assert [r["variant"] for r in delong] == ["shared-reference-seed0", "shared-reference-seed1"]
    for row, seed in zip(delong, (0, 1)):
        ours = read_csv(finished / "variants" / f"shared-reference-seed{seed}" / "test_predictions.csv")
        theirs = read_csv(finished / "variants" / f"separate-reference-seed{seed}" / "test_predictions.csv")
        y = [int(r["fissure"]) for r in ours]
        expected = roc_auc_score(y, [float(r["p_fissure"]) for r in ours]) - roc_auc_score(
            y, [float(r["p_fissure"]) for r in theirs]
        )
        assert float(row["fissure_auc_diff"]) == pytest.approx(expected, abs=1e-9)
        assert 0 <= float(row["fissure_p"]) <= 1


def test_report_files(finished):
    per_seed = read_csv(finished / "results_per_seed.csv")
    assert [r["variant"] for r in per_seed] == [
        "separate-reference-seed0",
        "shared-reference-seed0",
        "separate-reference-seed1",
        "shared-reference-seed1",
    ]
    markdown = (finished / "results.md").read_text()
    assert "| variant | seeds | fissure AUC |" in markdown and "Δ score vs separate-reference" in markdown
    assert "| shared-reference | 2" in markdown  # tiny runs may add "(k did not learn: ...)"
    for name in ("score_bars", "roc_overlay", "forest"):
        image = cv2.imread(str(finished / f"{name}.png"))
        assert image is not None and image.shape[0] > 100
        assert (finished / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    # the forest plot's dots: each seed's score minus the baseline's score of the same seed
    table = json.loads((finished / "results.json").read_text())
    scores = {r["variant"]: float(r["score"]) for r in per_seed}
    differences = seed_differences(
        table, [{**r, "seed": int(r["seed"]), "score": float(r["score"])} for r in per_seed]
    )
    assert differences["shared-reference"] == pytest.approx(
        [scores[f"shared-reference-seed{s}"] - scores[f"separate-reference-seed{s}"] for s in (0, 1)]
    )
    # each seed's calibration on the test split, recomputed from its predictions
    ours = read_csv(finished / "variants" / "shared-reference-seed0" / "test_predictions.csv")
    y = np.array([int(r["fissure"]) for r in ours])
    p = np.array([float(r["p_fissure"]) for r in ours])
    assert float(per_seed[1]["brier_fissure"]) == pytest.approx(np.mean((p - y) ** 2), abs=1e-9)
    assert yaml.safe_load((finished / "compare.yaml").read_text())["seeds"] == [0, 1]
    # Budget per network: the cascade's 3 networks each saw the shared model's images (1 epoch x 2 steps).
    images = {
        row["variant"]: row["train_images_mean"]
        for row in json.loads((finished / "results.json").read_text())
    }
    batch = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["train"]["batch_size"]
    assert images == {"separate-reference": 3 * 2 * batch, "shared-reference": 2 * batch}
    assert "Budget per network" in markdown and "| train images |" in markdown


def test_rerun_skips_scored_variants(finished, preset, phantom, monkeypatch):
    before = read_csv(finished / "results.csv")

    def no_training(*args, **kwargs):
        raise AssertionError("a scored variant was retrained")

    monkeypatch.setattr(compare_run, "train_run", no_training)
    monkeypatch.setattr(compare_run, "score_variant", no_training)
    run_compare(tiny_compare(preset), finished, presets_for(preset), data_dir=phantom)
    assert read_csv(finished / "results.csv") == before


def test_trained_but_unscored_variant_is_scored_not_retrained(
    finished, preset, phantom, tmp_path, monkeypatch
):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / "variants" / "shared-reference-seed1" / "result.json").unlink()  # killed while scoring

    def no_training(*args, **kwargs):
        raise AssertionError("a trained variant was retrained")

    monkeypatch.setattr(compare_run, "train_run", no_training)
    run_compare(tiny_compare(preset), out, presets_for(preset), data_dir=phantom)
    assert (out / "variants" / "shared-reference-seed1" / "result.json").is_file()

    # Same TTA copies, same model: the re-scored variant gives the same table (timings aside).
    assert without_timing(read_csv(out / "results.csv"), ("infer_",)) == without_timing(
        read_csv(finished / "results.csv"), ("infer_",)
    )


@pytest.mark.slow
def test_jobs_in_parallel_give_the_same_table(finished, preset, phantom, tmp_path):
    """`compare --jobs 2`: the variants train in two worker processes, with as many threads each as
    the sequential run had, and the table is the same (timings aside)."""
    import torch

    out = tmp_path / "parallel"
    run_compare(
        tiny_compare(preset),
        out,
        presets_for(preset),
        data_dir=phantom,
        jobs=2,
        threads=torch.get_num_threads(),
    )

    assert without_timing(read_csv(out / "results_per_seed.csv")) == without_timing(
        read_csv(finished / "results_per_seed.csv")
    )
    assert without_timing(read_csv(out / "results.csv")) == without_timing(read_csv(finished / "results.csv"))
    # a cascade's networks trained as jobs of their own (one log each), then its scoring job
    variants = [p.name for p in (finished / "variants").iterdir() if p.is_dir()]
    networks = [f"{v}.{n}" for v in variants if v.startswith("separate") for n in DEFAULT_TASKS.names]
    assert sorted(p.name for p in (out / "variants").glob("*.log")) == sorted(
        f"{job}.log" for job in variants + networks
    )
    with pytest.raises(ConfigError, match="--jobs"):
        run_compare(tiny_compare(preset), tmp_path / "bad", presets_for(preset), data_dir=phantom, jobs=0)


def test_rerun_with_other_settings_is_refused(finished, preset, phantom):
    with pytest.raises(MeniscusError, match="train.max_epochs: 1 -> 2"):
        run_compare(tiny_compare(preset, max_epochs=2), finished, presets_for(preset), data_dir=phantom)


def test_interrupted_variant_resumes_and_finished_one_is_kept(preset, phantom, tmp_path, monkeypatch):
    compare = tiny_compare(preset, modes=("shared", "separate"), seeds=(0,))
    real_train_run = compare_run.train_run
    calls = []

    def interrupt_separate(config, run_dir, resume=False, console=None, on_epoch_end=None):
        calls.append((Path(run_dir).name, resume))

        def stop(member, epoch):
            if member == "orientation":  # fissure finished, orientation one epoch in
                raise KeyboardInterrupt

        hook = stop if Path(run_dir).name.startswith("separate") else None
        return real_train_run(config, run_dir, resume=resume, console=console, on_epoch_end=hook)

    monkeypatch.setattr(compare_run, "train_run", interrupt_separate)
    with pytest.raises(KeyboardInterrupt):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)
    separate = tmp_path / "out" / "variants" / "separate-reference-seed0"
    assert (tmp_path / "out" / "variants" / "shared-reference-seed0" / "result.json").is_file()
    assert (separate / "members" / "orientation" / "last.pt").is_file()
    assert not (separate / "result.json").exists()

    calls.clear()
    monkeypatch.setattr(
        compare_run,
        "train_run",
        lambda config, run_dir, resume=False, console=None: (
            calls.append((Path(run_dir).name, resume))
            or real_train_run(config, run_dir, resume=resume, console=console)
        ),
    )
    table = run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)
    assert calls == [("separate-reference-seed0", True)]  # shared kept, separate resumed
    history = read_csv(separate / "history.csv")
    assert [r["member"] for r in history] == ["fissure", "orientation", "position"]
    assert [row["variant"] for row in table] == ["shared-reference", "separate-reference"]
    assert not math.isnan(table[1]["score_mean"])


def test_a_comparison_survives_its_data_folder_moving_but_not_other_labels(
    preset, phantom, tmp_path, monkeypatch
):
    # Scored variants whose data folder is gone (moved, or another machine's) are kept: only
    # their predictions count, checked against this data's test split. Other labels are refused.
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    compare = tiny_compare(preset, modes=("shared",), seeds=(0,))
    first = run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=data)
    moved = tmp_path / "moved"
    data.rename(moved)
    monkeypatch.setattr(compare_run, "train_run", lambda *a, **k: pytest.fail("trained again"))
    again = run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=moved)
    assert again[0]["score_mean"] == first[0]["score_mean"]

    predictions = tmp_path / "out" / "variants" / "shared-reference-seed0" / "test_predictions.csv"
    rows = list(csv.reader(predictions.open()))
    rows[1][1] = "1" if rows[1][1] == "0" else "0"  # the first test image's fissure label flipped
    csv.writer(predictions.open("w", newline="")).writerows(rows)
    with pytest.raises(MeniscusError, match="scored on another test split .*other images or labels"):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=moved)
    predictions.write_text("image,fissure,p_fissure\nx.png,1\n")  # cut short
    with pytest.raises(MeniscusError, match="test_predictions.csv is damaged"):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=moved)


def test_a_moved_data_folder_whose_old_place_still_exists_is_refused(preset, phantom, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(phantom, copy)
    compare = tiny_compare(preset, modes=("shared",), seeds=(0,))
    run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)
    with pytest.raises(MeniscusError, match="was trained with other settings .*data.path"):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=copy)
    (tmp_path / "out" / "variants" / "shared-reference-seed0" / "result.json").write_text("{")
    with pytest.raises(
        MeniscusError, match="result.json or test_predictions.csv is damaged .*JSONDecodeError"
    ):
        run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)


def test_a_variant_refused_for_a_changed_default_says_how_to_keep_it(tmp_path):
    """A variant trained before train.gated_loss_mean's default changed differs from a rerun with
    the same options: the refusal names the default and the way to keep the variant."""
    from mtl_meniscus.config import load_config

    config = load_config(TINY)
    saved = config.to_dict()
    del saved["train"]["gated_loss_mean"]  # as an earlier version wrote it (per-gated-row then)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(MeniscusError, match="train.gated_loss_mean: unless you changed it, its default did"):
        compare_plan.variant_status(tmp_path, config)


def test_timm_trunk_variant_end_to_end(preset, phantom, tmp_path):
    compare = tiny_compare(
        preset, modes=("shared",), trunks=("resnet18",), seeds=(0,), pretrained={"resnet18": "none"}
    )
    table = run_compare(compare, tmp_path / "out", presets_for(preset), data_dir=phantom)
    assert table[0]["variant"] == "shared-resnet18" and table[0]["params"] > 1_000_000


# ---- the command -------------------------------------------------------------------------------


def test_cli_compare_and_its_errors(preset, phantom, tmp_path):
    runner = CliRunner()
    settings = tmp_path / "compare.yaml"
    settings.write_text(
        yaml.safe_dump({"presets": {"separate": str(preset), "shared": str(preset)}, "tta": {"copies": 1}})
    )
    args = ["compare", "--config", str(settings), "--data", str(phantom), "--out", str(tmp_path / "out")]
    args += [
        "--seeds",
        "0",
        "--max-epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--budget",
        "equal-images",
        "--bootstrap",
        "50",
        "--wandb",
        "disabled",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "variant 2/2: shared-reference-seed0" in result.output
        and "comparison on the test split" in result.output
    )
    assert "Budget of equal images" in (tmp_path / "out" / "results.md").read_text()
    # Budget in total: the cascade's 3 networks trained 1 step each, the shared model 3 steps.
    images = {
        row["variant"]: row["train_images_mean"]
        for row in json.loads((tmp_path / "out" / "results.json").read_text())
    }
    assert images["separate-reference"] == images["shared-reference"]

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "scored earlier; kept" in again.output

    bad = runner.invoke(app, [*args[:-2], "--seeds", "0,x"])
    assert bad.exit_code == 1 and "--seeds" in bad.output and "Traceback" not in bad.output
    empty = runner.invoke(app, [*args, "--seeds", ""])  # was silently the config's seeds
    assert empty.exit_code == 1 and "--seeds: empty list" in empty.output
    variant = tmp_path / "out" / "variants" / "shared-reference-seed0"
    for folder, kind in ((variant, "training run"), (phantom, "data")):
        into = runner.invoke(app, [*args, "--out", str(folder)])
        assert into.exit_code == 1 and f"is a {kind} folder" in into.output, into.output
    other = runner.invoke(app, [*args, "--max-epochs", "2"])
    assert other.exit_code == 1 and "train.max_epochs" in other.output
    per_network = runner.invoke(app, [*args, "--budget", "per-network"])  # the cascade's steps differ
    assert per_network.exit_code == 1 and "train.steps_per_epoch" in per_network.output
    unknown = runner.invoke(app, [*args, "--budget", "equal"])
    assert unknown.exit_code == 2 and "--budget" in unknown.output  # a fixed choice: typer's usage error


def _scored(group: str, seed: int, targets: np.ndarray, probs: dict, tasks=DEFAULT_TASKS) -> ScoredVariant:
    mode, trunk = group.split("-")
    aucs = task_aucs(targets, probs, tasks)
    result = {
        "test_auc": aucs,
        "test_score": challenge_score(aucs, tasks),
        "params": 1,
        "train_wall_seconds": 1.0,
        "train_images": 1,
        "train_images_per_s": 1.0,
        "infer_ms_per_image": 1.0,
        "tta_copies": 0,
        "n_test": len(targets),
    }
    return ScoredVariant(Variant(mode, trunk, seed), result, [str(i) for i in range(len(targets))], probs)


def test_seed_inclusive_intervals_hold_the_seed_to_seed_spread():
    # A test split so large that the images hardly vary the AUCs, and a shared model whose three
    # seeds differ a lot: the seeds + images interval is about the t-interval of the three seeds'
    # mean (metrics.seeds_and_images_interval); the images-only one is narrow.
    rng = np.random.default_rng(0)
    n = 4000
    fissure = (rng.random(n) < 0.25).astype(float)
    orientation = np.where(fissure == 1, (rng.random(n) < 0.6).astype(float), np.nan)
    position = np.where(fissure == 1, (rng.random(n) < 0.3).astype(float), np.nan)
    targets = np.stack([fissure, orientation, position], axis=1)

    def probs(signal: float) -> dict:
        return {
            task: signal * np.nan_to_num(targets[:, k]) + rng.normal(0, 1, n)
            for k, task in enumerate(("fissure", "orientation", "position"))
        }

    scored = [_scored("separate-reference", seed, targets, probs(1.5)) for seed in range(3)]
    scored += [_scored("shared-reference", seed, targets, probs(s)) for seed, s in enumerate((0.3, 1.0, 2.5))]
    table = {row["variant"]: row for row in summarize(scored, targets, n_bootstrap=600)}
    shared = table["shared-reference"]
    seed_scores = [s.result["test_score"] for s in scored[3:]]
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std(seed_scores, ddof=1) / np.sqrt(3)  # by hand, seeds only
    low, high = np.mean(seed_scores) - half, np.mean(seed_scores) + half
    assert low < min(seed_scores) and high > max(seed_scores)  # a bootstrap of 3 seeds cannot do this
    assert shared["score_ci_low"] == pytest.approx(low, abs=0.02)
    assert shared["score_ci_high"] == pytest.approx(high, abs=0.02)
    assert shared["score_ci_images_high"] - shared["score_ci_images_low"] < 0.05
    assert shared["diff_ci_high"] - shared["diff_ci_low"] > 4 * (
        shared["diff_ci_images_high"] - shared["diff_ci_images_low"]
    )
    base_mean = np.mean([s.result["test_score"] for s in scored[:3]])
    assert shared["diff_mean"] == pytest.approx(np.mean(seed_scores) - base_mean, abs=1e-12)


def test_an_unscored_task_with_an_undefined_auc_leaves_the_intervals_as_they_were():
    # A weight-0 extra task whose test rows hold one class (every test tear "displaced"): its AUC
    # is NaN and, multiplied by its weight 0, had made every resampled score NaN, so the intervals
    # lost the test images' error without a word (too narrow). They equal the three tasks' now.
    from mtl_meniscus.labels import Task

    tasks = DEFAULT_TASKS.extended([Task("displaced", {"yes": 1.0, "no": 0.0}, gated_by="fissure")])
    rng = np.random.default_rng(3)
    n = 120
    fissure = (rng.random(n) < 0.4).astype(float)
    subtype = [np.where(fissure == 1, (rng.random(n) < 0.5).astype(float), np.nan) for _ in range(2)]
    targets = np.stack([fissure, *subtype, np.where(fissure == 1, 1.0, np.nan)], axis=1)

    def table(names: list[str], table_tasks) -> dict:
        variants = []
        for mode, noise in (("separate", 1.2), ("shared", 0.8)):
            for seed in range(3):
                draw = np.random.default_rng(10 * seed + len(mode))
                probs = {
                    t: np.nan_to_num(targets[:, k]) + draw.normal(0, noise, n) for k, t in enumerate(names)
                }
                variants.append(_scored(f"{mode}-reference", seed, targets, probs, table_tasks))
        rows = summarize(variants, targets[:, : len(names)], 200, tasks=table_tasks)
        return {row["variant"]: row for row in rows}

    with_extra = table([*TASKS, "displaced"], tasks)["shared-reference"]
    three = table(list(TASKS), DEFAULT_TASKS)["shared-reference"]
    assert math.isnan(with_extra["auc_displaced_mean"])
    for key in ("score_ci_low", "score_ci_high", "score_ci_images_low", "diff_ci_low", "diff_ci_high"):
        assert math.isfinite(with_extra[key])
        assert with_extra[key] == pytest.approx(
            three[key], abs=0.01
        )  # other resample draws: close, not equal


def test_a_variant_that_did_not_learn_is_marked_not_averaged_in_silently():
    from mtl_meniscus.commands.compare import display_cells

    rng = np.random.default_rng(1)
    n = 200
    fissure = (rng.random(n) < 0.3).astype(float)
    targets = np.stack(
        [
            fissure,
            np.where(fissure == 1, rng.random(n) < 0.5, np.nan),
            np.where(fissure == 1, rng.random(n) < 0.3, np.nan),
        ],
        axis=1,
    )
    probs = {task: rng.random(n) for task in TASKS}
    scored = [_scored("separate-reference", seed, targets, probs) for seed in (0, 1)]
    scored += [_scored("shared-reference", seed, targets, probs) for seed in (0, 1)]
    scored[3].result["learned"] = False
    table = summarize(scored, targets, n_bootstrap=20)
    header, rows = display_cells(table)
    cells = {row[0]: row for row in rows}
    assert cells["shared-reference"][1] == "2 (1 did not learn: seed 1)"
    assert cells["separate-reference"][1] == "2"


def test_floor_check_names_a_variant_that_loses_to_the_plain_cnn():
    from mtl_meniscus.commands.compare import floor_findings

    def row(mode, trunk, score):
        return {"variant": f"{mode}-{trunk}", "mode": mode, "trunk": trunk, "score_mean": score}

    table = [
        row("separate", "reference", 0.80),
        row("shared", "reference", 0.95),
        row("shared", "plain", 0.94),
        row("separate", "plain", 0.90),
        row("shared", "resnet50", 0.92),  # 0.02 below: within the margin
    ]
    findings = floor_findings(table)
    assert len(findings) == 3  # every non-floor variant with a floor of its mode
    assert "separate-reference LOSES to the plain floor separate-plain by 0.100" in findings[0]
    assert (
        "shared-reference is within 0.02 of the plain floor shared-plain or above it (+0.010)" in findings[1]
    )
    assert "shared-resnet50 is within" in findings[2]
    assert floor_findings([row("shared", "reference", 0.5)]) == []  # no floor in the table: nothing said
    # an undefined score (a split with one class) neither passes nor loses
    (finding,) = floor_findings([row("shared", "reference", 0.9), row("shared", "plain", float("nan"))])
    assert "shared-reference cannot be judged against the plain floor shared-plain" in finding
    assert "the test score of shared-plain is undefined" in finding and "within" not in finding
    # learning curves: each share judged against the floor of the same share; no floor judged
    curves = [
        {**row("shared", trunk, score), "variant": f"shared-{trunk}-train{f:g}", "train_fraction": f}
        for trunk, f, score in (("reference", 0.5, 0.90), ("plain", 0.5, 0.80), ("plain", 1.0, 0.95))
    ]
    (finding,) = floor_findings(curves)
    assert (
        finding.startswith("Floor check: shared-reference-train0.5 is within")
        and "shared-plain-train0.5" in finding
    )


def test_compare_refuses_data_without_a_test_split(tmp_path):
    from mtl_meniscus.commands.compare import run_compare
    from mtl_meniscus.commands.compare.settings import CompareConfig

    _split_folder(tmp_path / "d", ["train"] * 6 + ["val"] * 2)
    settings = CompareConfig(modes=("shared",), seeds=(0,), max_epochs=1, steps_per_epoch=1).validate()
    with pytest.raises(MeniscusError, match="the test split of .* is empty"):
        run_compare(settings, tmp_path / "cmp", {"shared": TINY}, data_dir=tmp_path / "d", console=_quiet())


def test_learning_curves_train_every_mode_on_nested_shares_of_the_training_split(preset, phantom, tmp_path):
    compare = tiny_compare(preset, seeds=(0, 1), train_fractions=(0.5, 1.0))
    console = Console(record=True, width=300)
    table = {
        row["variant"]: row
        for row in run_compare(
            compare, tmp_path / "out", presets_for(preset), data_dir=phantom, console=console
        )
    }
    assert "x training share 0.5, 1 x seeds 0, 1)" in console.export_text()
    assert set(table) == {
        "separate-reference-train0.5",
        "shared-reference-train0.5",
        "separate-reference",
        "shared-reference",
    }
    assert table["shared-reference-train0.5"]["baseline"] == "separate-reference-train0.5"
    half, full = table["shared-reference-train0.5"]["n_train"], table["shared-reference"]["n_train"]
    assert 0.4 * full <= half <= 0.6 * full
    # the half run's training images are among the full run's, and its val/test splits are the same
    half_splits = read_csv(tmp_path / "out" / "variants" / "shared-reference-train0.5-seed0" / "splits.csv")
    full_splits = read_csv(tmp_path / "out" / "variants" / "shared-reference-seed0" / "splits.csv")
    for a, b in zip(half_splits, full_splits):
        assert a["image"] == b["image"]
        assert a["split"] == b["split"] or (a["split"] == "unused" and b["split"] == "train")
    assert (tmp_path / "out" / "learning_curves.png").is_file()
    assert (tmp_path / "out" / "learning_curves.pdf").is_file()


@pytest.mark.slow
def test_a_worker_ends_itself_when_the_main_process_is_gone():
    """compare's workers outlived a killed main process: trained on, then waited for good, each
    holding its memory and its variant's lock."""
    import subprocess

    watch = "import os, sys; from mtl_meniscus.commands.compare.run import end_with_parent; "
    # its own parent: it keeps watching; a parent it does not have (the main process gone): it ends
    alive = subprocess.Popen([sys.executable, "-c", watch + "end_with_parent(os.getppid(), every=0.1)"])
    gone = "end_with_parent(os.getppid() + 10**7, every=0.1)"  # beyond any pid: not its parent
    orphan = subprocess.run([sys.executable, "-c", watch + gone], timeout=60)
    try:
        assert orphan.returncode == 1
        with pytest.raises(subprocess.TimeoutExpired):
            alive.wait(timeout=5)
    finally:
        alive.kill()


def test_a_predicted_roi_cascade_with_jobs_gives_the_sequential_table(preset, phantom, tmp_path):
    """roi predicted under --jobs: the cascade's segmentation network trains alone first, then its
    classifiers at once (they crop around its horns), then its scoring job; the table is the one
    the cascade trained in one job gives."""
    import torch

    compare = tiny_compare(preset, modes=("separate",), seeds=(0,), rois=("predicted",))
    run_compare(compare, tmp_path / "in-turn", presets_for(preset), data_dir=phantom)
    jobs = tmp_path / "jobs"
    run_compare(compare, jobs, presets_for(preset), data_dir=phantom, jobs=2, threads=torch.get_num_threads())

    rows = without_timing(read_csv(jobs / "results_per_seed.csv"))
    assert rows == without_timing(read_csv(tmp_path / "in-turn" / "results_per_seed.csv"))
    variant = "separate-reference-roi_predicted-seg-seed0"
    assert [row["variant"] for row in rows] == [variant]
    networks = ("", ".segmentation", *(f".{task}" for task in TASKS))  # "": the scoring job's log
    assert sorted(p.name for p in (jobs / "variants").glob("*.log")) == sorted(
        f"{variant}{network}.log" for network in networks
    )


def test_jobs_made_ready_by_a_finished_one_go_before_those_waiting():
    """With one worker: a roi predicted cascade's segmentation network, then its classifiers and its
    scoring job, which a finished job made ready, before the one-network variant that was waiting."""
    from concurrent.futures import Future

    class InstantPool:  # runs nothing: each job is finished when submitted
        def __init__(self):
            self.jobs = []

        def submit(self, worker, *args):
            # _network_worker(variant name, network, run folder); _variant_worker(variant, ...)
            network = worker is compare_run._network_worker
            self.jobs.append((args[0], args[1]) if network else (args[0].name, "trains or scores it"))
            done = Future()
            done.set_result(0.0)
            return done

    cascade = Variant("separate", "reference", 0, roi="predicted", segmentation=True)
    shared = Variant("shared", "reference", 0)
    groups = {cascade: [["segmentation"], ["fissure", "orientation", "position"]], shared: []}
    pool = InstantPool()
    queue = compare_run._JobQueue(pool, 1, {cascade: None, shared: None}, Path("out"), groups)
    queue.run([shared, cascade], {shared: "new", cascade: "new"}, _quiet(), lambda: None)
    assert pool.jobs == [
        (cascade.name, "segmentation"),
        (cascade.name, "fissure"),
        (cascade.name, "orientation"),
        (cascade.name, "position"),
        (cascade.name, "trains or scores it"),  # assembles and scores the cascade
        (shared.name, "trains or scores it"),
    ]


@pytest.mark.slow
def test_learning_curves_with_jobs_give_the_sequential_table(preset, phantom, tmp_path):
    """A worker reads the whole training split and cuts its variant's share once, as the
    sequential run does (it used to cut it twice and refuse its own variant's splits)."""
    import torch

    compare = tiny_compare(preset, seeds=(0,), train_fractions=(0.5, 1.0))
    run_compare(compare, tmp_path / "in-turn", presets_for(preset), data_dir=phantom)
    run_compare(
        compare,
        tmp_path / "jobs",
        presets_for(preset),
        data_dir=phantom,
        jobs=2,
        threads=torch.get_num_threads(),
    )

    jobs = without_timing(read_csv(tmp_path / "jobs" / "results_per_seed.csv"))
    assert jobs == without_timing(read_csv(tmp_path / "in-turn" / "results_per_seed.csv"))
    assert {row["variant"] for row in jobs} >= {"shared-reference-train0.5-seed0"}


@pytest.mark.slow
def test_ctrl_c_during_jobs_stops_every_worker_without_a_traceback(preset, phantom, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the workers start:
    the main process says how to continue and ends them; a worker importing the package printed a
    KeyboardInterrupt traceback and one training kept the main process waiting."""
    import os
    import signal
    import subprocess
    import time

    settings = tmp_path / "compare.yaml"
    settings.write_text(yaml.safe_dump({"presets": {"separate": str(preset), "shared": str(preset)}}))
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "compare",
        "--config",
        str(settings),
        "--data",
        str(phantom),
    ]
    command += ["--seeds", "0", "--max-epochs", "1000", "--jobs", "2", "--out", str(tmp_path / "cmp")]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored, as in a terminal
        env=os.environ | {"WANDB_MODE": "disabled"},
    )
    lines = []
    for line in process.stdout:  # the workers start when this line is printed
        lines.append(line)
        if line.startswith("training 2 variants in 2 processes"):
            break
    time.sleep(2)  # the workers are importing the package (a traceback each) or training
    os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=60) == 130, output
    assert "interrupted; rerun the same command to continue" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker left behind
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a worker process outlived the interrupted compare")


def _report_sigint(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_workers_start_with_ctrl_c_ignored_and_the_main_process_keeps_its_handler():
    """compare's worker processes leave Ctrl-C to the main process from their first instruction
    (SIGINT ignored, inherited across exec), and starting one leaves the main process's handler."""
    import signal

    context = compare_run._WorkerContext()
    queue = context.Queue()
    handler = signal.getsignal(signal.SIGINT)
    worker = context.Process(target=_report_sigint, args=(queue,))
    worker.start()
    assert queue.get(timeout=60) is True
    worker.join(timeout=60)
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_rerun_on_changed_training_data_refuses_the_variants_trained_before(preset, phantom, tmp_path):
    """With a split column the test split can stay while training rows go: a variant scored
    before was kept and averaged with new ones trained on the smaller set, without a word."""
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    lines = (data / "labels.csv").read_text().splitlines()
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    lines = [lines[0] + ",split"] + [f"{line},{split[k % 10]}" for k, line in enumerate(lines[1:])]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cmp"
    settings = tiny_compare(preset, modes=("shared",), seeds=(0,))
    run_compare(settings, out, presets_for(preset), data_dir=data, console=_quiet())
    fewer = [line for k, line in enumerate(lines) if k == 0 or not line.endswith(",train") or k % 3]
    (data / "labels.csv").write_text("\n".join(fewer) + "\n")
    with pytest.raises(
        MeniscusError,
        match=r"was trained on other data than this comparison's \(\d+ of the run no longer kept",
    ):
        run_compare(
            tiny_compare(preset, modes=("shared",), seeds=(0, 1)),
            out,
            presets_for(preset),
            data_dir=data,
            console=_quiet(),
        )


def test_a_rerun_leaves_no_figure_of_an_earlier_run_beside_its_own(finished, preset, phantom, tmp_path):
    """Learning curves are drawn only with several training shares: one drawn by an earlier run on
    the same folder stayed, and compare_table.py keep published it under a table without shares."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "learning_curves.png").write_bytes(b"an earlier run's")
    console = Console(record=True, width=300)
    run_compare(tiny_compare(preset), out, presets_for(preset), data_dir=phantom, console=console)
    assert not (out / "learning_curves.png").exists()
    (wrote,) = [line for line in console.export_text().splitlines() if line.startswith("wrote ")]
    assert "the figures score_bars, roc_overlay, forest (.png and .pdf)" in wrote  # and no learning curves
    named = [name for name in ("results.md", "results.json", "results_delong.csv") if name in wrote]
    assert named == [
        name for name in ("results.md", "results.json", "results_delong.csv") if (out / name).exists()
    ]
    assert (out / "forest.png").stat().st_size > 1000  # what this run draws is there


def test_compare_settings_name_the_file_of_a_bad_value_and_refuse_fractions_named_alike(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("budget: equal\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'budget': bad value 'equal'"):
        load_compare_config(path)
    # both would train into ...-train0.5-seed0: the second found the first's run there
    with pytest.raises(
        ConfigError, match="'train_fractions': bad value .* differ within 6 significant digits"
    ):
        load_compare_config(None, {"train_fractions": [0.5000001, 0.5000004]})


def test_a_partial_tta_augment_in_a_comparison_keeps_its_test_time_defaults(tmp_path):
    """The twin of the run config's rule: what a compare YAML's tta.augment leaves out comes from
    compare's own test-time augmentation (8 degrees, 5%), not the training defaults (45, 20%)."""
    path = tmp_path / "c.yaml"
    path.write_text("tta: {augment: {noise_prob: 0.3}}\n")
    augment = load_compare_config(path).tta.augment
    assert (augment.rotation_deg, augment.translate_frac, augment.noise_prob) == (8.0, 0.05, 0.3)
