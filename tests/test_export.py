"""`export`: the ONNX file scores real slices as PyTorch does, in both modes, at any batch size."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mtl_meniscus.commands.export import PARITY_TOLERANCE, export_onnx
from mtl_meniscus.config import load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.preprocess import make_input
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A one-epoch tiny run of each mode on a small phantom."""
    folder = tmp_path_factory.mktemp("export")
    write_phantom(folder / "data", n=60, seed=31, size=64)
    for mode in ("shared", "separate"):
        overrides = {"data.path": str(folder / "data"), "model.name": mode, "train.max_epochs": 1}
        train_run(load_config(TINY, overrides), folder / mode, console=Console(quiet=True))
    return folder


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_onnx_file_matches_pytorch_on_phantom_slices(runs, mode, tmp_path):
    result = CliRunner().invoke(app, ["export", str(runs / mode), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "matches PyTorch within" in result.output

    data = prepare_data(runs / "data", load_config(TINY).data)
    images = data.images[:5]  # raw (64, 64) slices; a batch of 5, not the export's example batch of 2
    fp32 = resolve_runtime("fp32")
    expected = load_trained(runs / mode, fp32).predict(images, fp32)  # the package's own pipeline
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([make_input(image, "sobel") for image in images])  # (5, 2, 64, 64)
    names = [output.name for output in session.get_outputs()]
    assert names == ["p_fissure", "p_horizontal", "p_anterior"]  # predict's column names
    for task, probs in zip(("fissure", "orientation", "position"), session.run(names, {"x": x})):
        assert probs.shape == (5,)
        np.testing.assert_allclose(probs, expected[task], atol=PARITY_TOLERANCE, rtol=0)

    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert metadata["tasks"] == "fissure,orientation,position"
    assert (metadata["edge_filter"], metadata["image_size"], metadata["fissure_threshold"]) == (
        "sobel",
        "64",
        "0.5",
    )
    assert (tmp_path / "m.onnx.json").is_file()


def test_a_graph_that_disagrees_with_pytorch_is_not_kept(runs, tmp_path, monkeypatch):
    import mtl_meniscus.commands.export as export_module

    monkeypatch.setattr(export_module, "_parity", lambda *args: 0.5)
    with pytest.raises(MeniscusError, match="disagrees with PyTorch by 5.00e-01"):
        export_onnx(runs / "shared", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left


def test_missing_onnx_packages_and_bad_runs_get_a_message(runs, tmp_path, monkeypatch):
    runner = CliRunner()
    missing = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx")])
    assert missing.exit_code == 1 and "nothing" in missing.output and "Traceback" not in missing.output

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    result = runner.invoke(app, ["export", str(runs / "shared"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "onnxruntime is missing" in result.output and "[export]" in result.output


def test_predict_evaluate_and_export_name_each_probability_alike(runs, tmp_path):
    """One set of probability names: predict's CSV, evaluate's predictions.csv, the ONNX outputs."""
    import csv

    run, images = runs / "shared", sorted((runs / "data" / "images").glob("*.png"))[:3]
    invoke = CliRunner().invoke
    assert (
        invoke(app, ["predict", str(run), *map(str, images), "--out", str(tmp_path / "p.csv")]).exit_code == 0
    )
    args = ["evaluate", str(run), "--data", str(runs / "data"), "--split", "all", "--bootstrap", "0"]
    assert invoke(app, [*args, "--out", str(tmp_path / "eval")]).exit_code == 0
    assert invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")]).exit_code == 0

    def probability_columns(path: Path) -> list[str]:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle))
        return [c for c in header if c.startswith("p_") and not c.endswith("_tta")]

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_names = [output.name for output in session.get_outputs()]
    assert (
        probability_columns(tmp_path / "p.csv") == onnx_names == ["p_fissure", "p_horizontal", "p_anterior"]
    )
    assert probability_columns(tmp_path / "eval" / "predictions.csv") == onnx_names


def test_the_whole_pipeline_in_onnx_gives_predicts_answers_on_raw_slices(runs, pydicom_files, tmp_path):
    """Raw slices of three sizes (smaller than, equal to and larger than the model's 64 px) and a
    DICOM file: onnxruntime alone, on the slice as read, gives predict's probabilities (no TTA) and
    its gated labels."""
    import json

    from mtl_meniscus.commands.predict import VOLUME_HINT
    from mtl_meniscus.io.imageio import read_image

    for size in (48, 100):
        write_phantom(tmp_path / f"p{size}", n=20, seed=size, size=size)
    files = [sorted((tmp_path / f"p{size}" / "images").glob("*.png"))[1] for size in (48, 100)]
    from support import sagittal_copy

    dicom = sagittal_copy(pydicom_files / "MR_small.dcm", tmp_path / "small.dcm")  # 64x64 MR, int16
    files += [sorted((runs / "data" / "images").glob("*.png"))[1], dicom]
    run, invoke = runs / "shared", CliRunner().invoke
    result = invoke(app, ["export", str(run), "--out", str(tmp_path / "p.onnx"), "--pipeline"])
    assert result.exit_code == 0, result.output
    args = ["predict", str(run), *map(str, files), "--out", str(tmp_path / "p.jsonl"), "--json"]
    result = invoke(app, [*args, "--tta", "0", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    session = onnxruntime.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names[:3] == ["p_fissure", "p_horizontal", "p_anterior"] and names[3] == "pred_fissure"
    shapes = set()
    for path, row in zip(files, rows):
        image = read_image(path, max_pixels=10**8, volume_hint=VOLUME_HINT, plane="sagittal", notes=[])
        shapes.add(image.shape)
        outputs = dict(zip(names, session.run(names, {"image": image[None].astype(np.float32)})))
        assert outputs["p_fissure"][0] == pytest.approx(row["p_fissure"], abs=1e-4), path
        tear = int(outputs["pred_fissure"][0])
        assert tear == row["fissure"]
        if tear:  # the gate is open: predict gives the gated tasks too
            assert outputs["p_horizontal"][0] == pytest.approx(row["p_horizontal"], abs=1e-4)
            assert int(outputs["pred_orientation"][0]) == (row["orientation"] == "horizontal")
        else:  # closed: predict leaves them out, the graph says -1
            assert int(outputs["pred_orientation"][0]) == int(outputs["pred_position"][0]) == -1
    assert len(shapes) == 3  # 48, 64 (a PNG and the DICOM) and 100 pixels through the one graph
