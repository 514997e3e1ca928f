"""scripts/compare_table.py: the README's summary of the kept comparisons, learning curves included,
from result files in the format `compare` writes (rows of the kept per-network comparison)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PER_NETWORK = ROOT / "results" / "compare" / "per-network"
sys.path.insert(0, str(ROOT / "scripts"))
import compare_table  # noqa: E402

PHANTOM = "/tmp/mtlcache/phantom-v4-realistic-afc9d7a7-n1128-seed0"  # the kept comparisons' data


def _keep(out: Path, label: str, rows: list[dict], fractions: list[float], data: str = PHANTOM) -> None:
    """A kept comparison as `compare_table.py keep` leaves it (the files the summary reads), its
    variants trained on the folder `data`."""
    folder = out / label
    folder.mkdir(parents=True)
    about = {"label": label, "command": "python cli.py compare", "machine": "a CPU", "date": "2026-11-30"}
    (folder / "about.json").write_text(json.dumps(about | {"training_minutes": 1.0}))
    settings = yaml.safe_load((PER_NETWORK / "compare.yaml").read_text()) | {"train_fractions": fractions}
    (folder / "compare.yaml").write_text(yaml.safe_dump(settings))
    (folder / "results.json").write_text(json.dumps(rows))
    for variant in ("separate-reference-seed0", "shared-reference-seed0"):
        (folder / "variants" / variant).mkdir(parents=True)
        (folder / "variants" / variant / "config.yaml").write_text(yaml.safe_dump({"data": {"path": data}}))


def test_learning_curves_get_a_table_of_their_own_beside_the_budgets(tmp_path, monkeypatch):
    real = json.loads((PER_NETWORK / "results.json").read_text())  # the cascade's row, the shared one's
    cascade, shared = real
    curves = [
        row | {"train_fraction": fraction, "n_train": n_train, "score_mean": row["score_mean"] - drop}
        for fraction, n_train, drop in ((0.1, 78, 0.25), (1.0, 781, 0.0))
        for row in real
    ]
    # a ROI variant of the same fraction is another question: it stays out of both tables
    curves.append(
        shared | {"variant": "shared-reference-roi_classical", "roi": "classical", "score_mean": 0.5}
    )
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    _keep(tmp_path / "compare", "per-network", real, [1.0])
    _keep(tmp_path / "compare", "curves", curves, [0.1, 1.0])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "compare-curves-learning_curves.png").write_bytes(b"")

    lines = compare_table.readme_summary().splitlines()

    budgets = [line for line in lines if line.startswith("| per-network |") or line.startswith("| curves |")]
    assert budgets == [
        f"| per-network | {cascade['score_mean']:.3f} ± {cascade['score_sd']:.3f} | "
        f"{shared['score_mean']:.3f} ± {shared['score_sd']:.3f} | {shared['diff_mean']:+.3f} "
        f"[{shared['diff_ci_low']:+.3f}, {shared['diff_ci_high']:+.3f}] | "
        f"{cascade['train_flops_mean'] / 1e12:.0f} / {shared['train_flops_mean'] / 1e12:.0f} | none |"
    ]
    points = [line for line in lines if line.startswith(("| 78 (0.1) |", "| 781 (1) |"))]
    assert [p.split(" | ")[1:3] for p in points] == [
        [f"{cascade['score_mean'] - 0.25:.3f} ± {cascade['score_sd']:.3f}", f"{shared['score_mean'] - 0.25:.3f} ± {shared['score_sd']:.3f}"],
        [f"{cascade['score_mean']:.3f} ± {cascade['score_sd']:.3f}", f"{shared['score_mean']:.3f} ± {shared['score_sd']:.3f}"],
    ]  # fmt: skip
    assert (
        "Learning curves (curves): the same comparison on shares of the training split. "
        "![curves: learning curves](docs/images/compare-curves-learning_curves.png)"
    ) in lines
    assert any("curves: per-network, on nested, stratified, patient-grouped shares" in line for line in lines)


def test_the_auxiliary_segmentation_comparison_is_a_sentence_of_its_own(tmp_path, monkeypatch):
    """A comparison of the shared model without and with the segmentation decoder has no cascade:
    the summary says both scores and the paired difference, taken from its rows."""
    _, shared = json.loads((PER_NETWORK / "results.json").read_text())
    without = shared | {"baseline": shared["variant"]}
    with_decoder = shared | {
        "variant": "shared-reference-seg", "segmentation": True, "score_mean": 0.9789, "score_sd": 0.0061,
        "diff_mean": -0.0021, "diff_ci_low": -0.0136, "diff_ci_high": 0.0094, "train_flops_mean": 2.17e14,
        "baseline": shared["variant"], "still_improving_seeds": "3",
    }  # fmt: skip
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    _keep(tmp_path / "compare", "segmentation", [without, with_decoder], [1.0])

    lines = compare_table.readme_summary().splitlines()

    sentence = [line for line in lines if line.startswith("Auxiliary segmentation (segmentation):")]
    assert len(sentence) == 1 and sentence[0].startswith(
        f"Auxiliary segmentation (segmentation): the shared model scored {shared['score_mean']:.3f} ± "
        f"{shared['score_sd']:.3f} without the segmentation decoder and 0.979 ± 0.006 with it, "
        f"with − without -0.002 [-0.014, +0.009]; training TFLOPs {shared['train_flops_mean'] / 1e12:.0f} / 217; "
        "flagged seeds: with: 1 still improving. `python cli.py compare`, realistic phantom"
    )
    assert not any(line.startswith("| segmentation |") for line in lines)  # no cascade: no budget row
    # a difference to another baseline is not "with − without": the comparison stays on the page
    with_decoder["baseline"] = "shared-other"
    shutil.rmtree(tmp_path / "compare")
    _keep(tmp_path / "compare", "segmentation", [without, with_decoder], [1.0])
    assert compare_table.readme_summary() == "(no comparison kept yet)"


def _pages(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of docs/results.md and README.md, with the compare and compare-summary markers."""
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    page.write_bytes((ROOT / "docs" / "results.md").read_bytes())
    readme.write_bytes((ROOT / "README.md").read_bytes())
    return page, readme


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_render_refuses_when_no_comparison_is_kept(tmp_path, monkeypatch, state):
    page, readme = _pages(tmp_path)
    out = tmp_path / "compare"
    if state == "empty":
        out.mkdir()
    monkeypatch.setattr(compare_table, "OUT", out)
    before = page.read_bytes(), readme.read_bytes()
    with pytest.raises(SystemExit) as refused:
        compare_table.render(page, readme)
    assert str(out) in str(refused.value.code) and "compare_table.py keep" in str(refused.value.code)
    assert (page.read_bytes(), readme.read_bytes()) == before


def test_page_without_readme_leaves_the_readme_alone(tmp_path, monkeypatch, capsys):
    page, readme = _pages(tmp_path)
    out = tmp_path / "compare"
    shutil.copytree(ROOT / "results" / "compare", out)
    monkeypatch.setattr(compare_table, "OUT", out)
    monkeypatch.setattr(compare_table, "README", readme)  # stands for the repository's README
    before = readme.read_bytes()
    monkeypatch.setattr(sys, "argv", ["compare_table.py", "render", "--page", str(page)])
    compare_table.main()
    assert readme.read_bytes() == before
    assert "**per-network**" in page.read_text()
    assert "--page without --readme" in capsys.readouterr().err

    other = tmp_path / "other-readme.md"
    other.write_bytes(before)
    monkeypatch.setattr(
        sys, "argv", ["compare_table.py", "render", "--page", str(page), "--readme", str(other)]
    )
    compare_table.main()
    assert readme.read_bytes() == before and "| per-network |" in other.read_text()


def test_keep_refuses_an_unfinished_comparison_before_copying(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text("[]")
    with pytest.raises(SystemExit) as refused:
        compare_table.keep("per-network", folder, "python cli.py compare")
    assert "results.md" in str(refused.value.code) and not (tmp_path / "compare").exists()
    with pytest.raises(SystemExit) as refused:
        compare_table.keep("per-network", tmp_path / "nowhere", "python cli.py compare")
    assert "does not exist" in str(refused.value.code)


def test_render_writes_neither_page_when_the_readme_has_no_markers(tmp_path, monkeypatch):
    page, readme = _pages(tmp_path)
    shutil.copytree(ROOT / "results" / "compare", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    readme.write_text("# a README without the compare-summary markers\n")
    before = page.read_bytes()
    with pytest.raises(SystemExit, match="compare-summary:start"):
        compare_table.render(page, readme)
    assert page.read_bytes() == before  # the results page was written first before


def test_a_one_seed_comparison_shows_n_a_where_compare_wrote_null(tmp_path, monkeypatch):
    # what compare writes for one seed: no sd and no interval (null in results.json); FLOPs of
    # results scored before they were counted: null too
    cascade, shared = json.loads((PER_NETWORK / "results.json").read_text())
    undefined = {"score_sd": None, "diff_ci_low": None, "diff_ci_high": None, "train_flops_mean": None}
    rows = [row | undefined | {"seeds": "0", "n_seeds": 1} for row in (cascade, shared)]
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    _keep(tmp_path / "compare", "one-seed", rows, [1.0])

    lines = compare_table.readme_summary().splitlines()

    # as compare's own table: the mean alone where there is no sd, n/a for an undefined number
    expected = (
        f"| one-seed | {cascade['score_mean']:.3f} | {shared['score_mean']:.3f} | "
        f"{shared['diff_mean']:+.3f} [n/a, n/a] | n/a / n/a | none |"
    )
    assert expected in lines


def _finished_compare_folder(tmp_path: Path) -> Path:
    """A finished `compare --out` folder (the kept per-network one, with the machine it ran on)."""
    folder = tmp_path / "run"
    shutil.copytree(PER_NETWORK, folder)
    machine = {"cpu": "a CPU", "cores": 2, "isa": "AVX2", "amx": False, "torch": "2", "gpu": None}
    (folder / "machine.json").write_text(json.dumps(machine))
    return folder


@pytest.mark.parametrize("label", ["gpu/run1", "two words", "../x", "..", ".hidden", ""])
def test_keep_refuses_a_label_that_is_not_a_plain_name_before_copying(tmp_path, monkeypatch, label):
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "results" / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    folder = _finished_compare_folder(tmp_path)
    (folder / "forest.png").write_bytes(b"png")
    with pytest.raises(SystemExit) as refused:
        compare_table.keep(label, folder, "python cli.py compare")
    assert repr(label) in str(refused.value.code) and "plain name" in str(refused.value.code)
    assert not (tmp_path / "results").exists() and not (tmp_path / "x").exists()
    assert list((tmp_path / "images").iterdir()) == []


def test_keep_takes_a_plain_label_and_render_shows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    folder = _finished_compare_folder(tmp_path)
    (folder / "forest.png").write_bytes(b"png")
    compare_table.keep("gpu-run_1.b", folder, "python cli.py compare")
    page, readme = _pages(tmp_path)
    content = compare_table.render(page, readme)
    assert "![gpu-run_1.b: forest](images/compare-gpu-run_1.b-forest.png)" in content
    assert "| gpu-run_1.b |" in readme.read_text()


@pytest.mark.parametrize(
    ("data", "caption"),
    [
        ("/home/me/knee-mri", "data folder `knee-mri`"),  # compare --data DIR: the folder by its name
        ("/tmp/c/phantom-v4-hard-0123abcd-n1128-seed0", "hard phantom"),
        ("/home/me/.cache/mtl_meniscus/phantom-v4-n1128-seed0", "easy phantom"),  # easy: no level in it
        (PHANTOM, "realistic phantom"),
    ],
)
def test_the_readme_caption_names_the_data_the_comparison_ran_on(tmp_path, monkeypatch, data, caption):
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    real = json.loads((PER_NETWORK / "results.json").read_text())
    _keep(tmp_path / "compare", "per-network", real, [1.0], data=data)  # compare.yaml says realistic
    summary = compare_table.readme_summary()
    assert "per-network: `python cli.py compare`, " + caption + ", seeds 0, 1, 2, 3, 4" in summary
    assert ("realistic phantom" in summary) == (caption == "realistic phantom")


def test_render_of_the_kept_comparisons_leaves_the_published_pages_as_they_are(tmp_path, monkeypatch):
    page, readme = _pages(tmp_path)
    before = page.read_bytes(), readme.read_bytes()
    compare_table.render(page, readme)  # the repository's results/compare, as published
    assert (page.read_bytes(), readme.read_bytes()) == before


BAD_FILES = [  # (kept file, its text, what the message names)
    ("results.json", '[{"variant": "x"}]', "trunk"),
    ("results.json", "{}", "not a list of result rows"),
    ("results.json", "[]", "no result rows"),
    ("about.json", "{}", "label"),
    ("about.json", "[1, 2]", "not a JSON object"),
    ("compare.yaml", "{}", "seeds"),
    ("variants/shared-reference-seed0/config.yaml", "data: {}", "data.path"),
]


@pytest.mark.parametrize(("name", "text", "named"), BAD_FILES)
def test_render_names_an_incomplete_kept_file_and_writes_neither_page(
    tmp_path, monkeypatch, name, text, named
):
    page, readme = _pages(tmp_path)
    out = tmp_path / "compare"
    shutil.copytree(ROOT / "results" / "compare", out)
    monkeypatch.setattr(compare_table, "OUT", out)
    bad = out / "per-network" / name
    bad.write_text(text)
    before = page.read_bytes(), readme.read_bytes()
    with pytest.raises(SystemExit) as refused:
        compare_table.render(page, readme)
    message = str(refused.value.code)
    assert str(bad) in message and named in message, message
    assert (page.read_bytes(), readme.read_bytes()) == before


def test_a_comparison_without_a_cascade_and_shared_pair_is_said_to_be_left_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    real = json.loads((PER_NETWORK / "results.json").read_text())
    _keep(tmp_path / "compare", "per-network", real, [1.0])
    _keep(tmp_path / "compare", "trunks", [real[1] | {"trunk": "resnet50"}], [1.0])  # shared mode only
    summary = compare_table.readme_summary()
    assert "| per-network |" in summary and "trunks" not in summary
    assert "trunks is on the results page, not in the README's summary" in capsys.readouterr().err


def test_render_refuses_an_end_marker_before_the_start_marker(tmp_path, monkeypatch):
    page, readme = _pages(tmp_path)
    text = readme.read_text()
    start, end = "<!-- compare-summary:start -->", "<!-- compare-summary:end -->"
    readme.write_text(text.replace(start, "@@").replace(end, start).replace("@@", end))  # swapped
    before = page.read_bytes(), readme.read_bytes()
    with pytest.raises(SystemExit, match="compare-summary:start"):
        compare_table.render(page, readme)
    assert (page.read_bytes(), readme.read_bytes()) == before


def test_variants_scored_ahead_of_a_sweep_are_kept_then_named_in_its_note(tmp_path, monkeypatch):
    """`pending` keeps the variants a CPU scored while their sweep waited for a GPU (copied by
    scripts/gpu-compare.sh into the sweep's folder); `keep` of that sweep names them and their
    machine in the note, and empties the pending folder."""
    monkeypatch.setattr(compare_table, "OUT", tmp_path / "compare")
    monkeypatch.setattr(compare_table, "FIGURES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    cpu = {
        "cpu": "Intel(R) Xeon(R) Processor",
        "cores": 2,
        "isa": "AVX512",
        "amx": True,
        "torch": "2",
        "gpu": None,
    }
    monkeypatch.setattr(compare_table, "_this_machine", lambda: cpu)
    folder = _finished_compare_folder(tmp_path)  # the whole sweep, as the GPU finished it
    part = tmp_path / "part"  # two of its variants, scored here before
    for variant in ("shared-reference-seed0", "shared-reference-seed1"):
        shutil.copytree(folder / "variants" / variant, part / "variants" / variant)
    (part / "variants" / "shared-reference-seed2").mkdir()  # unscored: not kept
    kept = compare_table.pending("curves", part, "python cli.py compare --modes shared")
    assert sorted(p.name for p in (kept / "variants").iterdir()) == [
        "shared-reference-seed0",
        "shared-reference-seed1",
    ]
    assert sorted(p.name for p in (kept / "variants" / "shared-reference-seed0").iterdir()) == sorted(
        compare_table.VARIANT_FILES
    )
    (run,) = json.loads((kept / "machine.json").read_text())
    assert run["machine"] == "Intel(R) Xeon(R) Processor, 2 cores, ISA AVX512, AMX True"
    assert run["variants"] == ["shared-reference-seed0", "shared-reference-seed1"]
    with pytest.raises(SystemExit, match="no scored variant"):
        compare_table.pending("curves", tmp_path / "empty", "python cli.py compare")
    with pytest.raises(SystemExit, match="'curve': one of scripts/gpu-compare.sh's"):
        compare_table.pending("curve", part, "python cli.py compare")  # a typo: not parked unseen
    script = (ROOT / "scripts" / "gpu-compare.sh").read_text()
    assert all(f"    {sweep}) echo" in script for sweep in compare_table.SWEEPS)  # the script's sweeps
    shutil.copytree(folder / "variants" / "shared-reference-seed2", kept / "variants" / "other-seed0")

    compare_table.keep("curves", folder, "python cli.py compare (scripts/gpu-compare.sh)")
    about = json.loads((tmp_path / "compare" / "curves" / "about.json").read_text())
    assert about["machine"] == "a CPU, 2 cores, ISA AVX2, AMX False"  # the sweep's own machine.json
    assert about["note"] == (
        "2 of its variants (shared-reference seeds 0, 1) were trained and scored before "
        "it, on Intel(R) Xeon(R) Processor, 2 cores, ISA AVX512, AMX True, by `python cli.py compare "
        f"--modes shared`, {run['date']}"
    )
    # what the kept comparison holds is gone from pending; a variant it does not hold stays
    assert [p.name for p in (kept / "variants").iterdir()] == ["other-seed0"]
