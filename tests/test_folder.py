"""The labels.csv reader (data/folder.py): every bad row reported at once, paths kept inside the data
folder and normalised, duplicates found by file, exclusions with their reasons, and splits."""

import csv
from collections import Counter

import cv2
import numpy as np
import pytest
from support import TINY, _labels, _png, _quiet, app, runner

from mtl_meniscus.config import DataConfig, load_config
from mtl_meniscus.data.folder import read_labels
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import DataError
from mtl_meniscus.labels import DEFAULT_TASKS


def _write_folder(folder, rows, header=("image", "fissure", "orientation", "position"), size=(32, 32)):
    """labels.csv with the given rows; every image named in a row is created as a 16-bit PNG."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for row in rows:
        path = folder / row[0]
        if row[0] and not path.exists() and not row[0].startswith("img/missing"):
            cv2.imwrite(str(path), rng.integers(0, 4000, size).astype(np.uint16))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return folder


def test_valid_rows_parse(tmp_path):
    _write_folder(tmp_path, [("img/a.png", "0", "", ""), ("img/b.png", "1", "Horizontal", "posterior")])
    records = read_labels(tmp_path)
    assert [r.row for r in records] == [2, 3]
    assert records[1].labels == {"fissure": "1", "orientation": "horizontal", "position": "posterior"}
    np.testing.assert_array_equal(records[1].targets(DEFAULT_TASKS), [1.0, 1.0, 0.0])  # case-insensitive
    assert records[0].labels["fissure"] == "0" and np.isnan(records[0].targets(DEFAULT_TASKS)[1:]).all()


def test_every_bad_row_is_reported_at_once(tmp_path):
    rows = [
        ("img/ok.png", "1", "vertical", "anterior"),
        ("img/a.png", "2", "", ""),  # row 3: fissure not 0/1
        ("img/b.png", "0", "horizontal", ""),  # row 4: orientation on a non-tear
        ("img/c.png", "0", "", "posterior"),  # row 5: position on a non-tear
        ("img/d.png", "1", "", "posterior"),  # row 6: tear without orientation
        ("img/e.png", "1", "vertical", ""),  # row 7: tear without position
        ("img/f.png", "1", "oblique", "posterior"),  # row 8: unknown orientation
        ("img/g.png", "1", "vertical", "middle"),  # row 9: unknown position
        ("img/missing.png", "0", "", ""),  # row 10: missing file
        ("", "0", "", ""),  # row 11: no image
        ("img/ok.png", "1", "vertical", "anterior"),  # row 12: duplicate
        ("img", "0", "", ""),  # row 13: a folder
    ]
    _write_folder(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    message = str(info.value)
    assert "11 problem(s)" in message
    for expected in [
        "row 3, column 'fissure': bad value '2' (allowed: 0, 1)",
        "row 4, column 'orientation': bad value 'horizontal' (must be empty when fissure is 0)",
        "row 5, column 'position': bad value 'posterior' (must be empty when fissure is 0)",
        "row 6, column 'orientation': bad value '' (a tear needs one of: horizontal, vertical)",
        "row 7, column 'position': bad value '' (a tear needs one of: anterior, posterior, both)",
        "row 8, column 'orientation': bad value 'oblique'",
        "row 9, column 'position': bad value 'middle'",
        "row 10, column 'image': file not found",
        "row 11, column 'image'",
        "row 12: image 'img/ok.png' is listed twice (also row 2)",
        f"row 13, column 'image': a folder, not a file: {tmp_path / 'img'}",
    ]:
        assert expected in message, expected


def test_missing_columns_and_missing_csv(tmp_path):
    with pytest.raises(DataError, match="labels.csv: not found"):
        read_labels(tmp_path)
    _write_folder(tmp_path, [("img/a.png", "0")], header=("image", "fissure"))
    with pytest.raises(DataError, match="labels.csv is a file: give the data folder that holds labels.csv"):
        read_labels(tmp_path / "labels.csv")  # --data DIR/labels.csv
    _write_folder(tmp_path, [("img/a.png", "0")], header=("image", "fissure"))
    with pytest.raises(DataError, match="missing column\\(s\\) orientation, position"):
        read_labels(tmp_path)


def test_optional_columns_are_validated(tmp_path):
    header = ("image", "fissure", "orientation", "position", "split", "slice")
    _write_folder(tmp_path, [("img/a.png", "0", "", "", "holdout", "-1")], header=header)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert "column 'split': bad value 'holdout' (allowed: train, val, test, or empty on every row)" in str(
        info.value
    )
    assert "column 'slice': bad value '-1'" in str(info.value)
    for written in ("1_0", "٣", "3.0"):  # int() took the first two as 10 and 3
        _write_folder(tmp_path, [("img/a.png", "0", "", "", "", written)], header=header)
        with pytest.raises(DataError, match=f"column 'slice': bad value '{written}'"):
            read_labels(tmp_path)


def test_exclusions_report_and_summary(tmp_path):
    rows = [(f"img/n{i}.png", "0", "", "") for i in range(8)] + [
        ("img/t1.png", "1", "vertical", "posterior"),
        ("img/t2.png", "1", "horizontal", "posterior"),
        ("img/both.png", "1", "vertical", "both"),
        ("img/big.png", "0", "", ""),
        ("img/broken.png", "0", "", ""),
    ]
    _write_folder(tmp_path, rows)
    cv2.imwrite(str(tmp_path / "img/big.png"), np.zeros((40, 32), np.uint16))
    (tmp_path / "img/broken.png").write_bytes(b"garbage")
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    reasons = {image: reason for image, _, reason in data.exclusions}
    assert reasons["img/both.png"].startswith("double tear")
    assert reasons["img/big.png"] == "wrong size: 40x32, expected 32x32"
    assert reasons["img/broken.png"].startswith("unreadable:") and "broken.png" in reasons["img/broken.png"]
    assert len(data.records) == 10 and data.targets.shape == (10, 3)
    assert data.exclusion_summary() == (
        "kept 10 of 13 images; excluded 3 (1 double tear, 1 unreadable, 1 wrong size)"
    )
    data.write_exclusions(tmp_path / "out" / "exclusions.csv")
    with (tmp_path / "out" / "exclusions.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert {r["image"] for r in written} == {"img/both.png", "img/big.png", "img/broken.png"}

    resized = prepare_data(
        tmp_path, DataConfig(image_size=32, size_policy="resize", exclude_double_tears=False)
    )
    assert resized.resized == 1 and len(resized.records) == 12
    # big.png is 40x32: stretched to square, which changes its angles (and so the orientation
    # label's meaning), and said so
    assert resized.stretched == 1
    assert (
        "; resized 1 (1 not square: stretched to square, which changes angles)" in resized.exclusion_summary()
    )
    both = [r.image for r in resized.records].index("img/both.png")
    assert np.isnan(resized.targets[both, 2]) and resized.targets[both, 0] == 1  # no single position label
    assert all(image.shape == (32, 32) for image in resized.images)


def test_split_column_empty_everywhere_or_filled_everywhere(tmp_path):
    header = ("image", "fissure", "orientation", "position", "patient_id", "split", "slice")
    rows = [(f"img/{i}.png", "0", "", "", f"P{i}", "", "") for i in range(6)]
    _write_folder(tmp_path, rows, header=header)
    assert len(read_labels(tmp_path)) == 6  # the README's example: an empty split column is fine
    rows[0] = ("img/0.png", "0", "", "", "P0", "test", "")
    _write_folder(tmp_path, rows, header=header)
    with pytest.raises(DataError, match="'split' is filled on 1 of 6 rows"):
        read_labels(tmp_path)


def test_split_column_overrides_and_splits_file(tmp_path):
    header = ("image", "fissure", "orientation", "position", "split")
    rows = [(f"img/{i}.png", "0", "", "", ["train", "val", "test"][i % 3]) for i in range(9)]
    _write_folder(tmp_path, rows, header=header)
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    assert data.splits == ["train", "val", "test"] * 3
    data.write_splits(tmp_path / "splits.csv")
    assert (tmp_path / "splits.csv").read_text().splitlines()[1].startswith("img/0.png,,train,0")


def test_patient_groups_share_a_split(tmp_path):
    header = ("image", "fissure", "orientation", "position", "patient_id")
    rows = [(f"img/{i}.png", "0", "", "", f"P{i // 4}") for i in range(40)]
    _write_folder(tmp_path, rows, header=header)
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    by_patient = {}
    for record, split in zip(data.records, data.splits):
        assert by_patient.setdefault(record.patient_id, split) == split


def test_default_phantom_exclusions(small_phantom):
    data = prepare_data(small_phantom, DataConfig())
    reasons = Counter(reason.split(":")[0] for *_, reason in data.exclusions)
    assert reasons == {"wrong size": 1, "double tear": 1}
    assert all(image.shape == (256, 256) for image in data.images)
    assert Counter(data.splits) == {"train": 41, "val": 11, "test": 6}


def test_unknown_subtypes_are_masked_only_when_asked(tmp_path):
    """A tear with an empty orientation or position: an error by default (a forgotten label), a
    masked unknown with data.allow_unknown_subtype, counted in the summary line."""
    rows = [
        ("img/a.png", "1", "", ""),  # a tear, kind unknown
        ("img/b.png", "1", "horizontal", ""),  # orientation known, position unknown
        ("img/c.png", "0", "", ""),
        ("img/d.png", "1", "vertical", "anterior"),
    ]
    _write_folder(tmp_path, rows)
    with pytest.raises(DataError) as err:
        read_labels(tmp_path)
    assert "row 2, column 'orientation': bad value '' (a tear needs one of: horizontal, vertical)" in str(
        err.value
    )
    assert "data.allow_unknown_subtype: true" in str(err.value)

    data = prepare_data(
        tmp_path, DataConfig(image_size=32, allow_unknown_subtype=True, split_fractions=(1, 0, 0))
    )
    by_image = {r.image: data.targets[k] for k, r in enumerate(data.records)}
    np.testing.assert_array_equal(by_image["img/a.png"], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(by_image["img/b.png"], [1.0, 1.0, np.nan])
    assert "unknown (masked, not negative): 1 orientation, 2 position" in data.exclusion_summary()
    # unknown is not negative: the loss and the metrics leave those rows out
    import torch

    from mtl_meniscus.networks.losses import task_mask

    targets = torch.tensor(data.targets)
    assert task_mask(targets, "position").tolist() == [r.image == "img/d.png" for r in data.records]
    assert DEFAULT_TASKS.scored_rows(data.targets, "orientation").sum() == 2


def test_rows_of_one_volume_decode_it_once(tmp_path, monkeypatch):
    """labels.csv naming many slices of one volume: the file is decoded once, not once per row,
    and every row gets its own slice (a copy, so a kept slice does not keep the volume)."""
    import mtl_meniscus.io.imageio as imageio

    volume = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    np.save(tmp_path / "knee.npy", volume)
    np.save(tmp_path / "other.npy", volume[:2] * 2)
    rows = ["image,fissure,orientation,position,slice"]
    rows += [
        f"knee.npy,{k % 2},{'horizontal' if k % 2 else ''},{'posterior' if k % 2 else ''},{k}"
        for k in range(6)
    ]
    rows += ["other.npy,0,,,0", "other.npy,0,,,1"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    decoded = []
    read_npy = imageio._read_npy
    monkeypatch.setattr(
        imageio, "_read_npy", lambda path, limit: decoded.append(path.name) or read_npy(path, limit)
    )
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    assert decoded == ["knee.npy", "other.npy"]
    for k in range(6):
        np.testing.assert_array_equal(data.images[k], volume[k])
        assert data.images[k].base is None  # its own memory, not a view into the volume
    np.testing.assert_array_equal(data.images[7], volume[1] * 2)


def test_image_and_mask_paths_outside_the_data_folder_are_refused(tmp_path):
    outside = _png(tmp_path / "outside.png")
    data = tmp_path / "data"
    _png(data / "img" / "a.png")
    rows = [
        ("img/a.png", "0", "", "", ""),
        (str(outside), "0", "", "", ""),  # row 3: absolute path to a file that exists
        ("../outside.png", "1", "vertical", "posterior", ""),  # row 4
        ("img/../../outside.png", "0", "", "", ""),  # row 5
        ("/etc/passwd", "0", "", "", ""),  # row 6
        ("img/a.png", "0", "", "", "../outside.png"),  # row 7: mask outside (and a duplicate)
    ]
    _labels(data, rows, header=("image", "fissure", "orientation", "position", "mask"))
    with pytest.raises(DataError) as info:
        read_labels(data)
    message = str(info.value)
    for line in (3, 4, 5, 6):
        assert f"row {line}, column 'image': bad value" in message and "inside the data folder" in message
    assert "row 7, column 'mask': bad value '../outside.png'" in message
    assert "file not found" not in message  # nothing is said about which outside files exist
    assert "unsupported format" not in message


def test_symlinks_inside_the_data_folder_are_the_owners_choice(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "b.png")
    data = tmp_path / "data"
    _png(data / "img" / "a.png")
    (data / "img" / "b.png").symlink_to(outside)
    _labels(data, [("img/a.png", "0", "", ""), ("img/b.png", "0", "", "")])
    assert [r.image for r in read_labels(data)] == ["img/a.png", "img/b.png"]


def test_path_variants_of_one_image_are_duplicates(tmp_path):
    _png(tmp_path / "img" / "x.png")
    (tmp_path / "img" / "alias.png").symlink_to("x.png")
    rows = [
        ("img/x.png", "0", "", ""),
        ("img//x.png", "0", "", ""),  # row 3
        ("./img/x.png", "1", "vertical", "posterior"),  # row 4: a contradictory label
        ("img/alias.png", "0", "", ""),  # row 5: another name of the same file
    ]
    _labels(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    message = str(info.value)
    assert "row 3: image 'img//x.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    assert "row 4: image './img/x.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    assert (
        "row 5: image 'img/alias.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    )


def test_a_2d_image_with_no_slice_and_with_slice_0_is_listed_twice(tmp_path):
    """Slice 0 of a 2D image is the image: listed once without a slice and once with 0, it was two
    rows, a tear in one split and healthy in another."""
    _png(tmp_path / "img" / "x.png")
    _labels(
        tmp_path,
        [("img/x.png", "1", "horizontal", "posterior", ""), ("img/x.png", "0", "", "", "0")],
        header=("image", "fissure", "orientation", "position", "slice"),
    )
    with pytest.raises(DataError, match=r"row 3: image 'img/x.png' is listed twice \(also row 2\)"):
        read_labels(tmp_path)


def test_paths_are_normalised_in_the_records(tmp_path):
    _png(tmp_path / "img" / "x.png")
    _labels(tmp_path, [("./img//x.png", "0", "", "")])
    assert read_labels(tmp_path)[0].image == "img/x.png"


def test_a_duplicated_header_column_is_reported(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _labels(
        tmp_path,
        [("img/a.png", "0", "", "", "1")],
        header=("image", "fissure", "orientation", "position", "fissure"),
    )
    with pytest.raises(DataError, match="column\\(s\\) fissure appear more than once in the header"):
        read_labels(tmp_path)


def test_every_problem_is_written_to_a_file(tmp_path):
    rows = [(f"img/missing{k}.png", "0", "", "") for k in range(70)]
    _labels(tmp_path / "data", rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path / "data", report_dir=tmp_path / "run")
    message = str(info.value)
    assert "70 problem(s)" in message and "and 20 more: all 70 are listed in" in message
    report = (tmp_path / "run" / "labels_problems.txt").read_text().splitlines()
    assert sum("file not found" in line for line in report) == 70 and len(info.value.problems) == 70
    result = runner.invoke(
        app, ["train", "--config", str(TINY), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and str(tmp_path / "r" / "labels_problems.txt") in result.output
    for k in range(70):  # the data mended, the same command again: the old report is gone
        _png(tmp_path / "data" / "img" / f"missing{k}.png")
    result = runner.invoke(
        app, ["train", "--config", str(TINY), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]
    )
    assert "kept 70 of 70 images" in result.output and not (tmp_path / "r" / "labels_problems.txt").exists()


def test_all_images_excluded_for_their_size_says_why(data64, tmp_path):
    config = load_config(TINY, {"data.path": str(data64), "data.image_size": 128})
    with pytest.raises(DataError) as info:
        train_run(config, tmp_path / "r", console=_quiet())
    message = str(info.value)
    assert "wrong size (e.g." in message and "expected 128x128" in message
    assert "data.image_size" in message and "size_policy: resize" in message


def test_rows_sharing_a_patient_are_counted_as_patients(tmp_path):
    from mtl_meniscus.data.records import PreparedData, Record

    def record(row, patient):
        return Record(row=row, image=f"{row}.png", labels={"fissure": "0"}, patient_id=patient)

    shared = [record(2, "a"), record(3, "a"), record(4, "b"), record(5, "")]
    data = PreparedData(tmp_path, shared, [np.zeros((2, 2))] * 4, np.zeros((4, 1)), ["test"] * 4)
    assert data.patients([0, 1, 2, 3]) == ["a", "a", "b", "row 5"]
    assert data.unit_phrase([0, 1, 2, 3]) == "4 images of 3 patients"
    alone = PreparedData(
        tmp_path, [record(2, ""), record(3, "")], [np.zeros((2, 2))] * 2, np.zeros((2, 1)), ["test"] * 2
    )
    assert alone.patients([0, 1]) is None and alone.unit_phrase([0, 1]) == "2 images"


def test_reading_a_folder_reports_its_progress_row_by_row(tmp_path):
    from mtl_meniscus.phantom.slices import write_phantom

    write_phantom(tmp_path / "data", n=40, seed=2, size=64)
    seen = []
    data = prepare_data(
        tmp_path / "data", DataConfig(image_size=64), on_row=lambda done, total: seen.append((done, total))
    )
    assert seen == [(k, 40) for k in range(1, 41)] and data.n_rows == 40


# --- what labels.csv's reader must not pass over in silence ------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_rows_are_named_by_their_line_in_the_file(tmp_path, newline):
    """Blank lines and a quoted value over two lines count as an editor counts them: a message's
    row is the line the row starts on (the header is line 1)."""
    for name in "ab":
        _png(tmp_path / "img" / f"{name}.png")
    lines = [
        "image,fissure,orientation,position,notes",  # line 1
        "img/a.png,0,,,",  # line 2
        "",  # line 3: blank
        'img/b.png,0,,,"seen twice,',  # lines 4-5: one row, its note over two lines
        'by two readers"',
        "img/c.png,7,,,",  # line 6: a bad fissure (and no such file)
        "",  # line 7: blank
        "",  # line 8: blank
        "img/b.png,0,,,",  # line 9: a duplicate of line 4
    ]
    (tmp_path / "labels.csv").write_bytes(newline.join(lines).encode() + newline.encode())
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert info.value.problems == [
        "row 6, column 'image': file not found: " + str(tmp_path / "img" / "c.png"),
        "row 6, column 'fissure': bad value '7' (allowed: 0, 1)",
        "row 9: image 'img/b.png' is listed twice (also row 4)",
    ]
    # the valid rows keep their lines too (a mask's messages name record.row)
    (tmp_path / "labels.csv").write_text("\n".join(lines[:5]) + "\n")  # lines 1-5
    records = read_labels(tmp_path)
    assert [r.row for r in records] == [2, 4]


def test_a_row_with_more_values_than_the_header_is_named(tmp_path):
    """Values beyond the header would be dropped without a word (csv.DictReader's None key); empty
    ones (a trailing comma) lose nothing and pass."""
    for name in "abc":
        _png(tmp_path / "img" / f"{name}.png")
    lines = [
        "image,fissure,orientation,position",
        "img/a.png,0,,,",  # line 2: a trailing comma: fine
        "img/b.png,1,vertical,posterior,anterior",  # line 3: one value too many
        "img/c.png,0,,,x,y,z,w",  # line 4: four
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert info.value.problems == [
        "row 3: 5 values, but the header has 4 columns; after the last column ('position') no column "
        "takes 'anterior' (a comma too many, e.g. an unquoted comma inside a value, or a column name "
        "missing from the header)",
        "row 4: 8 values, but the header has 4 columns; after the last column ('position') no column "
        "takes 'x', 'y', 'z' and 1 more (a comma too many, e.g. an unquoted comma inside a value, or a "
        "column name missing from the header)",
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines[:2]) + "\n")
    assert [r.image for r in read_labels(tmp_path)] == ["img/a.png"]


@pytest.mark.parametrize(
    "column, known",
    [
        ("Split", "split"),
        ("Patient_ID", "patient_id"),
        ("patient id", "patient_id"),
        ("PatientID", "patient_id"),
        ("SLICE", "slice"),
        ("Mask", "mask"),
    ],
)
def test_a_column_named_like_a_known_one_is_refused(tmp_path, column, known):
    """A column that is a known one but for case, spaces or punctuation would be ignored (unknown columns are),
    and e.g. the automatic split used instead of the user's: refused, naming both names."""
    _png(tmp_path / "img" / "a.png")
    header = ("image", "fissure", "orientation", "position", "displaced", column)
    _labels(tmp_path, [("img/a.png", "0", "", "", "", "")], header=header)
    config = DataConfig(extra_tasks={"displaced": {"values": {"displaced": 1, "stable": 0}}})
    with pytest.raises(DataError) as info:
        read_labels(tmp_path, tasks=config.task_table())
    assert str(info.value) == (
        f"{tmp_path / 'labels.csv'}: column '{column}' differs from the column '{known}' only in "
        f"case, spaces or punctuation: rename it to '{known}' (column names are matched exactly, and "
        "an unknown column is not read)"
    )


def test_a_required_column_named_in_another_case_is_named_with_the_missing_one(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _labels(tmp_path, [("img/a.png", "0", "", "")], header=("image", "Fissure", "orientation", "position"))
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    message = str(info.value)
    assert "missing column(s) fissure; found image, Fissure, orientation, position" in message
    assert "column 'Fissure' differs from the column 'fissure' only in case, spaces or punctuation" in message
    # a data.extra_tasks column alike
    _labels(
        tmp_path,
        [("img/a.png", "0", "", "", "")],
        header=("image", "fissure", "orientation", "position", "Displaced"),
    )
    config = DataConfig(extra_tasks={"displaced": {"values": {"displaced": 1, "stable": 0}}})
    with pytest.raises(DataError, match="column 'Displaced' differs from the column 'displaced'"):
        read_labels(tmp_path, tasks=config.task_table())


def test_unknown_columns_and_spaces_around_names_are_still_fine(tmp_path):
    """A column the package does not know (notes, an export's own id) is ignored, as before; spaces
    around a known name are stripped, so ' split ' is the split column."""
    for k in range(3):
        _png(tmp_path / "img" / f"{k}.png")
    header = ("image", "fissure", "orientation", "position", " split ", "notes", "scanner_id", "patient_id")
    # PatientID beside patient_id is a column of its own (a PACS export's), not a misspelling of it
    header += ("PatientID",)
    rows = [
        (f"img/{k}.png", "0", "", "", split, "fine", "S1", f"P{k}", f"1.2.{k}")
        for k, split in enumerate(["test", "val", "train"])
    ]
    _labels(tmp_path, rows, header=header)
    assert [r.split for r in read_labels(tmp_path)] == ["test", "val", "train"]


def test_a_patient_in_two_splits_of_the_split_column_is_refused(tmp_path):
    """The split column puts patient P1 in train and test: their images would be trained on and
    scored. Named with its rows; rows without a patient_id are each their own patient."""
    header = ("image", "fissure", "orientation", "position", "patient_id", "split")
    plan = (
        [
            ("P1", "train"),  # line 2
            ("P1", "train"),  # line 3
            ("P2", "val"),  # line 4
            ("P1", "test"),  # line 5
            ("", "train"),  # line 6: no patient_id
            ("", "test"),  # line 7
            ("P2", "val"),  # line 8
        ]
        + [("P3", "train")] * 5
        + [("P3", "val")]
    )  # lines 9-13, 14
    rows = [(f"img/{k}.png", "0", "", "", patient, split) for k, (patient, split) in enumerate(plan)]
    _write_folder(tmp_path, rows, header=header)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert info.value.problems == [
        "patient_id 'P1' is in more than one split: train (rows 2, 3), test (row 5); a patient's rows "
        "must share one split, or images of a patient the model trained on are scored as unseen",
        "patient_id 'P3' is in more than one split: train (rows 9, 10, 11 and 2 more), val (row 14); a "
        "patient's rows must share one split, or images of a patient the model trained on are scored "
        "as unseen",
    ]
    # one split per patient: accepted, and the split column is the split
    plan = [(p, {"P1": "train", "P3": "train"}.get(p, s)) for p, s in plan]
    rows = [(f"img/{k}.png", "0", "", "", patient, split) for k, (patient, split) in enumerate(plan)]
    _write_folder(tmp_path, rows, header=header)
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    assert data.splits == [split for _, split in plan]


def test_a_patient_leak_is_reported_with_the_other_problems_of_the_file(tmp_path):
    header = ("image", "fissure", "orientation", "position", "patient_id", "split")
    rows = [("img/a.png", "0", "", "", "P1", "train"), ("img/b.png", "2", "", "", "P1", "val")]
    _write_folder(tmp_path, rows, header=header)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "row 3, column 'fissure'",
        "patient_id 'P1' is in more than one split",
    ]


def _mask(path, tear: bool):
    """A 32x32 label image: a meniscus band, and tear pixels on it when `tear`."""
    pixels = np.zeros((32, 32), np.uint8)
    pixels[20:24, 4:28] = 1
    if tear:
        pixels[21, 10:13] = 2
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), pixels)


def test_a_mask_with_a_tear_on_a_row_labelled_no_tear_is_refused(tmp_path):
    """Read as training data (model.segmentation), tear pixels on a fissure 0 row contradict the
    label: refused, per row. A tear row whose mask has no tear pixels (it outlines the meniscus
    only) is fine, and so is every mask when masks are not read."""
    header = ("image", "fissure", "orientation", "position", "mask")
    rows = [
        ("img/a.png", "0", "", "", "masks/a.png"),  # line 2: no tear, tear pixels: the contradiction
        ("img/b.png", "1", "vertical", "posterior", "masks/b.png"),  # tear, tear pixels
        ("img/c.png", "1", "horizontal", "posterior", "masks/c.png"),  # tear, meniscus only: fine
        ("img/d.png", "0", "", "", "masks/d.png"),  # no tear, meniscus only
        ("img/e.png", "0", "", "", ""),  # no mask
    ] + [(f"img/n{k}.png", "0", "", "", "") for k in range(5)]
    _write_folder(tmp_path, rows, header=header)
    for name, tear in {"a": True, "b": True, "c": False, "d": False}.items():
        _mask(tmp_path / "masks" / f"{name}.png", tear)
    config = DataConfig(image_size=32)
    with pytest.raises(DataError) as info:
        prepare_data(tmp_path, config, masks=True)
    assert info.value.problems == [
        f"row 2, column 'mask': {tmp_path / 'masks' / 'a.png'}: 3 tear pixels (value 2), but the row's "
        "fissure is 0 (no tear): correct the label or the mask"
    ]
    assert prepare_data(tmp_path, config).masks is None  # not a segmenting run: masks are not read

    _mask(tmp_path / "masks" / "a.png", tear=False)
    data = prepare_data(tmp_path, config, masks=True)
    assert [m is not None for m in data.masks] == [True] * 4 + [False] * 6


def test_the_phantoms_masks_agree_with_their_labels(data64):
    """The phantom draws tear pixels on its tear rows only: the rule above rejects none of it."""
    data = prepare_data(data64, DataConfig(image_size=64), masks=True)
    tears = [bool((m == 2).any()) for m in data.masks]
    assert tears == [r.labels["fissure"] == "1" for r in data.records] and any(tears)


def test_a_slice_that_does_not_fit_its_file_is_the_rows_error(tmp_path):
    """A slice out of the volume's range, a volume row without a slice, and a slice other than 0
    on a 2D image: labels.csv's errors, refused naming each row (they were set aside as
    'unreadable' files, and a tear row's label was lost from training with exit 0)."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((8, 32, 32)).astype(np.float32))
    rows = [("v.npy", "2", "1", "vertical", "posterior"), ("v.npy", "40", "1", "horizontal", "anterior")]
    rows += [("v.npy", "", "0", "", ""), ("img/0.png", "3", "0", "", "")]
    rows += [(f"img/{k}.png", "", "0", "", "") for k in range(1, 8)]
    _write_folder(tmp_path, rows, header=("image", "slice", "fissure", "orientation", "position"))
    with pytest.raises(DataError) as caught:
        prepare_data(tmp_path, DataConfig(image_size=32))
    assert caught.value.problems == [
        "row 3, column 'slice': slice 40 is out of range 0..7 (v.npy)",
        "row 4, column 'slice': is a 3D volume with 8 slices (shape (8, 32, 32)); give the slice to use "
        "in a 'slice' column of labels.csv (v.npy)",
        "row 5, column 'slice': slice 3 requested but the image is a single 2D slice (img/0.png)",
    ]
    assert str(caught.value).startswith(f"{tmp_path / 'labels.csv'}: 3 problem(s)")


def test_excluded_slices_of_one_volume_are_told_apart(tmp_path):
    """exclusions.csv names each excluded row by image and slice: the rows of one volume were
    identical lines before."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((4, 32, 32)).astype(np.float32))
    rows = [("v.npy", str(k), "1", "vertical", "both" if k in (1, 3) else "posterior") for k in range(4)]
    rows += [(f"img/{k}.png", "", "0", "", "") for k in range(8)]
    _write_folder(tmp_path, rows, header=("image", "slice", "fissure", "orientation", "position"))
    data = prepare_data(tmp_path, DataConfig(image_size=32))
    data.write_exclusions(tmp_path / "exclusions.csv")
    with (tmp_path / "exclusions.csv").open() as handle:
        written = [(r["image"], r["slice"], r["reason"]) for r in csv.DictReader(handle)]
    assert written == [
        ("v.npy", "1", "double tear: position 'both'"),
        ("v.npy", "3", "double tear: position 'both'"),
    ]


def test_a_spreadsheets_habits_are_named_or_taken_as_meant(tmp_path):
    """A ';'- or tab-separated export is named as such (it read as one column: 'missing column(s)'
    alone); a Windows path's backslashes are named; rows of empty values under the data (a
    spreadsheet's ',,,,') are skipped as blank lines are (each was refused as 'bad value')."""
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", value=1)
    for separator, shown in ((";", "';'"), ("\t", "'\\\\t'")):
        (tmp_path / "labels.csv").write_text(
            separator.join(["image", "fissure", "orientation", "position"]) + "\n"
        )
        with pytest.raises(
            DataError, match=f"missing column.*looks {shown}-separated: save labels.csv with commas"
        ):
            read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text(
        "image,fissure,orientation,position\nimg/a.png,0,,\nimg\\b.png,0,,\n,,,\n , ,,\n"
    )
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert info.value.problems == [
        f"row 3, column 'image': file not found: {tmp_path / 'img' / 'b.png'}".replace(
            "img/b.png", "img\\b.png"
        )
        + " (paths are written with '/', not '\\')"
    ]
    (tmp_path / "labels.csv").write_text(
        "image,fissure,orientation,position\nimg/a.png,0,,\nimg/b.png,0,,\n,,,\n,,,\n"
    )
    assert [r.image for r in read_labels(tmp_path)] == ["img/a.png", "img/b.png"]


def test_a_quote_opened_by_mistake_is_refused_not_the_rows_it_swallows_dropped(tmp_path):
    """A stray '"' in a note made every line up to the next quote (or the end of the file) one
    value: those rows, a tear among them, were dropped without a word."""
    names = [f"img/{k}.png" for k in range(6)]
    for name in names:
        _png(tmp_path / name)
    rows = [
        f"{name},{k % 2},{'vertical' if k % 2 else ''},{'posterior' if k % 2 else ''},"
        for k, name in enumerate(names)
    ]
    header = "image,fissure,orientation,position,notes"
    swallowing = rows[:1] + [rows[1] + '"see prior report'] + rows[2:4] + [rows[4] + 'ok"'] + rows[5:]
    (tmp_path / "labels.csv").write_text("\n".join([header, *swallowing]) + "\n")
    with pytest.raises(
        DataError, match=r"row 3: a quoted value runs from line 3 to line 6 and holds what read as rows"
    ):
        read_labels(tmp_path)
    never_closed = rows[:4] + [rows[4] + '"see prior report'] + rows[5:]
    (tmp_path / "labels.csv").write_text("\n".join([header, *never_closed]) + "\n")
    with pytest.raises(DataError, match=r"row 6: a quoted value runs from line 6 to line 7"):
        read_labels(tmp_path)
    # a note over lines, commas and all, and a quote inside a value are fine
    notes = [
        rows[0] + '"complex tear;\nsegments involved: 1, 2, 3, 4, 5, 6, 7"',
        rows[1] + '"Bucket handle" tear',
    ]
    (tmp_path / "labels.csv").write_text("\n".join([header, *notes, *rows[2:]]) + "\n")
    assert len(read_labels(tmp_path)) == 6
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")  # as meant: every row
    assert len(read_labels(tmp_path)) == 6


def test_a_label_file_saved_as_utf16_says_how_to_save_it(tmp_path):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "labels.csv").write_text(
        "image,fissure,orientation,position\nimg/a.png,0,,\n", encoding="utf-16"
    )
    with pytest.raises(
        DataError, match=r"labels.csv: not UTF-8 text \(UTF-16\); save it as a UTF-8 CSV file"
    ):
        read_labels(tmp_path)


def test_a_patient_id_written_two_ways_is_refused(tmp_path):
    """'007' and '7' (or '7' and '7.0', as pandas writes an id column with gaps) were two patients:
    one knee's images were split between train and val."""
    ids = [
        "007",
        "7",
        "8",
        "8.0",
        "A7",
        "8",
        "1.1",
        "1.10",
        "1e3",
        "1000",
        "9007199254740993",
        "9007199254740992",
    ]
    rows = [(f"img/{k}.png", "0", "", "", pid) for k, pid in enumerate(ids)]  # the last six: other patients
    _write_folder(tmp_path, rows, header=("image", "fissure", "orientation", "position", "patient_id"))
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    assert [p.split(": one number")[0] for p in info.value.problems] == [
        "patient_id '007' (row 2) and '7' (row 3)",
        "patient_id '8' (row 4) and '8.0' (row 5)",
    ]


def test_names_that_differ_invisibly_are_shown_so(tmp_path):
    """A NUL byte printed as nothing ("bad value '0 '"), and a file named 'é' as two characters
    (macOS' NFD) looked like the file the message said was not found."""
    import unicodedata

    _png(tmp_path / "img" / unicodedata.normalize("NFD", "é.png"))
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "labels.csv").write_text(
        "image,fissure,orientation,position\n"
        + unicodedata.normalize("NFC", "img/é.png")
        + ",0,,\n"
        + "img/b.png,0\x00,,\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    first, second = info.value.problems
    assert first.endswith("a name that differs only in Unicode form or spaces)") and "file not found" in first
    assert second == "row 3, column 'fissure': bad value '0\\x00' (allowed: 0, 1)"
