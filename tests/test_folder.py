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
    ]
    _write_folder(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    message = str(info.value)
    assert "10 problem(s)" in message
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
    ]:
        assert expected in message, expected


def test_missing_columns_and_missing_csv(tmp_path):
    with pytest.raises(DataError, match="labels.csv: not found"):
        read_labels(tmp_path)
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
    reasons = dict(data.exclusions)
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
    reasons = Counter(reason.split(":")[0] for _, reason in data.exclusions)
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
