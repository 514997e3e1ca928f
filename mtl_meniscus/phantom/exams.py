"""Phantom exams: stacks of sagittal slices of one knee, written in the public data sets' layouts.

Each exam is one phantom case (the label mix of `plan_cases`) rendered on every slice with the same
anatomy; the menisci shrink away from the central slices, and a tear, where the exam has one,
spans a few adjacent slices around one of them. Formats:

- `mrnet`: `train|valid/sagittal/NNNN.npy` (uint8, slices x H x W) and `train-meniscus.csv` /
  `valid-meniscus.csv` (no header: `case,label`), as the MRNet data set ships; the last tenth of
  the exams is `valid`.
- `dicom-series`: `exam_NNNN/` folders of single-slice DICOM files (MR, 16-bit) with real
  ImagePositionPatient / ImageOrientationPatient / InstanceNumber tags, in shuffled file order.
- `nifti`: `exam_NNNN.nii.gz`, slices along the last axis, with a sagittal affine (SAGITTAL_AFFINE).

Every format also gets `phantom-exams.csv` (exam, fissure, orientation, position, tear_slices as
first-last, 0-based): the full labels, which MRNet's own CSVs do not carry.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtl_meniscus.errors import ConfigError
from mtl_meniscus.io.outputs import atomic_csv_file, check_empty_output_dir
from mtl_meniscus.phantom.slices import (
    PhantomCase,
    PhantomSettings,
    check_phantom_options,
    plan_cases,
    render_case,
)

FORMATS = ("mrnet", "dicom-series", "nifti")
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along +y (anterior-posterior), columns along -z
SLICE_SPACING_MM = 3.0
# NIfTI (RAS) of a volume stored (rows, columns, slices) in the canonical view: rows run inferior,
# columns posterior (0.5 mm pixels), slices to the patient's right (io/orientation.py)
SAGITTAL_AFFINE = np.array(
    [[0.0, 0.0, SLICE_SPACING_MM, 0.0], [0.0, -0.5, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclasses.dataclass(frozen=True)
class PhantomExam:
    case: PhantomCase  # the exam's labels
    tear_slices: tuple[int, int] | None  # first and last slice showing the tear (0-based), if any

    @property
    def name(self) -> str:
        return f"{self.case.index:04d}"


def plan_exams(n: int, n_slices: int, seed: int, size: int) -> list[PhantomExam]:
    """The exams' labels (plan_cases' mix, every exam at `size`) and where each tear lies."""
    rng = np.random.default_rng([seed, 7])
    exams = []
    for case in plan_cases(n=n, seed=seed, size=size, n_wrong_size=0):
        tear = None
        if case.fissure:
            center = n_slices // 2 + int(rng.integers(-2, 3))
            half = int(rng.integers(1, 3))  # the tear shows on 3 or 5 adjacent slices
            tear = (max(0, center - half), min(n_slices - 1, center + half))
        exams.append(PhantomExam(case, tear))
    return exams


def render_exam(exam: PhantomExam, n_slices: int, seed: int, settings: PhantomSettings) -> np.ndarray:
    """uint16 (S, H, W): the case's anatomy on every slice, menisci largest in the middle; each
    slice with its own noise field and intensity jitter (render_case's slice_index)."""
    slices = []
    for s in range(n_slices):
        offset = (s - (n_slices - 1) / 2) / max(1.0, n_slices / 2)  # -1 .. 1 across the exam
        # meniscus size: never 1.0, where the generator would skip the size draws on that slice alone
        factor = float(np.clip(0.99 - 0.6 * offset**2, 0.35, 0.99))
        shows_tear = exam.tear_slices is not None and exam.tear_slices[0] <= s <= exam.tear_slices[1]
        # Every slice of a tear exam goes through the tear's random draws, with the tear's contrast
        # 0 where it does not show: the draws after it (blur, bias field, intensity scale) stay the
        # exam's own on every slice; the noise field and a small intensity jitter are each slice's
        # own, as on a scanner, so max pooling over an exam meets independent noise.
        slice_settings = dataclasses.replace(
            settings,
            meniscus_size=(factor, factor),
            tear_contrast=settings.tear_contrast if shows_tear else (0.0, 0.0),
        )
        image, _ = render_case(exam.case, seed, slice_settings, slice_index=s)
        slices.append(image)
    return np.stack(slices)


def write_phantom_exams(
    out_dir: str | Path,
    n: int = 60,
    n_slices: int = 24,
    seed: int = 0,
    size: int = 256,
    fmt: str = "mrnet",
    settings: PhantomSettings | None = None,
    on_exam: Callable[[int, int], None] | None = None,
) -> list[PhantomExam]:
    """Write `n` exams of `n_slices` slices in format `fmt` into an empty `out_dir`;
    `on_exam(done, total)` is called after each exam is written (a progress display)."""
    out_dir = Path(out_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"--exam-format: bad value {fmt!r} (allowed: {', '.join(FORMATS)})")
    check_phantom_options(n, seed, size, what="exams", n_option="--n-exams")
    if not 3 <= n_slices <= 200:
        raise ConfigError(f"--slices-per-exam: bad value {n_slices} (allowed: 3..200 slices per exam)")
    check_empty_output_dir(
        out_dir, "make-phantom OUT", instead="phantom exams are written into an empty folder"
    )
    settings = settings or PhantomSettings()
    exams = plan_exams(n, n_slices, seed, size)
    n_valid = max(1, n // 10)
    for k, exam in enumerate(exams):
        volume = render_exam(exam, n_slices, seed, settings)
        if fmt == "mrnet":
            split = "valid" if k >= n - n_valid else "train"
            folder = out_dir / split / "sagittal"
            folder.mkdir(parents=True, exist_ok=True)
            # MRNet stores uint8: each exam scaled to 0..255
            scaled = volume.astype(np.float32) * (255.0 / max(1, int(volume.max())))
            np.save(folder / f"{exam.name}.npy", scaled.round().astype(np.uint8))
        elif fmt == "dicom-series":
            _write_series(out_dir / f"exam_{exam.name}", volume, seed, k)
        else:
            import nibabel

            image = nibabel.Nifti1Image(np.moveaxis(volume, 0, -1), SAGITTAL_AFFINE)
            nibabel.save(image, out_dir / f"exam_{exam.name}.nii.gz")
        if on_exam is not None:
            on_exam(k + 1, len(exams))
    if fmt == "mrnet":
        for split, members in (("train", exams[: n - n_valid]), ("valid", exams[n - n_valid :])):
            with atomic_csv_file(out_dir / f"{split}-meniscus.csv") as handle:
                csv.writer(handle).writerows([exam.name, exam.case.fissure] for exam in members)
    with atomic_csv_file(out_dir / "phantom-exams.csv") as handle:
        writer = csv.writer(handle)
        writer.writerow(["exam", "fissure", "orientation", "position", "tear_slices"])
        for exam in exams:
            tear = f"{exam.tear_slices[0]}-{exam.tear_slices[1]}" if exam.tear_slices else ""
            writer.writerow([exam.name, exam.case.fissure, exam.case.orientation, exam.case.position, tear])
    return exams


def _write_series(folder: Path, volume: np.ndarray, seed: int, k: int) -> None:
    """Single-slice MR DICOM files with the geometry a reader sorts by, in shuffled file order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    study = generate_uid(entropy_srcs=[f"study-{seed}-{k}"])
    series = generate_uid(entropy_srcs=[f"series-{seed}-{k}"])
    names = np.random.default_rng([seed, 8, k]).permutation(len(volume))
    for s, pixels in enumerate(volume):
        instance = generate_uid(entropy_srcs=[f"instance-{seed}-{k}-{s}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesDescription = "MR", "phantom sagittal"
        ds.InstanceNumber = s + 1
        ds.ImageOrientationPatient = list(SAGITTAL)
        # the normal of SAGITTAL is -x: position along it grows with s
        ds.ImagePositionPatient = [-SLICE_SPACING_MM * s, 0.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], SLICE_SPACING_MM
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{names[s]:04d}.dcm", enforce_file_format=True)
