"""serve's page in a real browser: Debian's headless chromium, driven by selenium through Debian's
chromedriver, loads the page from `serve` running in a subprocess on 127.0.0.1 (`--port 0`: the
port it prints), uploads phantom slices, and the answers appear in the DOM as predict gives them.
Skipped, saying why, where chromium or its driver is not installed (.ci/run installs both).

With MTL_MENISCUS_WRITE_SCREENSHOT=1 the page is also saved as docs/images/serve-page.png (the
README's picture); otherwise the screenshot goes to the test's temporary folder only."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console
from support import serve_process

from mtl_meniscus.commands.predict import run_predict

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "docs" / "images" / "serve-page.png"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


def predicted(run: Path, images: list[Path], folder: Path, threshold: float | None = None) -> list[dict]:
    """predict's line for each image, predicted alone as the server predicts an upload: with bf16
    on a CPU with AMX, a batch of 12 and a batch of 1 differ in the fourth decimal."""
    lines = []
    for image in images:
        out = folder / "predicted.jsonl"
        run_predict(run, [image], out, as_json=True, threshold=threshold, console=Console(quiet=True))
        lines += [json.loads(line) for line in out.read_text().splitlines()]
    return lines


@pytest.fixture(scope="module")
def slices(tiny_run, tmp_path_factory) -> tuple[list[Path], list[dict], float]:
    """12 phantom slices, predict's lines for them, and the fissure threshold they are cut at: the
    median of their probabilities, so that the page shows both sides of the gate (a tiny model's
    probabilities sit close together)."""
    run, folder = tiny_run / "run", tmp_path_factory.mktemp("page")
    images = sorted((tiny_run / "data" / "images").glob("*.png"))[:12]
    cut = float(np.median([row["p_fissure"] for row in predicted(run, images, folder)]))
    return images, predicted(run, images, folder, cut), cut


@pytest.fixture(scope="module")
def server(tiny_run, slices):
    """`serve` on the tiny run, in a subprocess on a port of 127.0.0.1 it chose: its base URL."""
    with serve_process(tiny_run / "run", "--threshold", repr(slices[2])) as url:
        with urllib.request.urlopen(url + "/health", timeout=60) as response:
            assert json.load(response)["status"] == "ok"
        yield url


@pytest.fixture(scope="module")
def browser():
    selenium = pytest.importorskip("selenium", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver import Chrome, ChromeOptions
    from selenium.webdriver.chrome.service import Service

    assert selenium
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1000,960")
    driver = Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def upload(browser, path: Path) -> dict[str, list[str]]:
    """Pick `path` in the page's file input; the answers table once the page says it is done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = browser.find_element(By.ID, "status")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 60).until(
        lambda _: status.get_attribute("data-state") in ("done", "error") and path.name in status.text
    )
    assert status.get_attribute("data-state") == "done", status.text
    rows = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
    return {
        row.get_attribute("data-task"): [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in rows
    }


def test_the_page_shows_predicts_answers_gated_with_the_saliency_views(server, browser, slices, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images, rows, _ = slices
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda b: "fissure threshold" in b.find_element(By.ID, "model").text)
    # a slice without a predicted tear first (where there is one), the screenshot's tear last: the
    # lowest and the highest probability, the farthest from the threshold, so that a last-digit
    # difference between the server's batch and predict's cannot flip the answer
    order = sorted(range(len(rows)), key=lambda k: rows[k]["p_fissure"])
    for k in (
        [order[0], order[-1]] if rows[order[0]]["fissure"] != rows[order[-1]]["fissure"] else [order[-1]]
    ):
        expected = rows[k]
        shown = upload(browser, images[k])
        assert list(shown) == ["fissure", "orientation", "position"]
        assert shown["fissure"][1:] == [
            "tear" if expected["fissure"] else "no tear",
            f"{expected['p_fissure']:.3f}",
        ]
        for task, column in (("orientation", "p_horizontal"), ("position", "p_anterior")):
            if expected["fissure"]:
                assert shown[task][1:] == [expected[task], f"{expected[column]:.3f}"]
            else:
                assert shown[task][1:] == ["not reported", "–"]  # gated as predict gates it
        views = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#views button")]
        assert views == ["slice", "saliency: fissure", "saliency: orientation", "saliency: position"]
        assert browser.find_element(By.ID, "slice").get_attribute("src").startswith("data:image/png;base64,")
    browser.find_element(By.CSS_SELECTOR, "#views button[data-view='saliency: fissure']").click()
    assert browser.find_element(By.ID, "caption").text == "where fissure's answer looks (LayerCAM)"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(tmp_path / "serve-page.png"))
    if os.environ.get("MTL_MENISCUS_WRITE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "serve-page.png", SCREENSHOT)


def test_an_exam_shows_its_most_suspicious_slice_and_a_slider_over_its_slices(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from mtl_meniscus.phantom.exams import write_phantom_exams

    write_phantom_exams(tmp_path / "exams", n=20, n_slices=3, size=64, fmt="dicom-series")
    packed = shutil.make_archive(str(tmp_path / "knee"), "zip", tmp_path / "exams" / "exam_0000")
    browser.get(server + "/")
    shown = upload(browser, Path(packed))
    assert shown["fissure"][1] in ("tear", "no tear")
    slider = browser.find_element(By.ID, "slider")
    assert browser.find_element(By.ID, "exam-slider").is_displayed() and slider.get_attribute("max") == "2"
    top = int(slider.get_attribute("value"))
    assert "(the most suspicious slice)" in browser.find_element(By.ID, "caption").text
    assert browser.find_element(By.ID, "slider-text").text.startswith(f"P(tear) on slice {top + 1} of 3: ")


def test_a_refusal_clears_the_last_answer_and_ticking_exam_sends_the_scan_again(
    server, browser, slices, tmp_path
):
    """The last scan's answer stayed on screen under a refusal of the next; a volume refused as a
    slice had to be picked again after ticking "exam", and picking the same file again did nothing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images, _, _ = slices
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda b: "fissure threshold" in b.find_element(By.ID, "model").text)
    with urllib.request.urlopen(server + "/model", timeout=60) as response:
        warnings = json.load(response)["warnings"]
    warning = browser.find_element(By.ID, "warning")
    assert warning.is_displayed() == bool(warnings) and warning.text == " ".join(warnings)
    upload(browser, images[0])
    result, status = browser.find_element(By.ID, "result"), browser.find_element(By.ID, "status")
    assert (
        result.is_displayed()
        and browser.find_element(By.ID, "result-title").text == f"Answer for {images[0].name}"
    )
    picture = browser.find_element(By.ID, "slice")
    assert picture.get_attribute("alt") == browser.find_element(By.ID, "caption").text  # follows the view
    volume = tmp_path / "knee.npy"
    np.save(volume, np.stack([cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED)] * 3))  # a 3-slice exam
    file_input = browser.find_element(By.ID, "file")
    file_input.send_keys(str(volume))
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") == "error")
    error = browser.find_element(By.ID, "error").text
    assert status.text == "knee.npy: refused (422)"  # the message once, in the alert region
    assert error.startswith("knee.npy: ") and error.endswith("Tick “exam” to send it as an exam.")
    assert not result.is_displayed()  # not the last slice's answer under this refusal
    browser.execute_script("document.getElementById('status').dataset.state = 'picked again'")
    file_input.send_keys(str(volume))  # the same file again: sent again (it was no change before)
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") == "error")
    browser.find_element(By.ID, "exam").click()  # the same file again, as an exam
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") == "done")
    assert result.is_displayed() and browser.find_element(By.ID, "error").text == ""
    slider = browser.find_element(By.ID, "slider")
    assert slider.get_attribute("aria-valuetext").startswith(
        f"P(tear) on slice {int(slider.get_attribute('value')) + 1} of 3: "
    )
