"""`serve`: a trained model over HTTP, and a page to drop a scan on.

FastAPI + uvicorn: `create_app` loads the model once and returns the app (tests drive it with
FastAPI's TestClient); `run_serve` runs it under uvicorn, on 127.0.0.1 unless told otherwise.

`POST /predict` answers what one line of `predict --json` says for the uploaded slice (or, with
`?exam=1`, what `predict --exams --json` says for a volume or a zip of one DICOM series), read,
resized, predicted and gated by the same code (engine/answers.py). No name or path from a request
reaches the file system: an upload is written under a name the server chooses into a private
temporary folder (the DICOM and NIfTI readers take files), a zip's members too, after their names,
types, count and sizes are checked. Every refusal is JSON `{"error": "..."}` with a 4xx code.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import ipaddress
import logging
import re
import socket
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from importlib import resources
from io import BytesIO
from pathlib import Path, PurePosixPath

import cv2
import h11
import numpy as np
import python_multipart  # noqa: F401  (starlette parses the uploads with it: missing, every upload would fail)
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from mtl_meniscus import __version__
from mtl_meniscus.engine.answers import (
    csv_columns,
    exam_columns,
    gated_row,
    json_row,
    read_slice,
    volume_rows,
)
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import TrainedModel, load_trained, resolve_threshold
from mtl_meniscus.errors import MeniscusError, PixelLimitError
from mtl_meniscus.io.exams import read_exam, resized_slices
from mtl_meniscus.io.imageio import (
    DICOM_SUFFIXES,
    RAISE_THE_LIMIT,
    RASTER_SUFFIXES,
    image_suffix,
    max_pixels_limit,
)
from mtl_meniscus.networks.cam import overlay

LOG = logging.getLogger("mtl_meniscus.serve")
MiB = 1 << 20
BATCH_SIZE = 32  # predict's default --batch-size: the same batches, so the same TTA draws
SLICE_HINT = "POST one slice, or send a volume with ?exam=1"
UPLOAD_HELP = "send the file as the multipart/form-data field 'file' (curl -F file=@scan.dcm URL)"
MULTIPART_OVERHEAD = 64 * 1024  # bytes a multipart body may hold beyond the file: boundaries, headers
PAGE_FILES = {  # route -> (file in serve_static/, media type): a fixed list, no name from a request
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {  # the page loads nothing but its own files and the images it is answered
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost. `max_pixels` None: predict's limit (data.max_pixels, else
    $MTL_MENISCUS_MAX_PIXELS, else 64 MP); zip members and their total size bound an exam's zip."""

    upload_bytes: int = 64 * MiB
    max_pixels: int | None = None
    in_flight: int = 2  # requests decoded and predicted at once (the model itself runs one at a time)
    waiting: int = 16  # requests queued behind them; one more is answered 503 at once
    timeout_s: float = 60.0  # from the request's start to its answer, upload included: 504 past it
    zip_members: int = 2000
    zip_bytes: int = 512 * MiB  # uncompressed, all members together (a zip bomb is refused unread)
    exam_previews: int = 64  # slice previews in an exam's answer (?preview=1), evenly spaced


class ServeError(Exception):
    """A request the server refuses: the HTTP status and the message the client reads."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Upload:
    """One uploaded file, in memory."""

    data: bytes
    name: str  # the client's file name, shown in answers and messages only, never used as a path


@dataclass(frozen=True)
class Options:
    """What POST /predict was asked for: an exam, saliency overlays, previews."""

    exam: bool = False
    saliency: bool = False
    preview: bool = False


# ---- what an upload is ----------------------------------------------------------------------------

KIND_NAMES = (
    "PNG, TIFF, JPEG, DICOM, NIfTI (.nii, .nii.gz) or .npy; with ?exam=1 also a zip of one DICOM series"
)
EXAM_KINDS = "with ?exam=1 send a volume (NIfTI, a 3D .npy, a multi-frame DICOM) or a zip of one DICOM series"


def upload_suffix(data: bytes, name: str) -> str | None:
    """The suffix the server names an upload with, from its first bytes (its magic number); a
    DICOM file without the 128-byte preamble is known by its .dcm name only. None: not accepted."""
    magics = {
        b"\x89PNG\r\n\x1a\n": ".png",
        b"II*\x00": ".tif",
        b"MM\x00*": ".tif",
        b"\xff\xd8\xff": ".jpg",
        b"\x93NUMPY": ".npy",
        b"PK\x03\x04": ".zip",
        b"PK\x05\x06": ".zip",  # an empty zip
    }
    if data[128:132] == b"DICM":  # first: a DICOM preamble may itself start like a TIFF
        return ".dcm"
    found = next((suffix for magic, suffix in magics.items() if data.startswith(magic)), None)
    if found:
        return found
    if _is_nifti(data[:544]):
        return ".nii"
    if data.startswith(b"\x1f\x8b"):  # gzip: a .nii.gz if its first 544 bytes, unpacked, are NIfTI
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[: 64 * 1024], 544)
        except zlib.error:
            return None
        return ".nii.gz" if _is_nifti(head) else None
    return ".dcm" if image_suffix(name) in DICOM_SUFFIXES else None


def _is_nifti(head: bytes) -> bool:
    """NIfTI-1 ('n+1' at byte 344) or NIfTI-2 ('n+2' at byte 4), single-file kinds only."""
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def display_name(filename: str | None) -> str:
    """The client's file name as answers show it: its last part, printable, at most 100 characters."""
    last = PurePosixPath((filename or "").replace("\\", "/")).name
    return re.sub(r"[^\w .+()-]", "_", last)[:100] or "upload"


# ---- a zip of one DICOM series -------------------------------------------------------------------


def extract_series(data: bytes, folder: Path, limits: ServeLimits) -> dict[str, str]:
    """The zip's files written into `folder` as slice_00000.dcm, ... (names the server chooses),
    after every check; returns {written path (and its file name alone): "zip member NAME"} for
    messages. Refused (4xx): not a zip, too many members, a name that is absolute or climbs out
    with '..', a symbolic link, an encrypted member, or more than limits.zip_bytes uncompressed."""
    _check_directory(data, limits.zip_members)
    try:
        archive = zipfile.ZipFile(BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as err:
        raise ServeError(422, f"not a readable zip ({err})") from None
    with archive:
        members = [m for m in archive.infolist() if _series_member(m)]
        if len(archive.infolist()) > limits.zip_members:  # the directory's record may lie
            raise ServeError(
                413, f"the zip has {len(archive.infolist())} members, above the limit of {limits.zip_members}"
            )
        if not members:
            raise ServeError(422, "the zip holds no files; it should hold the DICOM files of one series")
        declared = sum(m.file_size for m in members)
        if declared > limits.zip_bytes:
            raise ServeError(
                413,
                f"the zip unpacks to {declared:,} bytes, above the limit of {limits.zip_bytes:,} "
                "(a zip bomb?); refused before unpacking",
            )
        folder.mkdir()
        names, budget = {}, limits.zip_bytes
        for k, member in enumerate(members):
            target = folder / f"slice_{k:05d}.dcm"
            budget -= _unpack(archive, member, target, budget)
            names[str(target)] = f"zip member {member.filename!r}"
            names[target.name] = names[str(target)]  # a series' files are named by file name alone too
    return names


ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record: its entry count and directory size
ZIP_ENTRY_BYTES = 1024  # the directory bytes allowed per member: 46 + its name, extra field, comment


def _check_directory(data: bytes, most: int) -> None:
    """Refuse a zip whose directory declares more than `most` members, or is larger than that many
    would need, before zipfile reads it (it makes an object per entry: a 64 MiB zip of empty
    members would cost gigabytes). A zip without the record is left to zipfile to refuse."""
    end = data.rfind(ZIP_END, max(0, len(data) - 22 - 65_535))
    if end < 0 or len(data) < end + 22:
        return
    count = int.from_bytes(data[end + 10 : end + 12], "little")  # 0xFFFF: ZIP64, at least that many
    size = int.from_bytes(data[end + 12 : end + 16], "little")
    if count > most or size > most * ZIP_ENTRY_BYTES:
        raise ServeError(
            413,
            f"the zip's directory declares {count:,} members in {size:,} bytes, above the limit of "
            f"{most:,} members; refused before reading it",
        )


def _series_member(member: zipfile.ZipInfo) -> bool:
    """True for a file to read; False for folders and macOS' metadata; refuses unsafe members."""
    name = member.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise ServeError(400, f"zip member {name!r}: an absolute name or one with '..' is refused")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ServeError(400, f"zip member {name!r} is a symbolic link; refused")
    if member.flag_bits & 0x1:
        raise ServeError(400, f"zip member {name!r} is encrypted; refused")
    if member.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
        return False
    return True


def _unpack(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Copy one member to `target`, counting the bytes as they come (a header may lie): refused
    past `budget`. Returns the bytes written; a member that cannot be unpacked (a bad CRC, data cut
    short, a method zipfile lacks) is refused (422) by name."""
    written = 0
    try:
        with archive.open(member) as source, target.open("wb") as sink:
            while chunk := source.read(MiB):
                written += len(chunk)
                if written > budget:
                    raise ServeError(
                        413, f"the zip unpacks to more than its declared size; refused ({member.filename!r})"
                    )
                sink.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise ServeError(422, f"zip member {member.filename!r} cannot be unpacked: damaged ({err})") from None
    return written


# ---- the model and its answers ---------------------------------------------------------------------


class ServedModel:
    """A trained model loaded once, with the threshold, TTA and limits every answer uses."""

    def __init__(self, trained: TrainedModel, runtime, limits: ServeLimits, threshold, tta):
        self.trained, self.runtime, self.limits = trained, runtime, limits
        self.threshold, self.tta = threshold, tta
        config = trained.config
        self.max_pixels = limits.max_pixels or max_pixels_limit(config.data.max_pixels)
        # Grad-CAM's hooks and the model's train/eval switch are not thread-safe: one model call at a time
        self.model_lock = threading.Lock()
        self.info = model_info(trained, threshold, tta, limits, self.max_pixels)

    def answer(self, upload: Upload, options: Options) -> dict:
        """The JSON answer to one upload (runs in a worker thread)."""
        suffix = upload_suffix(upload.data, upload.name)
        if suffix is None or (suffix == ".zip" and not options.exam):
            what = "a zip is an exam: send it with ?exam=1" if suffix else f"expected {KIND_NAMES}"
            raise ServeError(415, f"{upload.name}: unsupported type; {what}")
        if options.exam and suffix in RASTER_SUFFIXES:
            raise ServeError(
                415, f"{upload.name}: a {suffix[1:].upper()} image is one slice, not an exam; {EXAM_KINDS}"
            )
        with tempfile.TemporaryDirectory(prefix="mtl-serve-") as folder:
            if suffix == ".zip":
                path = Path(folder) / "series"
                names = extract_series(upload.data, path, self.limits) | {str(path): upload.name}
            else:
                path = Path(folder) / f"upload{suffix}"
                path.write_bytes(upload.data)
                names = {str(path): upload.name}
            with refusals(names | {folder: "upload"}, own_limit=self.limits.max_pixels is not None):
                if options.exam:
                    return self.answer_exam(path, upload.name, options)
                return self.answer_slice(path, upload.name, options)

    def answer_slice(self, path: Path, name: str, options: Options) -> dict:
        """predict's line for one slice, plus its preview and saliency overlays where asked."""
        trained, size = self.trained, self.trained.config.data.image_size
        image, note = read_slice(path, size, self.max_pixels, trained.config.data.plane, SLICE_HINT)
        with self.model_lock:
            probs = trained.predict(
                [image], self.runtime, tta=self.tta, seed=0, batch_size=BATCH_SIZE, same_draws=True
            )
            cams = trained.saliency(image, self.runtime) if options.saliency else None
        row = gated_row(probs, 0, trained, self.threshold.value, name, note)
        if row.error:
            raise ServeError(422, row.error)
        answer = json_row(
            row.row(trained.tasks, trained.outputs), csv_columns(trained.tasks, trained.outputs)
        )
        return answer | _pictures(image, cams, options)

    def answer_exam(self, path: Path, name: str, options: Options) -> dict:
        """predict --exams' line for one exam, plus per-slice probabilities and previews where asked."""
        trained, config = self.trained, self.trained.config
        notes: list[str] = []
        volume = read_exam(path, self.max_pixels, config.data.image_size, config.data.plane, notes)
        with self.model_lock:
            rows = volume_rows(
                trained,
                volume,
                name,
                notes,
                self.runtime,
                self.tta,
                self.threshold.value,
                seed=0,
                batch_size=BATCH_SIZE,
                with_slices=True,
            )
        if rows[0].get("error"):
            raise ServeError(422, rows[0]["error"])
        slices, top = resized_slices(volume, config.data.image_size), rows[0]["top_slice"]
        cams = None
        if options.saliency:
            with self.model_lock:
                cams = trained.saliency(slices[top], self.runtime)
        columns = exam_columns(trained.tasks, trained.outputs)
        answer = json_row({column: rows[0].get(column, "") for column in columns}, columns)
        answer |= _pictures(slices[top], cams, options)
        if options.preview:
            root = trained.tasks.root.p_column
            shown = _evenly_spaced(len(slices), self.limits.exam_previews, top)
            answer["per_slice"] = [
                {"slice": k, "p": row[root], "preview": png_base64(_grey(slices[k])) if k in shown else None}
                for k, row in enumerate(rows[1:])
            ]
        return answer


@contextmanager
def refusals(names: dict[str, str], own_limit: bool = False) -> Iterator[None]:
    """A reader's or the model's refusal as a ServeError: 413 above the pixel limit, 422 otherwise;
    the server's temporary paths in the message replaced by the names the client knows. With
    `own_limit` (serve --max-pixels), the pixel limit's advice names that option."""
    try:
        yield
    except (MeniscusError, OSError) as err:
        message = str(err)
        for path in sorted(names, key=len, reverse=True):
            message = message.replace(path, names[path])
        status = 413 if isinstance(err, PixelLimitError) else 422
        if status == 413 and own_limit:
            message = message.replace(RAISE_THE_LIMIT, "serve's --max-pixels sets this limit")
        if isinstance(err, OSError):  # the server's own temporary folder failed, not the upload
            status, message = 500, f"cannot store the upload ({type(err).__name__})"
        raise ServeError(status, message) from None


def _evenly_spaced(count: int, most: int, keep: int) -> set[int]:
    """At most `most` (and at least 1) indices of 0..count-1, evenly spaced, `keep` among them."""
    if count <= most:
        return set(range(count))
    return {int(round(k)) for k in np.linspace(0, count - 1, max(most - 1, 1))} | {keep}


def _grey(image: np.ndarray) -> np.ndarray:
    """uint8 picture of a slice, windowed from its 1st to 99th percentile (as the overlays are)."""
    low, high = np.percentile(image, [1, 99])
    return np.clip((image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)


def png_base64(picture: np.ndarray) -> str:
    """A uint8 picture (grey, or BGR) as base64 PNG."""
    ok, encoded = cv2.imencode(".png", picture)
    if not ok:
        raise ServeError(500, "PNG encoding failed")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def _pictures(image: np.ndarray, cams: dict[str, np.ndarray] | None, options: Options) -> dict:
    """The slice's preview (?preview=1) and its saliency overlay per task (?saliency=1), PNG base64."""
    pictures: dict = {}
    if options.preview:
        pictures["preview"] = png_base64(_grey(image))
    if cams is not None:
        pictures["saliency"] = {task: png_base64(overlay(image, cam)) for task, cam in cams.items()}
    return pictures


def model_info(trained: TrainedModel, threshold, tta, limits: ServeLimits, max_pixels: int) -> dict:
    """GET /model: what the answers come from (digests, tasks, threshold, calibration, version),
    whether the run learned, the warnings predict would print on loading it, and the limits in force
    (`max_pixels`: the one applied, predict's when --max-pixels is not given)."""
    from mtl_meniscus.networks.models import takes_exams

    config_file = trained.run_dir / "config.yaml" if trained.run_dir else None
    tasks = trained.tasks

    def by_run_name(text: str) -> str:  # the server's paths stay its own: the run folder by its name
        return text.replace(str(trained.checkpoint.parent), trained.checkpoint.parent.name)

    return {
        "run": trained.run_dir.name if trained.run_dir else None,
        "checkpoint": trained.checkpoint.name,
        "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file else None,
        "checkpoint_sha256": trained.checkpoint_sha256,
        "model": trained.config.model.name,
        "tasks": trained.outputs,
        "probabilities": [tasks[name].p_column for name in trained.outputs],
        "gated_by": {name: tasks[name].gated_by for name in trained.outputs},
        "exam_model": takes_exams(trained.model),
        "image_size": trained.config.data.image_size,
        "edge_filter": trained.config.preprocess.edge_filter,
        "plane": trained.config.data.plane,
        "fissure_threshold": threshold.value,
        "threshold_source": by_run_name(threshold.source),  # where the threshold came from
        "calibration": dict(trained.calibration.temperatures) if trained.calibration else None,
        "tta_copies": tta.copies,
        "version": __version__,
        # false: its metrics.json says it did not learn, and every answer is chance (null: no record)
        "learned": trained.training_record.get("learned"),
        # what predict prints before its answers (did not learn; a training still writing the run
        # when the server loaded it)
        "warnings": [
            by_run_name(note) for note in (trained.did_not_learn_note, trained.in_training_note) if note
        ],
        "limits": asdict(limits) | {"max_pixels": max_pixels},
    }


# ---- admission: a bounded queue and a deadline ----------------------------------------------------


class Admission:
    """At most `in_flight` requests at work in worker threads and `waiting` queued for one; one more
    is refused at once (503). Each has `timeout_s` from its start (504 past it). A request answered
    504 keeps its place until its work ends: the bound holds for the work, not only the answers."""

    def __init__(self, limits: ServeLimits):
        self.capacity, self.timeout_s = limits.in_flight + limits.waiting, limits.timeout_s
        self.pool = ThreadPoolExecutor(max_workers=limits.in_flight, thread_name_prefix="serve")
        self.admitted = 0
        self.lock = threading.Lock()

    def _leave(self, *_) -> None:
        with self.lock:
            self.admitted -= 1

    async def handle(self, read: Callable[[], Awaitable[Upload]], work: Callable[[Upload], dict]) -> dict:
        with self.lock:
            if self.admitted >= self.capacity:
                raise ServeError(503, f"busy: {self.capacity} requests at work or queued; try again shortly")
            self.admitted += 1
        submitted, start = False, time.monotonic()
        late = ServeError(504, f"no answer within {self.timeout_s:g} s (the request timeout)")
        try:
            try:
                upload = await asyncio.wait_for(read(), self.timeout_s)
            except asyncio.TimeoutError:
                raise late from None
            future = self.pool.submit(work, upload)
            future.add_done_callback(self._leave)  # also when cancelled before it started
            submitted = True
            remaining = max(self.timeout_s - (time.monotonic() - start), 1e-3)
            try:  # on timeout the wrapper cancels the work if it has not started yet
                return await asyncio.wait_for(asyncio.wrap_future(future), remaining)
            except asyncio.TimeoutError:
                raise late from None
        finally:
            if not submitted:
                self._leave()


async def read_upload(request: Request, limit: int) -> Upload:
    """The multipart field 'file', read with its size counted as it arrives (413 past `limit`)."""
    too_big = ServeError(
        413, f"the upload is above the limit of {limit:,} bytes ({limit / MiB:.3g} MiB, --max-upload-mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise too_big
    received, receive = 0, request.receive

    async def counted():
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit + MULTIPART_OVERHEAD:
            raise too_big
        return message

    try:
        async with Request(request.scope, counted).form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServeError(400, f"no file: {UPLOAD_HELP}")
            data = await upload.read(limit + 1)
    except ClientDisconnect:
        raise ServeError(400, "the client disconnected during the upload") from None
    if len(data) > limit:
        raise too_big
    if not data:
        raise ServeError(400, f"{display_name(upload.filename)}: the uploaded file is empty")
    return Upload(data, display_name(upload.filename))


# ---- the app ---------------------------------------------------------------------------------------


def create_app(
    run: Path,
    limits: ServeLimits | None = None,
    threshold: float | None = None,
    tta_copies: int | None = None,
    precision: str = "auto",
    device: str | None = None,
) -> FastAPI:
    """The service of one trained run (a run folder or a checkpoint), its model loaded now."""
    limits = limits or ServeLimits()
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run, runtime)
    served = ServedModel(
        trained, runtime, limits, resolve_threshold(trained, threshold), trained.tta(tta_copies)
    )
    # no slash redirects: `curl -F file=@x /predict/` got a bodiless 307 (curl does not follow it)
    app = FastAPI(
        title="mtl_meniscus", version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    app.state.served, app.state.admission = served, Admission(limits)
    _add_error_handlers(app)
    _add_routes(app)
    return app


ADDRESSES = "the service answers POST /predict, GET /model, GET /health and the page at GET /"
PREDICT_PARAMETERS = tuple(field.name for field in fields(Options))  # POST /predict's query parameters


def _add_routes(app: FastAPI) -> None:
    page = resources.files("mtl_meniscus.commands") / "serve_static"
    for route, (name, media_type) in PAGE_FILES.items():
        body = (page / name).read_bytes()  # read once: a request names no file

        def serve_file(body=body, media_type=media_type) -> Response:
            return Response(body, media_type=media_type, headers=PAGE_HEADERS)

        app.add_api_route(route, serve_file, methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health(request: Request) -> dict:
        return {"status": "ok", "requests_at_work_or_queued": request.app.state.admission.admitted}

    @app.get("/model")
    async def model(request: Request) -> dict:
        return request.app.state.served.info

    @app.post("/predict")
    async def predict(request: Request, exam: bool = False, saliency: bool = False, preview: bool = False):
        unknown = sorted(set(request.query_params) - set(PREDICT_PARAMETERS))
        if unknown:  # ignored, ?threshold=0.9 would get an answer at the server's threshold unsaid
            raise ServeError(
                422,
                f"unknown query parameter {', '.join(map(repr, unknown))} (allowed: {', '.join(PREDICT_PARAMETERS)}); "
                "the threshold, TTA and calibration are the server's (GET /model)",
            )
        served, options = request.app.state.served, Options(exam, saliency, preview)
        answer = await request.app.state.admission.handle(
            lambda: read_upload(request, served.limits.upload_bytes),
            lambda upload: served.answer(upload, options),
        )
        return JSONResponse(answer)


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as {"error": "..."}; an unexpected failure as a 500 with its type only (the
    traceback goes to the server's log, never to the client)."""

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ServeError)
    async def refused(_request, err: ServeError):
        answer = error(err.status, err.message)
        if err.status == 503:  # busy: a well-behaved client waits before it asks again
            answer.headers["Retry-After"] = "1"
        return answer

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        if err.status_code == 404:  # a mistyped address (/predict/, /models): say which exist
            return error(404, f"no {request.method} {request.url.path} here; {ADDRESSES}")
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request, err: RequestValidationError):
        found = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error(422, f"bad request parameter ({found})")

    @app.exception_handler(Exception)
    async def failed(_request, err: Exception):
        LOG.exception("request failed")
        return error(500, f"internal error ({type(err).__name__}); the server keeps answering")


# ---- running it ------------------------------------------------------------------------------------

HEAD_DEADLINE_S = 10.0  # seconds for a request's head (its line and headers) to arrive: HeadDeadline
BACKLOG = 2048  # connections the kernel queues before uvicorn accepts them (uvicorn's default)


class HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed unless a whole request head arrives within
    HEAD_DEADLINE_S of its opening or of its last answer. uvicorn times only the silence after an
    answer, and any byte stops that clock until the next answer: a client that sends nothing, or one
    byte of a head it never ends, held its connection for ever, and limit_concurrency counts
    connections, so a few dozen such clients got everyone else uvicorn's 503. A request at work (its
    body still arriving, a large zip on a slow link, or its answer being computed) is never cut
    here: its time is Admission's."""

    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(HEAD_DEADLINE_S, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        # h11's state of the server's side: IDLE until a request's head is whole, SEND_RESPONSE or
        # SEND_BODY while it is at work, DONE once answered (a body still arriving then is not read)
        if self.conn.our_state in (h11.IDLE, h11.DONE) and not self.transport.is_closing():
            self.transport.close()


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before its address is printed: no other process can
    take the port between a check and uvicorn's bind, and port 0 is any free one (read it back).
    A host name listens on its first IPv4 address, else its first IPv6 one: `localhost` is
    127.0.0.1 (as it was) where the system lists ::1 first."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise MeniscusError(f"--host {host}: not a host name or address ({err}); {HOST_HINT}") from None
    family, *_, address = next((entry for entry in found if entry[0] == socket.AF_INET), found[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        if family == socket.AF_INET6:  # as asyncio binds: --host :: listens on IPv6 only, not IPv4 too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)  # a client that read the address and connects at once is queued, not refused
    except OSError as err:
        sock.close()
        raise MeniscusError(
            f"cannot listen on {url_host(host)}:{port} ({err.strerror or err}); {_listen_hint(err, port)}"
        ) from None
    return sock


HOST_HINT = "choose another --host (127.0.0.1: this machine only; 0.0.0.0: every network interface)"


def _listen_hint(err: OSError, port: int) -> str:
    """What to change when the bind failed: the host where it is not this machine's, else the port."""
    if err.errno == errno.EADDRNOTAVAIL:
        return HOST_HINT
    if err.errno == errno.EACCES and 0 < port < 1024:
        return "ports below 1024 need administrator rights: choose another --port (0: any free one)"
    return "choose another --port (0: any free one)"


def url_host(host: str) -> str:
    """The host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """uvicorn as serve runs it: HTTP/1.1 with the head deadline, a bounded number of connections."""
    limits = app.state.served.limits
    config = uvicorn.Config(
        app,
        http=HeadDeadline,  # h11 even where httptools is installed: the deadline is written for h11
        log_level="warning",
        timeout_keep_alive=5,  # seconds of silence after an answer (HEAD_DEADLINE_S bounds a trickle)
        limit_concurrency=limits.in_flight + limits.waiting + 32,  # health and page requests beside the queue
        backlog=BACKLOG,
    )
    return uvicorn.Server(config)


def run_serve(run: Path, host: str, port: int, console, **app_options) -> None:
    """Listen on the address (port 0: any free one; a bad address fails before the model loads),
    load the model, and serve until interrupted (Ctrl-C). The address printed is the one listened
    on: a script may read the port from it."""
    sock = listen(host, port)
    with sock:  # uvicorn closes it on shutdown; here too if the model or uvicorn's startup fails
        app = create_app(run, **app_options)
        served = app.state.served
        console.print(
            f"serving {run} ({served.info['model']}, fissure threshold {served.threshold.value:.3f}) on "
            f"http://{url_host(host)}:{sock.getsockname()[1]}/ (page), POST /predict, GET /model, "
            "GET /health; Ctrl-C stops",
            highlight=False,
        )
        for warning in served.info["warnings"]:  # as predict prints them: the answers may be chance
            console.print(warning, highlight=False, markup=False)
        if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:  # the address it listens on
            console.print(
                f"warning: {host} is reachable from other machines; serve has no authentication and no TLS",
                highlight=False,
            )
        try:
            uvicorn_server(app).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: the way to stop
            pass
