"""`serve` through FastAPI's TestClient: every input kind answers what `predict --json` writes for
the same file, an exam zip what `predict --exams --json` writes, every bad input is a 4xx with a
message (and the server keeps answering), and the limits hold: upload size, pixels, zip members and
size, the bounded queue (503) and the request timeout (504). A real uvicorn (`--port 0`, and the
deadline on a request's head) where the TestClient cannot tell."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import shutil
import socket
import stat
import struct
import threading
import time
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import cv2
import nibabel
import numpy as np
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from support import app as cli_app
from support import runner, sagittal_copy, serve_process

from mtl_meniscus.commands import serve
from mtl_meniscus.commands.predict import run_predict, run_predict_exams
from mtl_meniscus.commands.serve import ServeLimits, create_app, listen, uvicorn_server
from mtl_meniscus.phantom.exams import write_phantom_exams


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run / "run"


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run)) as client:
        yield client


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A DICOM series of 3 sagittal 64-pixel phantom slices (the first of 20 phantom exams)."""
    folder = tmp_path_factory.mktemp("exams")
    write_phantom_exams(folder / "exams", n=20, n_slices=3, size=64, fmt="dicom-series")
    return folder / "exams" / "exam_0000"


def post(client, name: str, data: bytes, query: str = ""):
    return client.post(f"/predict{query}", files={"file": (name, data)})


def predict_line(run: Path, path: Path, tmp_path: Path, exams: bool = False) -> dict:
    """The line `predict --json` (or `predict --exams --json`) writes for one input."""
    out = tmp_path / f"{path.name}.jsonl"
    predict = run_predict_exams if exams else run_predict
    predict(run, [path], out, as_json=True, console=Console(quiet=True))
    (line,) = out.read_text().splitlines()
    return json.loads(line)


def assert_same_answer(served: dict, predicted: dict, name_key: str) -> None:
    """Every column equal but the input's name (a path for predict), probabilities to 1e-6."""
    assert set(served) == set(predicted)
    for key, value in predicted.items():
        if key == name_key:
            continue
        if isinstance(value, float):
            assert served[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert served[key] == value, key


def slice_files(run: Path, folder: Path, pydicom_files: Path) -> dict[str, Path]:
    """One phantom slice in every format serve reads (the .npy at another size, so it is resized)."""
    png = run.parent / "data" / "images" / "knee_00000.png"
    image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED).astype(np.float32)
    files = {"png": folder / "slice.png", "tiff": folder / "slice.tif", "jpeg": folder / "slice.jpg"}
    shutil.copy(png, files["png"])
    cv2.imwrite(str(files["tiff"]), image.astype(np.uint16))
    cv2.imwrite(str(files["jpeg"]), np.clip(image / max(image.max(), 1) * 255, 0, 255).astype(np.uint8))
    files["npy"] = folder / "slice.npy"
    np.save(files["npy"], cv2.resize(image, (80, 80)))
    files["dicom"] = sagittal_copy(pydicom_files / "MR_small.dcm", folder / "small.dcm")
    for suffix in (".nii", ".nii.gz"):  # no geometry in the header: taken as stored, with a note
        files[suffix[1:]] = folder / f"slice{suffix}"
        nibabel.save(nibabel.Nifti1Image(image.T[:, :, None], None), files[suffix[1:]])
    return files


KINDS = ["png", "tiff", "jpeg", "npy", "dicom", "nii", "nii.gz"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_answers_what_predict_json_writes(kind, run, client, pydicom_files, tmp_path):
    path = slice_files(run, tmp_path, pydicom_files)[kind]
    response = post(client, path.name, path.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_same_answer(answer, predict_line(run, path, tmp_path), "image")
    assert answer["image"] == path.name and answer["error"] is None
    if kind == "npy":
        assert answer["note"] == "resized from 80x80 to 64x64"


def test_an_exam_zip_answers_what_predict_exams_json_writes(run, client, series, tmp_path):
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        for file in sorted(series.iterdir(), reverse=True):  # the order in the zip does not matter
            archive.write(file, f"knee/series/{file.name}")
    response = post(client, "knee.zip", packed.getvalue(), "?exam=1&preview=1")
    assert response.status_code == 200, response.text
    answer = response.json()
    per_slice = answer.pop("per_slice")
    preview = answer.pop("preview")
    assert_same_answer(answer, predict_line(run, series, tmp_path, exams=True), "exam")
    assert answer["exam"] == "knee.zip" and answer["slices"] == 3
    assert [s["slice"] for s in per_slice] == [0, 1, 2] and all(s["preview"] for s in per_slice)
    top = max(per_slice, key=lambda s: s["p"])
    assert top["slice"] == answer["top_slice"] and top["p"] == pytest.approx(answer["p_fissure"], abs=1e-6)
    assert decoded(preview).shape == (64, 64)


def decoded(base64_png: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(base64_png), np.uint8), cv2.IMREAD_UNCHANGED)


def test_saliency_overlays_are_predicts_cam_pictures(run, client, tmp_path):
    png = run.parent / "data" / "images" / "knee_00003.png"
    response = post(client, "knee.png", png.read_bytes(), "?saliency=1&preview=1")
    assert response.status_code == 200, response.text
    answer = response.json()
    cams = tmp_path / "cams"
    run_predict(run, [png], tmp_path / "p.csv", cam_dir=cams, console=Console(quiet=True))
    assert sorted(answer["saliency"]) == ["fissure", "orientation", "position"]
    for task, picture in answer["saliency"].items():
        written = cv2.imread(str(cams / f"knee_00003_png_{task}.png"), cv2.IMREAD_UNCHANGED)
        assert np.abs(decoded(picture).astype(int) - written.astype(int)).max() <= 1, task
    assert decoded(answer["preview"]).shape == (64, 64)


def test_model_describes_the_run(run, client):
    info = client.get("/model").json()
    assert info["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert info["tasks"] == ["fissure", "orientation", "position"]
    assert info["probabilities"] == ["p_fissure", "p_horizontal", "p_anterior"]
    assert info["fissure_threshold"] == 0.5 and "default" in info["threshold_source"]
    assert info["calibration"] is None and info["version"] and info["exam_model"] is False
    assert info["limits"]["max_pixels"] == 64_000_000  # the limit in force (predict's), not null
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("learned", [True, False])
def test_model_says_whether_the_run_learned(run, tmp_path, learned):
    """serve answered for a run whose metrics.json says it did not learn as for any other, where
    predict warns that its answers are chance: /model says it (and the page shows it)."""
    copy = tmp_path / "served" / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps(metrics | {"learned": learned}))
    with TestClient(create_app(copy)) as client:
        info = client.get("/model").json()
    assert info["learned"] is learned
    if learned:
        assert info["warnings"] == []
    else:
        (warning,) = info["warnings"]
        assert "did not learn" in warning and "its answers are chance" in warning
        assert str(tmp_path) not in warning  # the server's paths stay its own


def test_model_names_a_threshold_files_run_not_the_servers_path(run, tmp_path):
    """threshold_source held the server's absolute path to threshold.json: its paths stay its own."""
    from mtl_meniscus.engine.runtime import resolve_runtime
    from mtl_meniscus.engine.trained import load_trained
    from mtl_meniscus.engine.validation_fits import choose_threshold

    copy = tmp_path / "served" / "run"
    shutil.copytree(run, copy)
    runtime = resolve_runtime("fp32", "cpu")
    choose_threshold(
        load_trained(copy, runtime), runtime, youden=True, given=None, console=Console(quiet=True)
    )
    with TestClient(create_app(copy)) as client:
        source = client.get("/model").json()["threshold_source"]
    assert (
        source.startswith("Youden's J") and "(run/threshold.json)" in source and str(tmp_path) not in source
    )


def test_the_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/page.js"' in page.text and 'href="/page.css"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: everything from the package
    assert client.get("/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/page.css").status_code == 200
    # the page knows a volume's refusal by serve's own words (it offers its "exam" box instead)
    (hint,) = re.findall(r'const SLICE_HINT = "([^"]+)"', client.get("/page.js").text)
    assert hint in serve.SLICE_HINT
    assert client.get("/serve_static/index.html").status_code == 404  # no file is named by a request
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load from a CDN
    # a trailing slash got a bodiless 307, which curl does not follow: an error a person can read
    misspelt = client.post("/predict/", files={"file": ("x.png", b"x")}, follow_redirects=False)
    assert misspelt.status_code == 404
    assert misspelt.json()["error"].startswith("no POST /predict/ here; the service answers POST /predict,")


# ---- bad input ---------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""
    _, encoded = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def zipped(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name in links:  # a symbolic link as zip tools store one: its mode in external_attr
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return packed.getvalue()


def bad_inputs(pydicom_files: Path) -> list[tuple[str, dict, int, str]]:
    """(what, request keywords, status, a part of the message)."""
    dicom = (pydicom_files / "MR_small.dcm").read_bytes()
    return [
        ("no body", {}, 400, "no file"),
        ("a form without a file", {"data": {"name": "x"}}, 400, "no file"),
        ("an empty file", {"files": {"file": ("a.png", b"")}}, 400, "a.png: the uploaded file is empty"),
        ("wrong type", {"files": {"file": ("notes.txt", b"not an image")}}, 415, "notes.txt: unsupported type"),
        ("bomb", {"files": {"file": ("bomb.png", png_declaring(20000, 20000))}}, 413, "bomb.png: image of 400.0"),
        ("corrupt DICOM", {"files": {"file": ("t.dcm", (pydicom_files / "MR_truncated.dcm").read_bytes())}}, 422, "t.dcm: cannot read"),
        ("half a PNG", {"files": {"file": ("half.png", png_declaring(8, 8)[:40])}}, 422, "half.png: cannot decode"),
        ("a volume as a slice", {"files": {"file": ("v.npy", npy(np.zeros((3, 8, 8))))}}, 422, "send a volume with ?exam=1"),
        ("a zip without exam", {"files": {"file": ("s.zip", zipped({"a.dcm": dicom}))}}, 415, "send it with ?exam=1"),
        ("a zip climbing out", {"files": {"file": ("s.zip", zipped({"../a.dcm": dicom}))}, "params": {"exam": 1}}, 400, "'../a.dcm': an absolute name or one with '..'"),
        ("an absolute member", {"files": {"file": ("s.zip", zipped({"/tmp/a.dcm": dicom}))}, "params": {"exam": 1}}, 400, "'/tmp/a.dcm': an absolute name"),
        ("a symlink member", {"files": {"file": ("s.zip", zipped({"a.dcm": dicom}, ("b.dcm",)))}, "params": {"exam": 1}}, 400, "'b.dcm' is a symbolic link"),
        ("a zip of non-DICOM", {"files": {"file": ("s.zip", zipped({"readme.txt": b"hi"}))}, "params": {"exam": 1}}, 422, "zip member 'readme.txt': not a readable DICOM"),
        ("a broken zip", {"files": {"file": ("s.zip", b"PK\x03\x04broken")}, "params": {"exam": 1}}, 422, "not a readable zip"),
        ("a bad parameter", {"files": {"file": ("a.png", b"x")}, "params": {"exam": "maybe"}}, 422, "query.exam"),
        ("an unknown parameter", {"files": {"file": ("a.png", b"x")}, "params": {"threshold": 0.9}}, 422, "unknown query parameter 'threshold' (allowed: exam, saliency, preview)"),
        ("a slice as an exam", {"files": {"file": ("a.png", png_declaring(8, 8))}, "params": {"exam": 1}}, 415, "a.png: a PNG image is one slice, not an exam"),
    ]  # fmt: skip


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


def test_every_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_answering(run, client, pydicom_files):
    good = (run.parent / "data" / "images" / "knee_00000.png").read_bytes()
    for what, request, status, text in bad_inputs(pydicom_files):
        response = client.post("/predict", **request)
        assert response.status_code == status, (what, response.text)
        message = response.json()["error"]
        assert text in message, (what, message)
        assert "mtl-serve-" not in message and "/tmp" not in message.replace("'/tmp/a.dcm'", ""), what
        assert client.get("/health").status_code == 200, what
    assert post(client, "knee.png", good).status_code == 200


def test_upload_pixel_and_zip_limits(run, pydicom_files):
    dicom = (pydicom_files / "MR_small.dcm").read_bytes()
    limits = ServeLimits(upload_bytes=20_000, max_pixels=1000, zip_members=4, zip_bytes=60_000)
    with TestClient(create_app(run, limits)) as client:
        big = post(client, "big.npy", npy(np.zeros((100, 100))))  # 40 kB
        assert big.status_code == 413 and "above the limit of 20,000 bytes" in big.json()["error"]
        pixels = post(client, "s.npy", npy(np.zeros((40, 40))))  # 1,600 pixels
        assert pixels.status_code == 413 and "s.npy: array of 40x40 = 1,600 pixels" in pixels.json()["error"]
        assert "serve's --max-pixels sets this limit" in pixels.json()["error"]  # not the config key
        members = zipped({f"{k}.dcm": b"x" for k in range(5)})
        many = post(client, "s.zip", members, "?exam=1")
        assert many.status_code == 413 and "declares 5 members" in many.json()["error"]
        bomb = zipped(
            {"a.dcm": dicom, "b.dcm": bytes(100_000)}
        )  # 100 kB of zeros pack into a few hundred bytes
        assert len(bomb) < 20_000
        refused = post(client, "s.zip", bomb, "?exam=1")
        assert refused.status_code == 413 and "a zip bomb?" in refused.json()["error"]
        damaged = bytearray(zipped({"a.dcm": dicom}))
        damaged[30 + len("a.dcm") + 50] ^= 0xFF  # a byte of the member's deflated data (after its header)
        broken = post(client, "s.zip", bytes(damaged), "?exam=1")
        assert broken.status_code == 422 and "zip member 'a.dcm' cannot be unpacked" in broken.json()["error"]
        assert client.get("/health").status_code == 200


def test_a_zip_of_two_series_names_its_members(run, client, series, tmp_path):
    """The series reader names a series' files by file name; the client hears its own names, not
    the server's (slice_00000.dcm, ...)."""
    import pydicom

    files = {}
    for folder, uid in (("a", "1.2.3.1"), ("b", "1.2.3.2")):
        for path in sorted(series.iterdir())[:2]:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = uid
            ds.save_as(tmp_path / "one.dcm")
            files[f"{folder}/{path.name}"] = (tmp_path / "one.dcm").read_bytes()
    response = post(client, "two.zip", zipped(files), "?exam=1")
    error = response.json()["error"]
    assert response.status_code == 422 and "2 series in one exam folder" in error
    assert "slice_0" not in error and "e.g. zip member 'a/" in error and "e.g. zip member 'b/" in error


# ---- the queue and the deadline ------------------------------------------------------------------


def slow_answer(started: threading.Event, release: threading.Event):
    def answer(upload, options):
        started.set()
        release.wait(10)
        return {"image": upload.name}

    return answer


def test_a_full_queue_is_answered_503_at_once(run, monkeypatch):
    app = create_app(run, ServeLimits(in_flight=1, waiting=0))
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(app.state.served, "answer", slow_answer(started, release))
    with TestClient(app) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=post(client, "a.png", b"\x89PNG")))
        worker.start()
        assert started.wait(10)
        clock = time.monotonic()
        busy = post(client, "b.png", b"\x89PNG")
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        assert time.monotonic() - clock < 2  # refused, not queued
        assert client.get("/health").json()["requests_at_work_or_queued"] == 1
        release.set()
        worker.join(10)
        assert first["r"].status_code == 200 and first["r"].json() == {"image": "a.png"}
        assert post(client, "c.png", b"\x89PNG").status_code == 200


def test_a_request_past_its_deadline_is_answered_504_and_keeps_its_place_until_it_ends(run, monkeypatch):
    # a deadline long enough for the work to start on a busy machine: work not started by then is
    # cancelled and gives its place up at once, and then b would be admitted
    app = create_app(run, ServeLimits(in_flight=1, waiting=0, timeout_s=1.5))
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(app.state.served, "answer", slow_answer(started, release))
    with TestClient(app) as client:
        late = post(client, "a.png", b"\x89PNG")
        assert late.status_code == 504 and "no answer within 1.5 s" in late.json()["error"]
        assert started.is_set(), "the work had not started within the deadline"
        assert post(client, "b.png", b"\x89PNG").status_code == 503  # its work still runs
        release.set()
        for _ in range(100):
            if client.get("/health").json()["requests_at_work_or_queued"] == 0:
                break
            time.sleep(0.05)
        assert post(client, "c.png", b"\x89PNG").status_code == 200


# ---- the command ---------------------------------------------------------------------------------


def test_serve_refuses_bad_options_and_a_busy_port(run):
    result = runner.invoke(cli_app, ["serve", str(run), "--port", "70000"])
    assert result.exit_code == 1 and "--port: bad value 70000" in result.output
    result = runner.invoke(cli_app, ["serve", str(run), "--max-in-flight", "0"])
    assert result.exit_code == 1 and "--max-in-flight: bad value 0" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli_app, ["serve", str(run), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "choose another --port" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "host, says",
    [
        ("", "--host: bad value ''"),
        ("no-such-host.invalid", "--host no-such-host.invalid: not a host name or address"),
        ("192.0.2.1", "cannot listen on 192.0.2.1:0"),  # TEST-NET-1 (RFC 5737): no machine's address
    ],
)
def test_serve_names_a_bad_host_before_loading_the_model(tmp_path, host, says):
    missing_run = tmp_path / "no-run"  # the host is refused first: loading would say "not found"
    result = runner.invoke(cli_app, ["serve", str(missing_run), "--host", host, "--port", "0"])
    assert result.exit_code == 1 and says in result.output, result.output
    assert ("choose another --host" in result.output) == bool(host) and "Traceback" not in result.output


@pytest.mark.parametrize("host, warned", [("127.0.0.2", False), ("localhost", False), ("0.0.0.0", True)])
def test_serve_warns_when_other_machines_can_reach_it(run, monkeypatch, host, warned):
    """The warning follows the address listened on: any loopback one is this machine's alone."""
    import mtl_meniscus.commands.serve as serve_module

    monkeypatch.setattr(serve_module, "uvicorn_server", lambda app: SimpleNamespace(run=lambda sockets: None))
    result = runner.invoke(cli_app, ["serve", str(run), "--host", host, "--port", "0"])
    assert result.exit_code == 0 and "serving" in result.output, result.output
    assert ("reachable from other machines" in result.output) == warned


def test_a_host_name_listens_on_its_ipv4_address_where_it_has_one(monkeypatch):
    """Where /etc/hosts lists ::1 localhost first, `--host localhost` still answers 127.0.0.1."""

    def ipv6_first(host, port, *args, **kwargs):
        stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [
            (socket.AF_INET6, *stream, ("::1", port, 0, 0)),
            (socket.AF_INET, *stream, ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    with listen("localhost", 0) as sock:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"


def test_serve_on_port_0_listens_on_the_port_it_prints(run):
    with serve_process(run) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(url + "/health", timeout=60) as response:
            assert json.load(response)["status"] == "ok"


# ---- connections: a real uvicorn, the deadline on a request's head -------------------------------


@contextmanager
def served(app):
    """run_serve's uvicorn (its protocol, limits and socket) on a free port of 127.0.0.1, in a
    thread: (the uvicorn.Server, the port)."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, seconds=60)
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def health_status(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def dribble(sock: socket.socket, data: bytes, every_s: float = 0.1) -> None:
    """Send `data` a byte at a time, in a thread, until it ends or the server closes the connection."""

    def send() -> None:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(every_s)

    threading.Thread(target=send, daemon=True).start()


def until_closed(sock: socket.socket, seconds: float = 15.0) -> bytes:
    """What the server sent before it closed the connection; fails if still open after `seconds`."""
    received, deadline = b"", time.monotonic() + seconds
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if not (chunk := sock.recv(65536)):
                return received
            received += chunk
    except ConnectionResetError:
        return received
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open {seconds:g} s") from None


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200  # never ends: 20 s at 0.1 s a byte


def test_connections_that_never_finish_a_request_head_are_closed_and_no_longer_lock_all_out(run, monkeypatch):
    # long enough for all of them to be open at once on a loaded machine before the first is closed
    monkeypatch.setattr(serve, "HEAD_DEADLINE_S", 5.0)
    with served(create_app(run, ServeLimits(in_flight=1, waiting=0))) as (server, port):
        limit = server.config.limit_concurrency  # uvicorn counts open connections against it
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(limit - 1)]
        dribbling = socket.create_connection(("127.0.0.1", port))
        dribble(dribbling, SLOW_HEAD)  # a byte every 0.1 s: uvicorn's keep-alive timeout never ends
        wait_until(lambda: len(server.server_state.connections) == limit)
        assert health_status(port) == 503  # everyone locked out while they are open
        for sock in [*silent, dribbling]:
            assert until_closed(sock) == b""
            sock.close()
        assert health_status(port) == 200


def test_a_slow_upload_body_is_not_cut_and_an_answered_connection_has_the_deadline_again(run, monkeypatch):
    # long enough for a head sent at once to be read on a loaded machine; the body takes 2 of them
    monkeypatch.setattr(serve, "HEAD_DEADLINE_S", 1.5)
    png = (run.parent / "data" / "images" / "knee_00000.png").read_bytes()
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="knee.png"\r\n\r\n'.encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}

    def slowly(pieces: int = 4, pause_s: float = 0.75):  # 3 s of body after the head: 2 deadlines
        step = len(body) // pieces + 1
        for k in range(pieces):
            time.sleep(pause_s)
            yield body[k * step : (k + 1) * step]

    with served(create_app(run)) as (_, port):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/predict", body=slowly(), headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["image"] == "knee.png"
        dribble(connection.sock, SLOW_HEAD)  # the next request's head, too slow: closed again
        assert until_closed(connection.sock) == b""
        connection.close()
        # answered before its body is read (here: not at all), a request's body is not waited for
        late = socket.create_connection(("127.0.0.1", port))
        late.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
        dribble(late, bytes(1000))
        assert until_closed(late).startswith(b"HTTP/1.1 200 OK")
        late.close()
        assert health_status(port) == 200
