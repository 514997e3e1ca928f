"""fastMRI+ annotations and fastMRI .h5 volumes become a data folder the package trains on."""

import csv
import stat
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mtl_meniscus.cli import app
from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.errors import DataError, ImageReadError
from mtl_meniscus.io.imageio import read_image

HEADER = "file,slice,study_level,x,y,width,height,label\n"


def write_volume(path: Path, rng: np.random.Generator) -> None:
    """A 4-slice 32x32 volume in fastMRI's .h5 form."""
    with h5py.File(path, "w") as handle:
        handle["reconstruction_rss"] = rng.random((4, 32, 32)).astype(np.float32)
        handle["kspace"] = np.zeros((4, 2, 2), np.complex64)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def fastmri(tmp_path) -> Path:
    """Two 4-slice 32x32 volumes in fastMRI's .h5 form and a knee.csv: a tear box on slice 2 of
    the first (plus a box of another finding), a study-level row, the second only a cartilage box."""
    rng = np.random.default_rng(0)
    (tmp_path / "h5").mkdir()
    for name in ("file1000001", "file1000002"):
        write_volume(tmp_path / "h5" / f"{name}.h5", rng)
    (tmp_path / "knee.csv").write_text(
        HEADER
        + "file1000001,2,No,5,6,10,4,Meniscus Tear\n"
        + "file1000001,1,No,0,0,8,8,Cartilage - Partial Thickness loss/defect\n"
        + "file1000001,,Yes,,,,,Joint Effusion\n"
        + "file1000002,3,No,1,1,4,4,Cartilage - Partial Thickness loss/defect\n"
    )
    return tmp_path


def test_an_import_gives_a_row_per_slice_and_tear_masks(fastmri, tmp_path):
    result = CliRunner().invoke(
        app, ["import-fastmri", str(fastmri / "knee.csv"), str(fastmri / "h5"), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "allow_unknown_subtype" in result.output
    with (tmp_path / "out" / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8  # 2 volumes x 4 slices
    tears = [(r["patient_id"], r["slice"]) for r in rows if r["fissure"] == "1"]
    assert tears == [("file1000001", "2")]  # only the Meniscus Tear box counts
    mask = cv2.imread(str(tmp_path / "out" / rows[2]["mask"]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (32, 32) and (mask == 2).sum() == 10 * 4 and mask[6:10, 5:15].min() == 2
    # the package reads it: slices straight from the .h5, unknown subtypes masked
    data = prepare_data(tmp_path / "out", DataConfig(image_size=32, allow_unknown_subtype=True))
    assert len(data.records) == 8 and "1 orientation, 1 position" in data.exclusion_summary()
    with h5py.File(fastmri / "h5" / "file1000001.h5") as handle:  # flipped up/down: see the next test
        np.testing.assert_array_equal(
            read_image(tmp_path / "out" / "volumes" / "file1000001.h5", 2),
            handle["reconstruction_rss"][2][::-1],
        )
    # all slices of one knee in one split
    by_patient = {}
    for record, split in zip(data.records, data.splits):
        by_patient.setdefault(record.patient_id, set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())


def test_bad_annotations_and_missing_images_are_named(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    with pytest.raises(
        DataError, match=r"h5: a folder \(expected the fastMRI\+ knee annotations, knee.csv\)"
    ):
        import_fastmri_plus(
            fastmri / "h5", fastmri / "knee.csv", tmp_path / "f"
        )  # the two the other way round
    (fastmri / "bad.csv").write_text(HEADER + "file1000001,two,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="row 2, column 'slice': bad value 'two'"):
        import_fastmri_plus(fastmri / "bad.csv", fastmri / "h5", tmp_path / "a")
    (fastmri / "short.csv").write_text(HEADER + "file1000001,2,No,5,6,10,4\n")  # no label
    with pytest.raises(DataError, match="row 2, column 'label': empty"):
        import_fastmri_plus(fastmri / "short.csv", fastmri / "h5", tmp_path / "d")
    (fastmri / "beyond.csv").write_text(HEADER + "file1000001,9,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="on slice 9, but .* has 4 slices"):
        import_fastmri_plus(fastmri / "beyond.csv", fastmri / "h5", tmp_path / "c")
    (fastmri / "header.csv").write_text(HEADER)
    with pytest.raises(DataError, match="header.csv: no annotation rows, only the header$"):
        import_fastmri_plus(fastmri / "header.csv", fastmri / "h5", tmp_path / "g")
    (fastmri / "other.csv").write_text(HEADER + "file9,1,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="none of the 1 annotated volumes"):
        import_fastmri_plus(fastmri / "other.csv", fastmri / "h5", tmp_path / "b")
    with h5py.File(fastmri / "h5" / "kspace_only.h5", "w") as handle:
        handle["kspace"] = np.zeros((2, 2, 2), np.complex64)
    with pytest.raises(Exception, match="reconstruction_rss or reconstruction_esc"):
        read_image(fastmri / "h5" / "kspace_only.h5", 0)
    # a group where the reconstruction should be (AttributeError: 'Group' object has no 'shape' before)
    with h5py.File(fastmri / "h5" / "file5.h5", "w") as handle:
        handle.create_group("reconstruction_rss")
    (fastmri / "group.csv").write_text(HEADER + "file5,1,No,1,1,2,2,Meniscus Tear\n")
    with pytest.raises(DataError, match="file5.h5: no reconstruction_rss or reconstruction_esc dataset"):
        import_fastmri_plus(fastmri / "group.csv", fastmri / "h5", tmp_path / "e")
    with pytest.raises(ImageReadError, match="no reconstruction_rss or reconstruction_esc dataset"):
        read_image(fastmri / "h5" / "file5.h5", 0)
    with h5py.File(fastmri / "h5" / "complex.h5", "w") as handle:  # its imaginary part was dropped
        handle["reconstruction_rss"] = np.ones((2, 4, 4), np.complex64)
    with pytest.raises(ImageReadError, match="expected real numbers, got dtype complex64"):
        read_image(fastmri / "h5" / "complex.h5", 0)


def test_other_meniscus_findings_are_named_in_the_summary(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    rows = "file1000001,2,No,5,6,10,4,Meniscus Tear\nfile1000001,1,No,5,6,10,4,Meniscal Tear\n"
    (fastmri / "near.csv").write_text(HEADER + rows + "file1000001,3,No,5,6,10,4,Bone Contusion\n")
    counts = import_fastmri_plus(fastmri / "near.csv", fastmri / "h5", tmp_path / "out")
    assert counts["tear slices"] == 1  # slice 1's "Meniscal Tear" is not read as a tear ...
    assert (
        counts["rows of other meniscus findings, not read as tears ('Meniscal Tear')"] == 1
    )  # ... but named


def test_an_import_counts_its_volumes_for_a_progress_display(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "two.csv").write_text(
        (fastmri / "knee.csv").read_text() + "file9,1,No,5,6,10,4,Meniscus Tear\n"  # not in h5/
    )
    seen = []
    counts = import_fastmri_plus(
        fastmri / "two.csv", fastmri / "h5", tmp_path / "out", on_volume=lambda *done: seen.append(done)
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]  # every annotated volume, found or not
    assert counts == {"slices": 8, "tear slices": 1, "volumes": 2, "annotated volumes not found": 1}


STUDY_LEVEL_ONLY = "volumes with a study-level meniscus tear only (left out, listed in left_out.csv)"


def test_a_tear_known_only_at_study_level_leaves_its_volume_out(fastmri, tmp_path):
    """file1000002 has a tear somewhere (a study-level row) but no tear box: not 4 healthy slices.
    file1000001's study-level tear row adds nothing to its box on slice 2; file1000003's study-level
    row of another finding says nothing about tears: its slices are imported as before."""
    write_volume(fastmri / "h5" / "file1000003.h5", np.random.default_rng(1))
    (fastmri / "study.csv").write_text(
        (fastmri / "knee.csv").read_text()
        + "file1000002,,yes,,,,,MENISCUS TEAR\n"  # row 6 (study_level and label in other cases)
        + "file1000001,,Yes,,,,,Meniscus Tear\n"  # row 7
        + "file1000003,,Yes,,,,,Joint Effusion\n"  # row 8
    )
    result = CliRunner().invoke(
        app, ["import-fastmri", str(fastmri / "study.csv"), str(fastmri / "h5"), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())  # the console wraps long lines
    assert "slices: 8, tear slices: 1, volumes: 2, " + STUDY_LEVEL_ONLY + ": 1" in summary

    rows = read_csv(tmp_path / "out" / "labels.csv")
    assert [(r["patient_id"], r["slice"], r["fissure"]) for r in rows] == [
        ("file1000001", "0", "0"),
        ("file1000001", "1", "0"),
        ("file1000001", "2", "1"),
        ("file1000001", "3", "0"),
        ("file1000003", "0", "0"),
        ("file1000003", "1", "0"),
        ("file1000003", "2", "0"),
        ("file1000003", "3", "0"),
    ]
    assert not (tmp_path / "out" / "volumes" / "file1000002.h5").exists()
    left_out = read_csv(tmp_path / "out" / "left_out.csv")
    assert [r["file"] for r in left_out] == ["file1000002"]
    assert "study.csv row 6: a Meniscus Tear at study level only" in left_out[0]["reason"]
    # the extra file does not disturb reading the folder
    data = prepare_data(tmp_path / "out", DataConfig(image_size=32, allow_unknown_subtype=True))
    assert len(data.records) == 8


def test_left_out_csv_names_volumes_not_found_and_those_with_a_study_level_tear_only(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "study.csv").write_text(
        HEADER
        + "file1000001,2,No,5,6,10,4,Meniscus Tear\n"
        + "file1000002,,Yes,,,,,Meniscus Tear\n"  # row 3
        + "file1000002,,Yes,,,,,Meniscus Tear\n"  # row 4: a second reader's copy
        + "file9,1,No,5,6,10,4,Meniscus Tear\n"  # not in h5/
    )
    counts = import_fastmri_plus(fastmri / "study.csv", fastmri / "h5", tmp_path / "out")
    assert counts == {
        "slices": 4,
        "tear slices": 1,
        "volumes": 1,
        "annotated volumes not found": 1,
        STUDY_LEVEL_ONLY: 1,
    }
    left_out = {r["file"]: r["reason"] for r in read_csv(tmp_path / "out" / "left_out.csv")}
    assert left_out.keys() == {"file9", "file1000002"}
    assert left_out["file9"] == f"not in {fastmri / 'h5'}"
    assert "study.csv rows 3, 4: a Meniscus Tear at study level only" in left_out["file1000002"]


def test_an_import_of_study_level_tears_only_is_refused_and_says_why(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "study.csv").write_text(
        HEADER
        + "file1000001,,Yes,,,,,Meniscus Tear\n"
        + "file1000002,,Yes,,,,,Meniscus Tear\n"
        + "file1000002,3,No,1,1,4,4,Cartilage - Partial Thickness loss/defect\n"
    )
    with pytest.raises(
        DataError, match=r"study.csv: every annotated volume found in .*h5 \(file1000001, file1000002\)"
    ):
        import_fastmri_plus(fastmri / "study.csv", fastmri / "h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a refused import leaves nothing behind


def test_an_import_that_leaves_no_volume_out_writes_no_left_out_csv(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    import_fastmri_plus(fastmri / "knee.csv", fastmri / "h5", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.csv", "masks", "volumes"]


def test_an_import_keeps_the_output_folders_mode(fastmri, tmp_path):
    """The import's temporary folder (0700, mkdtemp's) took OUT's place: a folder the group could
    read became its owner's alone. OUT made by the user keeps its mode; one made by the import gets
    mkdir's (the umask's)."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o2775)
    import_fastmri_plus(fastmri / "knee.csv", fastmri / "h5", tmp_path / "shared")
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o2775
    (tmp_path / "plain").mkdir()  # as mkdir makes it here, under this process's umask
    import_fastmri_plus(fastmri / "knee.csv", fastmri / "h5", tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_an_unknown_study_level_is_named_and_unannotated_volumes_are_counted(fastmri, tmp_path):
    """study_level 'Y' was read as a box row (not 'Yes'); .h5 files without an annotation row are
    left out, as the module says, and now counted in the summary."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "odd.csv").write_text(HEADER + "file1000001,,Y,,,,,Meniscus Tear\n")
    with pytest.raises(DataError, match="row 2, column 'study_level': 'Y' is neither Yes nor No"):
        import_fastmri_plus(fastmri / "odd.csv", fastmri / "h5", tmp_path / "a")
    write_volume(fastmri / "h5" / "file1000003.h5", np.random.default_rng(1))  # no row in knee.csv
    counts = import_fastmri_plus(fastmri / "knee.csv", fastmri / "h5", tmp_path / "b")
    assert counts["volumes"] == 2
    assert counts["volumes in the folder without an annotation row (left out)"] == 1


def test_a_tear_box_lies_where_fastmri_plus_drew_it(tmp_path):
    """fastMRI+ drew its boxes on the arrays flipped up/down (its README; its example notebook does
    img_data[:, ::-1, :] before drawing box (x, y, w, h)): the mask must cover those pixels of the
    slice as the package reads it, stored rows H-y-h .. H-y-1, not stored rows y .. y+h-1."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (tmp_path / "h5").mkdir()
    stored = np.tile(np.arange(64, dtype=np.float32)[:, None], (3, 1, 64))  # stored row r holds r
    with h5py.File(tmp_path / "h5" / "file1000009.h5", "w") as handle:
        handle["reconstruction_rss"] = stored
    (tmp_path / "knee.csv").write_text(HEADER + "file1000009,1,No,10,20,8,6,Meniscus Tear\n")
    import_fastmri_plus(tmp_path / "knee.csv", tmp_path / "h5", tmp_path / "out")
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "file1000009_001.png"), cv2.IMREAD_UNCHANGED)
    image = read_image(tmp_path / "out" / "volumes" / "file1000009.h5", 1)
    notebook_view = stored[1][::-1]  # the notebook's image, on which the box is (x, y, w, h) as given
    np.testing.assert_array_equal(image, notebook_view)
    assert sorted(set(image[mask == 2].tolist())) == list(range(64 - 20 - 6, 64 - 20))  # stored rows 38..43


def test_a_volume_named_with_and_without_its_suffix_is_one_volume(fastmri, tmp_path):
    """file1000001 and file1000001.h5 in knee.csv: the volume was linked twice ('File exists')."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    rows = "file1000001,2,No,5,6,10,4,Meniscus Tear\nfile1000001.h5,3,No,5,6,10,4,Meniscus Tear\n"
    (fastmri / "both.csv").write_text(HEADER + rows)
    counts = import_fastmri_plus(fastmri / "both.csv", fastmri / "h5", tmp_path / "out")
    assert counts["volumes"] == 1 and counts["tear slices"] == 2


def test_reviewed_volumes_without_findings_are_imported_healthy(fastmri, tmp_path):
    """fastMRI+'s knee_file_list.csv lists the reviewed volumes; one listed without an annotation
    row had no findings (its README), so its slices are fissure 0. A listed volume missing from the
    folder and the list's 'Knee data' line are counted, not imported."""
    write_volume(fastmri / "h5" / "file1000003.h5", np.random.default_rng(1))  # reviewed, no row
    write_volume(fastmri / "h5" / "file1000004.h5", np.random.default_rng(2))  # never reviewed
    (fastmri / "list.csv").write_text("file1000001\nfile1000003\nfile1000005\nKnee data\n")
    result = CliRunner().invoke(
        app,
        ["import-fastmri", str(fastmri / "knee.csv"), str(fastmri / "h5"), str(tmp_path / "out")]
        + ["--reviewed", str(fastmri / "list.csv")],
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "labels.csv")
    healthy = [r for r in rows if r["patient_id"] == "file1000003"]
    assert [(r["slice"], r["fissure"], r["mask"]) for r in healthy] == [(str(k), "0", "") for k in range(4)]
    assert "file1000004" not in {r["patient_id"] for r in rows}
    assert "reviewed volumes without findings (fissure 0 on every slice): 1" in result.output
    assert "volumes in the folder without an annotation row (left out): 1" in result.output
    assert "naming no volume ('Knee data')" in result.output
    missing = CliRunner().invoke(
        app,
        [
            "import-fastmri",
            str(fastmri / "knee.csv"),
            str(fastmri / "h5"),
            str(tmp_path / "b"),
            "--reviewed",
            str(tmp_path / "none.csv"),
        ],
    )
    assert (
        missing.exit_code == 1 and "none.csv: not found" in missing.output and not (tmp_path / "b").exists()
    )


def test_a_torn_volume_written_another_way_is_never_imported_healthy(fastmri, tmp_path):
    """knee.csv naming a reviewed volume with a folder or an upper-case suffix: its tear boxes were
    not found under that name, and the reviewed list then imported it as a volume without findings,
    fissure 0 on its torn slices."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "list.csv").write_text("file1000001\nfile1000002\n")
    # the upper-case suffix is the volume, its tear on slice 2; under a folder it is not found where
    # knee.csv says: left out (left_out.csv), not imported healthy
    for spelt, torn_slices in (("file1000001.H5", ["2"]), ("knee_singlecoil_train/file1000001.h5", [])):
        (fastmri / "spelt.csv").write_text(HEADER + f"{spelt},2,No,5,6,10,4,Meniscus Tear\n")
        out = tmp_path / spelt.replace("/", "_")
        import_fastmri_plus(fastmri / "spelt.csv", fastmri / "h5", out, reviewed=fastmri / "list.csv")
        rows = [r for r in read_csv(out / "labels.csv") if r["patient_id"] == "file1000001"]
        assert [r["slice"] for r in rows if r["fissure"] == "1"] == torn_slices, spelt
        assert not rows or len(rows) == 4, spelt
        assert torn_slices or not rows, spelt


def test_knee_csv_rows_are_named_by_their_line_and_extra_values_refused(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import read_annotations

    (fastmri / "lines.csv").write_text(
        " file,slice,study_level,x,y,width,height,label\n"  # a space before a name: still the column
        "file1000001,2,No,5,6,10,4,Meniscus Tear\n"
        "\n"  # line 3: blank
        "file1000001,x,No,5,6,10,4,Meniscus Tear\n"  # line 4: a bad slice
        "file1000001,2,No,5,6,10,4,Meniscus Tear, complex\n"  # line 5: a comma too many
    )
    with pytest.raises(DataError) as info:
        read_annotations(fastmri / "lines.csv")
    assert info.value.problems == [
        "row 4, column 'slice': bad value 'x' (a whole number >= 0)",
        "row 5: 9 values, but the header has 8 columns (an unquoted comma inside a value?)",
    ]


def test_a_tear_mask_that_cannot_be_written_fails_the_import(fastmri, tmp_path, monkeypatch):
    """OpenCV answers a failed write with False: the import reported success and labels.csv named
    a mask that was not there."""
    import cv2

    from mtl_meniscus.data.fastmri import import_fastmri_plus

    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)
    with pytest.raises(DataError, match=r"masks/file1000001_002.png: could not be written"):
        import_fastmri_plus(fastmri / "knee.csv", fastmri / "h5", tmp_path / "out")
    assert not (tmp_path / "out" / "labels.csv").exists()
