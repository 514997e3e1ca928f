"""`export`: the ONNX file scores real slices as PyTorch does, in both modes, at any batch size."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mtl_meniscus.commands.export import (
    GATE_CLOSED,
    PARITY_TOLERANCE,
    UNREADABLE,
    Preprocess,
    TaskProbabilities,
    WholePipeline,
    export_onnx,
)
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

    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # any difference is too large
    with pytest.raises(
        MeniscusError, match=r"disagrees with PyTorch by \d\.\d\de[-+]\d+ \(tolerance -1e\+00\)"
    ):
        export_onnx(runs / "shared", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left


def test_an_old_json_never_describes_a_new_graph(runs, tmp_path, monkeypatch):
    """The new graph replaced the old one, then its .json could not be written (a full disk): the
    old .json stayed beside it, describing another model (its temperatures, its threshold)."""
    import errno

    import mtl_meniscus.commands.export as export_module

    export_onnx(runs / "shared", tmp_path / "m.onnx")
    old = (tmp_path / "m.onnx").read_bytes()

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_module, "write_text_atomic", full_disk)
    with pytest.raises(OSError):
        export_onnx(runs / "separate", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() != old and not (tmp_path / "m.onnx.json").exists()


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_model_that_answers_nan_is_not_exported(runs, tmp_path, pipeline):
    # NaN weights: the graph would match PyTorch NaN for NaN and answer nothing (predict refuses it)
    import shutil

    import torch

    run = tmp_path / "nan"
    shutil.copytree(runs / "shared", run)
    payload = torch.load(run / "best.pt", weights_only=True)
    bias = next(key for key in payload["state_dict"] if key.endswith("bias"))
    payload["state_dict"][bias] = torch.full_like(payload["state_dict"][bias], float("nan"))
    torch.save(payload, run / "best.pt")
    with pytest.raises(MeniscusError, match="output is not finite on a readable check input"):
        export_onnx(run, tmp_path / "m.onnx", pipeline=pipeline)
    assert not (tmp_path / "m.onnx").exists()


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
    assert names[-1] == "valid"
    shapes = set()
    for path, row in zip(files, rows):
        image = read_image(path, max_pixels=10**8, volume_hint=VOLUME_HINT, plane="sagittal", notes=[])
        shapes.add(image.shape)
        outputs = dict(zip(names, session.run(names, {"image": image[None].astype(np.float32)})))
        assert outputs["p_fissure"][0] == pytest.approx(row["p_fissure"], abs=1e-4), path
        assert outputs["valid"].tolist() == [True], path
        tear = int(outputs["pred_fissure"][0])
        assert tear == row["fissure"]
        if tear:  # the gate is open: predict gives the gated tasks too
            assert outputs["p_horizontal"][0] == pytest.approx(row["p_horizontal"], abs=1e-4)
            assert int(outputs["pred_orientation"][0]) == (row["orientation"] == "horizontal")
        else:  # closed: predict leaves them out, the graph says -1
            assert int(outputs["pred_orientation"][0]) == int(outputs["pred_position"][0]) == -1
    assert len(shapes) == 3  # 48, 64 (a PNG and the DICOM) and 100 pixels through the one graph


def _unreadable(image: np.ndarray) -> dict[str, np.ndarray]:
    """`image` made unreadable three ways: a NaN pixel, an infinite one, and every pixel times 1e30
    (finite, but its edge map overflows float32)."""
    nan, inf = image.copy(), image.copy()
    nan[3, 4], inf[10, 20] = np.nan, -np.inf
    return {"nan": nan, "inf": inf, "x 1e30": image * np.float32(1e30)}


def test_the_pipeline_graph_answers_an_unreadable_slice_as_unreadable_not_as_no_tear(runs, tmp_path):
    """A slice predict would refuse (NaN or infinite pixels) or whose preprocessing overflows gets
    valid False, NaN probabilities and UNREADABLE for every pred_* (not pred_fissure 0, "no tear");
    the readable slices of the same batch keep predict's answers, and one scaled to pixels up to 1e18
    (whose squares would overflow float32 sums, but not predict's float64 statistics) is readable
    and answered alike."""
    import json

    run = runs / "shared"
    report = export_onnx(run, tmp_path / "p.onnx", pipeline=True)
    assert report.max_abs_difference <= PARITY_TOLERANCE  # the parity check's unreadable rows agree too
    data = prepare_data(runs / "data", load_config(TINY).data)
    images = data.images[:2]  # raw (64, 64) slices
    bad = _unreadable(images[0])
    huge = images[0] * np.float32(1e18 / images[0].max())
    batch = np.stack([images[0], *bad.values(), images[1], huge])
    session = onnxruntime.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    answers = dict(zip(names, session.run(names, {"image": batch})))
    preds = ["pred_fissure", "pred_orientation", "pred_position"]
    probs = ["p_fissure", "p_horizontal", "p_anterior"]

    assert answers["valid"].tolist() == [True, False, False, False, True, True]
    for k, case in enumerate(bad, start=1):
        assert [int(answers[name][k]) for name in preds] == [UNREADABLE] * 3, case
        assert all(np.isnan(answers[name][k]) for name in probs), case
    assert UNREADABLE not in (0, 1, GATE_CLOSED)  # apart from "no tear" and "not applicable"

    fp32 = resolve_runtime("fp32")
    expected = load_trained(run, fp32).predict(images, fp32)  # the package's own pipeline, no TTA
    readable = [0, 4]
    for name, task in zip(probs, ("fissure", "orientation", "position")):
        np.testing.assert_allclose(answers[name][readable], expected[task], atol=PARITY_TOLERANCE, rtol=0)
        assert answers[name][5] == pytest.approx(answers[name][0], abs=PARITY_TOLERANCE)  # huge
    for k in readable:
        tear = int(answers["p_fissure"][k] >= report.fissure_threshold)
        assert int(answers["pred_fissure"][k]) == tear
        for name, p in zip(preds[1:], probs[1:]):
            assert int(answers[name][k]) == (int(answers[p][k] >= 0.5) if tear else GATE_CLOSED)
    for k, alone in zip(readable, images):  # an unreadable neighbour changes nothing
        single = session.run(names, {"image": alone[None].astype(np.float32)})
        for name, values in zip(names, single):
            np.testing.assert_array_equal(values[0], answers[name][k])

    sidecar = json.loads((tmp_path / "p.onnx.json").read_text())
    assert (sidecar["input_name"], sidecar["input_dtype"]) == ("image", "float32")
    assert sidecar["outputs"][-1] == "valid" and str(UNREADABLE) in sidecar["non_finite_inputs"]
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "p.onnx")).metadata_props}
    assert metadata["input_dtype"] == "float32"
    assert metadata["non_finite_inputs"] == sidecar["non_finite_inputs"]


def test_the_network_graph_gives_a_row_with_non_finite_values_nan_probabilities(runs, tmp_path):
    """The network graph has no labels to get wrong; a row of x with NaN or inf gets NaN
    probabilities (not whatever the runtime makes of NaN), the other rows their own."""
    import json

    report = export_onnx(runs / "separate", tmp_path / "m.onnx")
    data = prepare_data(runs / "data", load_config(TINY).data)
    x = np.stack([make_input(image, "sobel") for image in data.images[:3]])  # (3, 2, 64, 64)
    x_bad = x.copy()
    x_bad[1, 0, 5, 5], x_bad[2, 1, 0, 0] = np.nan, np.inf
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    good, bad = session.run(None, {"x": x}), session.run(None, {"x": x_bad})
    for clean, probs in zip(good, bad):
        assert np.isfinite(clean).all()
        assert probs[0] == clean[0] and np.isnan(probs[1:]).all()
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert (sidecar["input_name"], sidecar["input_dtype"]) == ("x", "float32")
    assert "NaN" in sidecar["non_finite_inputs"] and report.outputs == tuple(sidecar["outputs"])


def test_a_network_or_preprocessing_that_hides_nan_cannot_make_an_unreadable_slice_readable():
    """What a network makes of NaN depends on the runtime (a Relu may give 0; a matrix product may
    skip the zero weights of the resize). With a network that ignores its input altogether, the
    pipeline still calls a NaN, an infinite and an overflowing slice unreadable, and its readable
    slice gets the network's answer; with a preprocessing that ignores it too, the NaN and the
    infinite pixel are still seen."""
    import torch

    class Blind(torch.nn.Module):  # the same logits (0, probability 0.5) whatever the input
        tasks = ("fissure", "orientation", "position")

        def forward(self, x):
            return {task: torch.zeros(len(x)) for task in self.tasks}

    class BlankPreprocess(torch.nn.Module):  # finite zeros whatever the slice
        def forward(self, image):
            return torch.zeros(len(image), 2, 64, 64)

    image = np.random.default_rng(0).random((64, 64), np.float32) * 1000
    batch = torch.from_numpy(np.stack([image, *_unreadable(image).values()]))  # fine, NaN, inf, x 1e30
    for preprocess, unreadable in ((Preprocess(64, "sobel"), [1, 2, 3]), (BlankPreprocess(), [1, 2])):
        pipeline = WholePipeline(TaskProbabilities(Blind()), preprocess, 0.5, (False, True, True))
        with torch.no_grad():
            *probs, fissure, orientation, position, valid = pipeline(batch)
        assert valid[0] and not valid[unreadable].any(), preprocess
        for p in probs:
            assert p[0] == 0.5 and torch.isnan(p[unreadable]).all()
        for pred in (fissure, orientation, position):
            assert pred[0] == 1 and (pred[unreadable] == UNREADABLE).all()


def _docs_recipe() -> str:
    """docs/cli.md's recipe for the ONNX model without this package (its Python block)."""
    text = (ROOT / "docs" / "cli.md").read_text()
    return text.split("**The ONNX model without this package.**")[1].split("```python\n")[1].split("```")[0]


def test_the_docs_recipe_for_the_onnx_model_alone_gives_predicts_probabilities(runs, tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["export", str(runs / "shared"), "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0, result.output
    images = prepare_data(runs / "data", load_config(TINY).data).images[:2]
    # a near-constant slice with a large offset: preprocess.standardize makes that channel zeros
    flat = 5000 + np.random.default_rng(0).normal(0, 1e-3, (64, 64)).astype(np.float32)
    slices = [*images, flat]
    fp32 = resolve_runtime("fp32")
    expected = load_trained(runs / "shared", fp32).predict(slices, fp32)
    monkeypatch.chdir(tmp_path)  # the recipe opens model.onnx and model.onnx.json where it runs
    for k, slice_hw in enumerate(slices):
        namespace = {"slice_hw": slice_hw}
        exec(_docs_recipe(), namespace)
        assert namespace["p"]["p_fissure"][0] == pytest.approx(expected["fissure"][k], abs=1e-6), k
        assert namespace["tear"] == (expected["fissure"][k] >= 0.5)
