"""DICOM as scanners and exports write it (io/dicom.py): an Enhanced (multi-frame) MR file with its
geometry and rescale in functional groups, shared or frame by frame, its frames in any order; a
file named without a suffix (IM0001, a UID); a file without the 128-byte preamble, or without a
file meta header at all. Each reads to the same canonical volume as the plain files it was made from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from support import app, runner
from test_orientation import DICOM_VARIANTS, canonical_slice, mr_dataset, write_dicom

from mtl_meniscus.commands.predict import input_stem
from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.exams import read_exam
from mtl_meniscus.io.imageio import read_image, read_volume

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SLICE_STEP = 3.0  # mm between neighbouring slices
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def canonical_volume(slices: int = 5) -> np.ndarray:
    """(S, 64, 64) uint16: asymmetric slices, each brighter than the one before (a slice out of
    order, or a mirrored one, is another volume)."""
    return np.stack([canonical_slice() // 2 + 100 * k for k in range(slices)]).astype(np.uint16)


def _item(**sequences) -> Dataset:
    item = Dataset()
    for name, values in sequences.items():
        inner = Dataset()
        for tag, value in values.items():
            setattr(inner, tag, value)
        setattr(item, name, Sequence([inner]))
    return item


def write_enhanced(
    path: Path,
    volume: np.ndarray,
    variant: str = "standard",
    per_frame_orientation: bool = True,
    stored_order: list[int] | None = None,
    slopes: list[float] | None = None,
    orientations: list | None = None,
) -> None:
    """`volume` (canonical, slices left to right) as one Enhanced MR file: each slice stored as
    `variant` (DICOM_VARIANTS), the frames in `stored_order` (canonical indices), each with its
    PlanePositionSequence; the orientation per frame or shared; with `slopes` (per stored frame) the
    stored values divided by them and the slope in each frame's PixelValueTransformationSequence.
    `orientations` (per stored frame) overrides the variant's orientation."""
    stored, orientation = DICOM_VARIANTS[variant]
    order = stored_order or list(range(len(volume)))
    ds = mr_dataset(ENHANCED_MR, series="9")
    frames, per_frame = [], []
    for place, k in enumerate(order):
        pixels = stored(volume[k]).astype(np.float64)
        groups = {"PlanePositionSequence": {"ImagePositionPatient": [-SLICE_STEP * k, 0.0, 0.0]}}
        if per_frame_orientation or orientations:
            frame_orientation = orientations[place] if orientations else orientation
            groups["PlaneOrientationSequence"] = {"ImageOrientationPatient": list(frame_orientation)}
        if slopes:
            pixels = pixels / slopes[place]
            groups["PixelValueTransformationSequence"] = {
                "RescaleSlope": slopes[place],
                "RescaleIntercept": 0.0,
                "RescaleType": "US",
            }
        per_frame.append(_item(**groups))
        frames.append(np.round(pixels).astype(np.uint16))
    shared = {"PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.5], "SliceThickness": SLICE_STEP}}
    if not (per_frame_orientation or orientations):
        shared["PlaneOrientationSequence"] = {"ImageOrientationPatient": list(orientation)}
    ds.SharedFunctionalGroupsSequence = Sequence([_item(**shared)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0].shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(np.stack(frames)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("variant", list(DICOM_VARIANTS))
@pytest.mark.parametrize("per_frame_orientation", [True, False])
def test_an_enhanced_file_reads_to_the_canonical_volume(variant, per_frame_orientation, tmp_path):
    """Its orientation in every frame (as many vendors write it) or shared; the frames stored out
    of spatial order: the same canonical volume. Per-frame orientations were not read: the volume
    came out as stored, mirrored, with "orientation not in the file"."""
    volume = canonical_volume()
    path = tmp_path / "enhanced.dcm"
    write_enhanced(path, volume, variant, per_frame_orientation, stored_order=[2, 0, 4, 1, 3])
    notes: list[str] = []
    np.testing.assert_array_equal(read_volume(path, plane="sagittal", notes=notes), volume)
    assert notes == []
    np.testing.assert_array_equal(read_image(path, slice_index=1), volume[1])  # a 'slice' column's


def test_an_enhanced_file_applies_each_frames_rescale(tmp_path):
    volume = canonical_volume()
    slopes = [1.0, 2.0, 4.0, 0.5, 1.0]
    write_enhanced(tmp_path / "scaled.dcm", volume, slopes=slopes)
    stored = pydicom.dcmread(tmp_path / "scaled.dcm").pixel_array.astype(np.float64)
    expected = np.stack([stored[k] * slopes[k] for k in range(len(volume))])  # by hand
    np.testing.assert_allclose(read_volume(tmp_path / "scaled.dcm"), expected)
    np.testing.assert_allclose(read_volume(tmp_path / "scaled.dcm"), volume, atol=2.0)  # the rounding's


def test_an_enhanced_file_of_another_plane_or_several_is_refused(tmp_path):
    volume = canonical_volume(3)
    coronal = tmp_path / "coronal.dcm"
    write_enhanced(coronal, volume, orientations=[CORONAL] * 3)
    ds = pydicom.dcmread(coronal)  # a coronal stack lies along y
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, SLICE_STEP * k, 0.0]
    ds.save_as(coronal)
    with pytest.raises(ImageReadError, match="is a coronal image"):
        read_volume(coronal, plane="sagittal")
    localizer = tmp_path / "localizer.dcm"
    write_enhanced(localizer, volume, orientations=[DICOM_VARIANTS["standard"][1]] * 2 + [CORONAL])
    with pytest.raises(ImageReadError, match="frames 1 and 3 disagree on ImageOrientationPatient"):
        read_volume(localizer)
    echoes = tmp_path / "echoes.dcm"
    write_enhanced(echoes, volume)
    ds = pydicom.dcmread(echoes)
    ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.save_as(echoes)
    with pytest.raises(ImageReadError, match="frames 1 and 3 lie at the same place"):
        read_volume(echoes)


def test_an_enhanced_file_in_an_exam_folder_is_the_exam(tmp_path):
    """Alone in its folder it is the exam (an export of one Enhanced series); beside single-slice
    files it is refused by name, not ordered among them."""
    volume = canonical_volume()
    write_enhanced(tmp_path / "exam" / "IM0001", volume, "rows reversed", stored_order=[4, 3, 2, 1, 0])
    np.testing.assert_array_equal(read_exam(tmp_path / "exam", plane="sagittal"), volume)
    write_dicom(tmp_path / "exam" / "IM0002", canonical_slice(), DICOM_VARIANTS["standard"][1])
    with pytest.raises(ImageReadError, match="IM0001: a multi-frame file .5 frames. among the 2 DICOM files"):
        read_exam(tmp_path / "exam")


def test_dicom_files_named_without_a_suffix_are_read_and_predicted(run64, tmp_path):
    """IM0001 and UID names, as many exports write them: predict on the folder left them out
    without a word, and a labels.csv row naming one was refused as of an unsupported format."""
    pixels = canonical_slice()
    names = ["IM0001", "1.2.840.113619.2.5.0", "1.2.840.113619.2.5.1", "slice.dcm"]
    for name in names:
        write_dicom(tmp_path / "in" / name, pixels, DICOM_VARIANTS["standard"][1])
    (tmp_path / "in" / "README").write_text("exported by a PACS\n")  # not an image: not an input
    np.testing.assert_array_equal(read_image(tmp_path / "in" / names[1]), pixels)
    result = runner.invoke(
        app, ["predict", str(run64), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv")]
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(row["image"]).name for row in rows) == sorted(names)
    assert all(row["p_fissure"] and not row["error"] for row in rows)
    # masks are named after the inputs: two UIDs are two names, not one without '.0' and '.1'
    assert [input_stem(name) for name in names] == ["IM0001", *names[1:3], "slice"]


def test_dicom_without_its_preamble_or_file_meta_is_read(tmp_path):
    pixels = canonical_slice()
    stored, orientation = DICOM_VARIANTS["columns reversed"]
    write_dicom(tmp_path / "full.dcm", stored(pixels), orientation)
    raw = (tmp_path / "full.dcm").read_bytes()
    assert raw[128:132] == b"DICM"
    (tmp_path / "no_preamble.dcm").write_bytes(raw[132:])  # the file meta header, then the data set
    ds = pydicom.dcmread(tmp_path / "full.dcm")
    bare = pydicom.dataset.Dataset()
    for element in ds:
        bare.add(element)
    bare.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)  # no file meta at all
    for name in ("no_preamble.dcm", "bare.dcm"):
        np.testing.assert_array_equal(read_image(tmp_path / name), pixels)
    (tmp_path / "notes.dcm").write_text("not an image\n" * 20)
    with pytest.raises(ImageReadError, match=r"notes.dcm: not a DICOM file \(no DICOM preamble"):
        read_image(tmp_path / "notes.dcm")


def test_a_series_of_slices_of_two_sizes_names_the_odd_file(tmp_path):
    orientation = DICOM_VARIANTS["standard"][1]
    for k in range(3):
        write_dicom(tmp_path / "s" / f"IM{k}.dcm", canonical_slice(), orientation, (-SLICE_STEP * k, 0, 0))
    write_dicom(tmp_path / "s" / "SCOUT.dcm", canonical_slice(32), orientation, (-SLICE_STEP * 3, 0, 0))
    with pytest.raises(ImageReadError, match=r"32x32: 1 file \(e.g. SCOUT.dcm\); 64x64: 3 files"):
        read_exam(tmp_path / "s")


def test_a_2d_npy_is_not_an_exam(tmp_path):
    np.save(tmp_path / "slice.npy", canonical_slice().astype(np.float32))
    with pytest.raises(ImageReadError, match=r"slice.npy: a 2D array of shape \(64, 64\), one slice"):
        read_exam(tmp_path / "slice.npy")
    np.testing.assert_array_equal(read_image(tmp_path / "slice.npy"), canonical_slice())  # a slice: fine


def test_a_legacy_multi_frame_file_keeps_its_frames_and_a_short_sequence_is_refused(tmp_path):
    """A multi-frame file with ImagePositionPatient at its top level (a legacy conversion) is read
    in file order, not refused as 'frames at the same place'; a per-frame sequence shorter than
    NumberOfFrames gave the frames past it no rescale, without a word."""
    volume = canonical_volume()
    ds = mr_dataset(series="7")
    ds.ImageOrientationPatient = list(DICOM_VARIANTS["standard"][1])
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.NumberOfFrames = len(volume)
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = volume.tobytes()
    ds.save_as(tmp_path / "legacy.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "legacy.dcm", plane="sagittal"), volume)

    write_enhanced(tmp_path / "short.dcm", volume, slopes=[2.0] * len(volume))
    ds = pydicom.dcmread(tmp_path / "short.dcm")
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:3]
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(ImageReadError, match=r"PerFrameFunctionalGroupsSequence has 3 items for 5 frames"):
        read_volume(tmp_path / "short.dcm")


def test_a_compressed_file_without_its_decoder_says_which_plug_ins_read_it():
    """pydicom's own JPEG-LS sample (shipped with pydicom): without a plug-in the file is refused
    on one line, naming it and the decoders pydicom lists (the docs say what to install)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if path is None:
        pytest.skip("this pydicom ships without its test files")
    try:
        image = read_image(path)
    except ImageReadError as err:
        message = str(err)
        assert message.startswith(f"{path}: cannot read") and "\n" not in message
        assert "pylibjpeg" in message and "gdcm" in message
    else:  # a decoder plug-in is installed here: the slice must then be the right one
        assert image.shape == (64, 64)
