"""A run's splits.csv (data/records.py: read_saved_splits): the record of which image was in which
split. A damaged one is named with what is wrong, never read as 'every image added since the run'
with an empty test split."""

import pytest
from support import _clean, _copy_run, app, runner

from mtl_meniscus.data.records import read_saved_splits
from mtl_meniscus.errors import DataError

HEADER = "image,slice,split,fissure,orientation,position,patient_id\n"


def _splits(tmp_path, text):
    path = tmp_path / "splits.csv"
    path.write_text(text)
    return path


def test_a_valid_splits_csv_is_read_old_ones_without_slices_too(tmp_path):
    path = _splits(tmp_path, HEADER + "a.png,,train,1,vertical,posterior,P1\nv.nii,3,unused,0,,,P2\n")
    assert {key: row["split"] for key, row in read_saved_splits(path).items()} == {
        ("a.png", None): "train",
        ("v.nii", 3): "unused",  # a training image left out by data.train_fraction
    }
    old = _splits(tmp_path, "image,split,fissure\na.png,test,0\n")  # before the slice column
    assert read_saved_splits(old)[("a.png", None)]["split"] == "test"


@pytest.mark.parametrize(
    "text,missing,header",
    [
        ("x,y\n", "'image' or 'split'", "x, y"),
        ("image,slice\na.png,\n", "'split'", "image, slice"),
        ("", "'image' or 'split'", "none, the file is empty"),
    ],
)
def test_a_splits_csv_without_its_columns_is_named(tmp_path, text, missing, header):
    path = _splits(tmp_path, text)
    with pytest.raises(DataError) as err:
        read_saved_splits(path)
    assert str(err.value) == (
        f"{path}: damaged, not a splits file of this package: no column {missing} (its header: "
        f"{header}; a run's splits.csv has image, slice, split, its tasks and patient_id)"
    )


def test_every_bad_row_of_a_splits_csv_is_named(tmp_path):
    rows = [
        "a.png,,train,0,,,",
        "b.png,,tset,0,,,",  # a split of no name
        "a.png,,test,0,,,",  # listed twice: the dict would keep only the last split
        "v.nii,2,val,0,,,",
        "v.nii,2,val,0,,,",
        "v.nii,two,val,0,,,",
        ",,train,0,,,",
        "c.png,,train",  # cut short
    ]
    path = _splits(tmp_path, HEADER + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_saved_splits(path)
    assert err.value.problems == [
        "row 3, column 'split': bad value 'tset' (allowed: train, val, test, unused)",
        "row 4: a.png listed again (first on row 2)",
        "row 6: v.nii, slice 2 listed again (first on row 5)",
        "row 7, column 'slice': bad value 'two' (allowed: a slice number, or empty for a 2D image)",
        "row 8, column 'image': empty",
        "row 9: not 7 values, one per column of the header",
    ]
    assert str(err.value).startswith(f"{path}: damaged, 6 problem(s) (restore the run's splits.csv")
    with pytest.raises(DataError, match="no image listed"):
        read_saved_splits(_splits(tmp_path, HEADER))


def test_evaluate_and_resume_name_a_damaged_splits_csv(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    (run / "splits.csv").write_text("x,y\n")  # the tester's file
    result = runner.invoke(app, ["evaluate", str(run), "--device", "cpu", "--bootstrap", "0", "--tta", "0"])
    _clean(result)
    assert result.exit_code == 1 and "splits.csv: damaged" in result.output
    assert "no column 'image' or 'split'" in result.output
    assert "added since" not in result.output and "is empty" not in result.output
    lines = (run64 / "splits.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",test,", ",tset,").replace(",train,", ",tset,").replace(",val,", ",tset,")
    (run / "splits.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "row 2, column 'split': bad value 'tset'" in result.output


def test_splits_csv_is_utf8_whatever_the_locale(tmp_path):
    """A patient 'Müller' in a locale whose default encoding is not UTF-8 (Windows' cp1252, or
    ASCII as here): splits.csv was written in that encoding (here: not at all) and read back so,
    and a run moved to another machine could not be evaluated."""
    import os
    import subprocess
    import sys

    from support import _png

    for name in ("a.png", "b.png"):
        _png(tmp_path / "data" / name)
    (tmp_path / "data" / "labels.csv").write_text(
        "image,fissure,orientation,position,patient_id\na.png,0,,,Müller\nb.png,1,vertical,posterior,Ösa\n",
        encoding="utf-8",
    )
    script = (
        "import sys; from mtl_meniscus.config import DataConfig; from mtl_meniscus.data.load import prepare_data\n"
        "from mtl_meniscus.data.records import read_saved_splits\n"
        "data = prepare_data(sys.argv[1], DataConfig(image_size=64))\n"
        "data.write_splits(sys.argv[2])\n"
        "print(sorted(read_saved_splits(sys.argv[2])))\n"
    )
    ascii_locale = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data"), str(tmp_path / "splits.csv")],
        env=ascii_locale,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('a.png', None), ('b.png', None)]"
    assert "Müller" in (tmp_path / "splits.csv").read_text(encoding="utf-8")
