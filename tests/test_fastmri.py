"""fastMRI+ annotations and fastMRI .h5 volumes become a data folder the package trains on."""

import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mtl_meniscus.cli import app
from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.errors import DataError
from mtl_meniscus.io.imageio import read_image

HEADER = "file,slice,study_level,x,y,width,height,label\n"


@pytest.fixture
def fastmri(tmp_path) -> Path:
    """Two 4-slice 32x32 volumes in fastMRI's .h5 form and a knee.csv: a tear box on slice 2 of
    the first (plus a box of another finding), a study-level row, the second only a cartilage box."""
    rng = np.random.default_rng(0)
    (tmp_path / "h5").mkdir()
    for name in ("file1000001", "file1000002"):
        with h5py.File(tmp_path / "h5" / f"{name}.h5", "w") as handle:
            handle["reconstruction_rss"] = rng.random((4, 32, 32)).astype(np.float32)
            handle["kspace"] = np.zeros((4, 2, 2), np.complex64)
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
    with h5py.File(fastmri / "h5" / "file1000001.h5") as handle:
        np.testing.assert_array_equal(
            read_image(tmp_path / "out" / "volumes" / "file1000001.h5", 2), handle["reconstruction_rss"][2]
        )
    # all slices of one knee in one split
    by_patient = {}
    for record, split in zip(data.records, data.splits):
        by_patient.setdefault(record.patient_id, set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())


def test_bad_annotations_and_missing_images_are_named(fastmri, tmp_path):
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    (fastmri / "bad.csv").write_text(HEADER + "file1000001,two,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="row 2, column 'slice': bad value 'two'"):
        import_fastmri_plus(fastmri / "bad.csv", fastmri / "h5", tmp_path / "a")
    (fastmri / "beyond.csv").write_text(HEADER + "file1000001,9,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="on slice 9, but .* has 4 slices"):
        import_fastmri_plus(fastmri / "beyond.csv", fastmri / "h5", tmp_path / "c")
    (fastmri / "other.csv").write_text(HEADER + "file9,1,No,5,6,10,4,Meniscus Tear\n")
    with pytest.raises(DataError, match="none of the 1 annotated volumes"):
        import_fastmri_plus(fastmri / "other.csv", fastmri / "h5", tmp_path / "b")
    with h5py.File(fastmri / "h5" / "kspace_only.h5", "w") as handle:
        handle["kspace"] = np.zeros((2, 2, 2), np.complex64)
    with pytest.raises(Exception, match="reconstruction_rss or reconstruction_esc"):
        read_image(fastmri / "h5" / "kspace_only.h5", 0)


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
